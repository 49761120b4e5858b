"""fdino.app: a Gradio explorer of a model on a folder of images (``fdino app SOURCE --images DIR``).

    service = FeatureService(fdino.weights.load_model("runs/demo"), "photos/")   # fdino.serve
    service.refresh()                                  # embed the folder (or load the disk cache)
    hits = search(service, query_tensor(service, image), k=8)   # the Search tab, without Gradio
    demo = build_app(service, {"teacher": service.backbone})   # gradio.Blocks; launch(demo, service, ...)

The tabs' outputs come from plain functions in `fdino.app.logic` (importable without Gradio);
`build_app` and `launch` (`fdino.app.ui`) need the optional extra ``pip install 'fdino[app]'``.
"""

from .logic import (
    MAP_METHODS,
    EmbeddingMap,
    Hit,
    attention_grid,
    attention_views,
    class_labels,
    embedding_map,
    folder_images,
    patch_pca_view,
    query_tensor,
    read_query,
    search,
)


def build_app(service, networks, **kwargs):
    """The Gradio page (see `fdino.app.ui.build_app`)."""
    from .ui import build_app as _build_app  # noqa: PLC0415  (gradio is optional)

    return _build_app(service, networks, **kwargs)


def launch(demo, service, **kwargs):
    """Serve the page (see `fdino.app.ui.launch`)."""
    from .ui import launch as _launch  # noqa: PLC0415  (gradio is optional)

    return _launch(demo, service, **kwargs)


__all__ = [
    "EmbeddingMap",
    "Hit",
    "MAP_METHODS",
    "attention_grid",
    "attention_views",
    "build_app",
    "class_labels",
    "embedding_map",
    "folder_images",
    "launch",
    "patch_pca_view",
    "query_tensor",
    "read_query",
    "search",
]
