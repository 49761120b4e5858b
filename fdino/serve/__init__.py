"""fdino.serve: a feature service over HTTP with a search page (``fdino serve RUN_DIR --images FOLDER``).

    service = FeatureService(fdino.weights.load_model("runs/demo"), "photos/")
    service.refresh()                          # embed the folder (or load it from the disk cache)
    app = create_app(service)                  # FastAPI; run with uvicorn on 127.0.0.1
    uvicorn.run(app, host="127.0.0.1", port=8000, **service.config.uvicorn_options())

Hardening (see each module): uploads are opened only as JPEG/PNG/WebP/BMP/GIF and refused from their
header when decoding them would exceed a memory budget (`fdino.serve.decode`); requests must name
this server in their Host header and carry the token when one is set; upload requests are queued
up to a bound and time out (`fdino.serve.guard`); files are served only from inside the folder,
whatever their names (`fdino.serve.paths`); the folder is re-indexed in the background.

FastAPI, uvicorn and python-multipart are optional dependencies (``pip install fdino[serve]``),
imported only by `create_app` and the CLI, so this package imports without them.
"""

from .batching import BatchQueue
from .decode import ACCEPTED_FORMATS, decode_cost
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


def create_app(service: FeatureService, **kwargs):
    """The FastAPI application for ``service`` (see `fdino.serve.app.create_app` for ``kwargs``)."""
    from .app import create_app as _create_app  # noqa: PLC0415  (FastAPI is optional)

    return _create_app(service, **kwargs)


__all__ = [
    "ACCEPTED_FORMATS",
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
    "decode_cost",
    "decode_image",
    "default_cache_path",
    "fingerprint",
    "free_port",
    "model_key",
    "scan_folder",
]
