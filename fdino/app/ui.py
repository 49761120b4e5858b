"""The Gradio page of ``fdino app``: one query image above four tabs (Search, Attention, Patch PCA, Map).

Only wiring lives here; every picture and number comes from `fdino.app.logic`. Model work runs on
the service's single model thread (`FeatureService.executor`), as in ``fdino serve``, so requests
never run two forwards at once and the index is only touched from that thread. Images reach the
browser as thumbnails made here, never as paths into the folder, so Gradio is given no file
access beyond its own upload cache.

Events with API names (for `gradio_client`): ``/search`` (query file, k -> results gallery, results
table), ``/attention``, ``/patch_pca`` and ``/embedding_map``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import gradio as gr
from torch import nn

from ..serve import FeatureService, UploadError
from . import logic

THUMBNAIL = 192  # pixels, longest side of gallery images
HELP = (
    "Upload an image or pick one from the folder below; the tabs show its nearest images, the last "
    "block's CLS attention and its patch features. Selecting a search result searches from it."
)
MAP_HELP = (
    "Each point is one image of the folder ({n} shown), coloured by its subfolder. Hovering over a point "
    "shows the image, its file path and class."
)


def _thumbnail(service: FeatureService, rel: str):
    """An indexed image, shrunk for a gallery (PIL); the folder's files are never handed to Gradio."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(service.index.root / rel) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        return image


def _user_error(err: UploadError) -> gr.Error:
    return gr.Error(f"{err.message} (status {err.status})", title="Cannot use this image")


def build_app(
    service: FeatureService,
    networks: Mapping[str, nn.Module],
    *,
    title: str = "fdino app",
    default_k: int = 8,
    gallery_limit: int = 200,
) -> gr.Blocks:
    """The page for ``service`` (model + refreshed folder index) and the ``networks`` whose attention
    to show side by side (``{"teacher": ..., "student": ...}`` for a training run)."""
    config, model = service.config, service.model
    mean, std = tuple(model.mean), tuple(model.std)
    last_refresh = [time.monotonic()]

    def on_model_thread(fn, *args, **kwargs):
        return service.executor.submit(fn, *args, **kwargs).result()

    def refresh_if_due() -> None:
        # Like the service's /search: look at the folder again at most every refresh_interval seconds.
        if time.monotonic() - last_refresh[0] >= config.refresh_interval:
            last_refresh[0] = time.monotonic()
            on_model_thread(service.refresh)

    def prepared(path: str):
        try:
            return logic.query_tensor(service, logic.read_query(path, config))
        except UploadError as err:
            raise _user_error(err) from None

    def run_search(path: str | None, k: float):
        if not path:
            return [], [], []
        x = prepared(path)
        refresh_if_due()
        try:
            hits = on_model_thread(logic.search, service, x, int(k))
        except UploadError as err:
            raise _user_error(err) from None
        gallery = [(_thumbnail(service, h.path), f"{h.path}  {h.score:.3f}") for h in hits]
        table = [[rank + 1, h.path, round(h.score, 4)] for rank, h in enumerate(hits)]
        return gallery, table, [h.path for h in hits]

    def run_attention(path: str | None):
        if not path:
            return "", *([None] * len(networks))
        x = prepared(path)
        try:
            views = on_model_thread(logic.attention_views, networks, x, mean=mean, std=std)
        except ValueError as err:  # not a ViT with CLS attention: say so instead of failing
            return f"**No attention maps:** {err}.", *([None] * len(networks))
        return "", *views.values()

    def run_patch_pca(path: str | None):
        if not path:
            return "", None
        x = prepared(path)
        try:
            return "", on_model_thread(logic.patch_pca_view, service.backbone, x, mean=mean, std=std)
        except ValueError as err:
            return f"**No patch features:** {err}.", None

    map_pictures: dict = {}  # (SHA-256, size) -> data URI, model thread only: encoded once per folder

    def map_view(method: str):
        emb = logic.embedding_map(service.index, method=method)
        pictures = logic.map_thumbnails(service.index, emb.paths, map_pictures)
        return logic.map_html(emb.points, emb.labels, emb.class_names, pictures, emb.paths), len(emb.paths)

    def run_map(method: str):
        # Gradio's own plots show text tooltips only, so the map is our HTML: hovering shows the picture.
        try:
            markup, n = on_model_thread(map_view, method)  # the model thread: the index is touched only there
        except ValueError as err:
            return "", f"**No map:** {err}."
        return markup, MAP_HELP.format(n=n)

    def pick(paths: list[str], evt: gr.SelectData):
        """A gallery click: that indexed image becomes the query (its change event runs the tabs)."""
        try:
            return logic.read_query(service.index.root / paths[evt.index], config)
        except UploadError as err:
            raise _user_error(err) from None

    folder = logic.folder_images(service.index, gallery_limit)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\n{HELP}")
        with gr.Row():
            # PNG keeps the pixels of a picked folder image exact, so it finds itself with similarity 1.
            query = gr.Image(type="filepath", format="png", sources=["upload", "clipboard"], label="Query", height=260)
            with gr.Column():
                k = gr.Slider(1, config.max_k, value=min(default_k, config.max_k), step=1, label="neighbours (k)")
                gr.Markdown(
                    f"{len(service.index)} images indexed in `{service.index.root}`; uploads up to "
                    f"{config.max_upload_bytes / 2**20:.1f} MiB."
                )
        with gr.Tabs():
            with gr.Tab("Search"):
                hits = gr.State([])
                results = gr.Gallery(label="Nearest images", columns=6, allow_preview=False, elem_id="results")
                table = gr.Dataframe(headers=["rank", "path", "similarity"], label="Scores", interactive=False)
                folder_paths = gr.State(folder)
                gallery = gr.Gallery(
                    value=[(_thumbnail(service, p), p) for p in folder],
                    label=f"Folder (first {len(folder)} images): click one to search with it",
                    columns=8,
                    allow_preview=False,
                    elem_id="folder",
                )
            with gr.Tab("Attention"):
                attention_note = gr.Markdown()
                with gr.Row():
                    attention_images = [
                        gr.Image(label=f"{name}: CLS attention", format="png", buttons=["download", "fullscreen"])
                        for name in networks
                    ]
            with gr.Tab("Patch PCA"):
                pca_note = gr.Markdown()
                pca_image = gr.Image(label="patch features, PCA", format="png", buttons=["download", "fullscreen"])
            with gr.Tab("Map"):
                method = gr.Radio(list(logic.MAP_METHODS), value="pca", label="projection")
                map_note = gr.Markdown()
                map_plot = gr.HTML(elem_id="map")

        query.change(run_search, [query, k], [results, table, hits], api_name="search")
        k.release(run_search, [query, k], [results, table, hits], api_name=False)
        query.change(run_attention, [query], [attention_note, *attention_images], api_name="attention")
        query.change(run_patch_pca, [query], [pca_note, pca_image], api_name="patch_pca")
        gallery.select(pick, [folder_paths], [query], api_name=False)
        results.select(pick, [hits], [query], api_name=False)
        method.change(run_map, [method], [map_plot, map_note], api_name="embedding_map")
        demo.load(run_map, [method], [map_plot, map_note], api_name=False)
    return demo


def theme() -> Any:
    """Gradio's base theme with system fonts: the page loads nothing from the internet."""
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Base(font=system, font_mono=["ui-monospace", "monospace"])


def launch(demo: gr.Blocks, service: FeatureService, *, host: str, port: int | None, block: bool):
    """Serve ``demo`` on ``host:port`` with the service's upload limit; ``block=False`` returns at once
    (tests, notebooks). Returns Gradio's ``(app, local_url, share_url)``."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=service.config.max_upload_bytes,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
        ssr_mode=False,
        theme=theme(),
    )


__all__ = ["build_app", "launch", "theme"]
