"""``fdino app SOURCE --images DIR``: argparse wiring (`fdino.cli` calls `register`).

Gradio is the optional extra ``fdino[app]``. Importing this module without it raises
`ModuleNotFoundError` naming gradio, which `fdino.cli` turns into a command that says what to
install; the check looks gradio up without importing it, so ``fdino --help`` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("gradio") is None:
    raise ModuleNotFoundError("fdino app needs gradio: pip install 'fdino[app]'", name="gradio")

TRAINING_RUN = "fdino-checkpoint"  # `LoadedModel.kind` of run folders and ckpt files: both networks exist


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``app`` subcommand."""
    p = subparsers.add_parser(
        "app",
        help="Gradio explorer of a model on a folder of images: search, attention, patch PCA, embedding map",
        description="A local web page (Gradio; pip install 'fdino[app]') over a model and a folder of images: "
        "nearest-image search, last-block CLS attention with the paper's 60%-mass masks (teacher and student "
        "side by side for a training run), patch-feature PCA as RGB, and a 2-D map of the folder coloured by "
        "subfolder. The folder is embedded once and cached on disk like 'fdino serve' (same cache: keyed on "
        "the model and each file's content).",
    )
    from ..weights.cli_args import add_model_arguments  # noqa: PLC0415

    add_model_arguments(p, dest="source")
    p.add_argument("--images", type=Path, required=True, help="folder of images to index and explore (recursive)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes the app to the network)",
    )
    p.add_argument("--port", type=int, default=7860, help="TCP port (default: 7860)")
    p.add_argument("--cache-dir", type=Path, default=None, help="index cache folder (default: ~/.cache/fdino/serve)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MiB (default: 10)")
    p.add_argument(
        "--refresh-interval",
        type=float,
        default=2.0,
        help="seconds between checks of the images folder for changes (default: 2)",
    )
    p.add_argument("--k", type=int, default=8, help="neighbours shown at first (default: 8)")
    p.add_argument("--gallery-limit", type=int, default=200, help="folder images offered as queries (default: 200)")
    p.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's setting)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    # `fdino.serve.cli.build_service` reads these; the app sends one query at a time, so no batching.
    p.set_defaults(func=run_app, max_batch=1, max_wait_ms=0.0)


def attention_networks(args: argparse.Namespace, loaded) -> dict:
    """``{which: backbone}`` for the Attention tab: the loaded network, plus the other one of a training run."""
    from ..weights.cli_args import model_from_args  # noqa: PLC0415

    networks = {args.which: loaded.backbone}
    if loaded.kind == TRAINING_RUN:
        other = copy.copy(args)
        other.which = "student" if args.which == "teacher" else "teacher"
        networks[other.which] = model_from_args(other, dest="source", device=args.device).backbone.eval()
    return dict(sorted(networks.items(), key=lambda kv: kv[0] != "teacher"))  # teacher first


def run_app(args: argparse.Namespace) -> int:
    from ..serve.cli import build_service  # noqa: PLC0415
    from .ui import build_app, launch  # noqa: PLC0415

    if not args.images.is_dir():
        print(f"error: --images {str(args.images)!r} is not a folder", file=sys.stderr)
        return 2
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    try:
        service = build_service(args)
        networks = attention_networks(args, service.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = service.refresh()
    print(
        f"index: {len(service.index)} images in {args.images} ({result.added} embedded, {result.reused} from cache, "
        f"{len(service.index.skipped)} unreadable skipped) in {time.perf_counter() - start:.1f} s; "
        f"cache {service.index.cache_path}",
        flush=True,
    )
    demo = build_app(service, networks, title=f"fdino app: {service.arch}", default_k=args.k)
    print(f"fdino app on http://{args.host}:{args.port}/ (Ctrl+C stops)", flush=True)
    try:
        launch(demo, service, host=args.host, port=args.port, block=True)
    finally:
        service.close()
    return 0


__all__ = ["attention_networks", "register", "run_app"]
