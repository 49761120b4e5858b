"""fdino.serve: a feature service over HTTP with a search page (``fdino serve RUN_DIR --images FOLDER``).

    service = FeatureService(fdino.weights.load_model("runs/demo"), "photos/")
    service.refresh()                          # embed the folder (or load it from the disk cache)
    app = create_app(service)                  # FastAPI; run with uvicorn on 127.0.0.1

FastAPI, uvicorn and python-multipart are optional dependencies (``pip install fdino[serve]``),
imported only by `create_app` and the CLI, so this package imports without them.
"""

from .batching import BatchQueue
from .index import (
    FileStat,
    FolderIndex,
    RefreshResult,
    content_hash,
    default_cache_path,
    fingerprint,
    model_key,
    scan_folder,
)
from .server import BackgroundServer, free_port
from .service import FeatureService, ServiceConfig, UploadError, decode_image


def create_app(service: FeatureService):
    """The FastAPI application for ``service`` (see `fdino.serve.app`)."""
    from .app import create_app as _create_app  # noqa: PLC0415  (FastAPI is optional)

    return _create_app(service)


__all__ = [
    "BackgroundServer",
    "BatchQueue",
    "FeatureService",
    "FileStat",
    "FolderIndex",
    "RefreshResult",
    "ServiceConfig",
    "UploadError",
    "content_hash",
    "create_app",
    "decode_image",
    "default_cache_path",
    "fingerprint",
    "free_port",
    "model_key",
    "scan_folder",
]
