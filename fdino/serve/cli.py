"""``fdino serve``: argparse wiring (the lead's `fdino.cli` calls `register`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TOKEN_ENV = "FDINO_SERVE_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP feature service with a search page: embed, search a folder of images, attention maps",
        description="Serve a frozen backbone over HTTP (FastAPI + uvicorn; pip install 'fdino[serve]'). The images "
        "folder is embedded once and cached on disk (keyed on the model and each file's path, size, modification "
        "time and content hash; changed files are re-embedded on the next search). Endpoints: GET / (search page), "
        "GET /health, POST /embed, POST /search, POST /attention (ViTs), GET /images/PATH. Concurrent "
        "requests are batched into one forward pass. Binding an address other than loopback needs --token "
        "(or --allow-public); requests must name this server in their Host header (DNS-rebinding guard).",
    )
    from ..weights.cli_args import add_model_arguments  # noqa: PLC0415

    add_model_arguments(p, dest="source")
    p.add_argument("--images", type=Path, default=None, help="folder of images to index and search (recursive)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes the service to the network)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"require this token on every request ('Authorization: Bearer TOKEN', or open /?token=TOKEN in the "
        f"browser); needed to bind a non-loopback --host. Default: ${TOKEN_ENV} (keeps it out of the process list)",
    )
    p.add_argument(
        "--allow-public",
        action="store_true",
        help="bind a non-loopback --host without --token: anyone who reaches the port can use the service",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept requests whose Host header is NAME or NAME:PORT (e.g. the machine's DNS name); "
        "repeatable. Default: 127.0.0.1:PORT, localhost:PORT and the bound address",
    )
    p.add_argument("--docs", action="store_true", help="serve the API docs at /docs, /redoc and /openapi.json")
    p.add_argument("--cache-dir", type=Path, default=None, help="index cache folder (default: ~/.cache/fdino/serve)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests batched into one forward (default: 32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to batch with (default: 5 ms)",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MiB (default: 10)")
    p.add_argument(
        "--max-decode-mb",
        type=float,
        default=512.0,
        help="memory budget of decoding one upload, estimated from its header; larger images get 413 (default: 512)",
    )
    p.add_argument("--decode-workers", type=int, default=2, help="threads decoding uploads (default: 2)")
    p.add_argument(
        "--max-queue", type=int, default=32, help="upload requests in progress at once; more get 503 (default: 32)"
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per upload request (default: 60)")
    p.add_argument("--max-connections", type=int, default=128, help="concurrent connections (default: 128)")
    p.add_argument("--keep-alive", type=int, default=5, help="idle keep-alive timeout in seconds (default: 5)")
    p.add_argument(
        "--refresh-interval",
        type=float,
        default=2.0,
        help="seconds between checks of the images folder for changes (default: 2)",
    )
    p.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's setting)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    p.set_defaults(func=run_serve)


def build_service(args: argparse.Namespace):
    """The `FeatureService` described by parsed ``serve`` arguments, with its index up to date."""
    from ..weights.cli_args import model_args_record, model_from_args  # noqa: PLC0415
    from .service import FeatureService, ServiceConfig  # noqa: PLC0415

    loaded = model_from_args(args, dest="source", device=args.device)
    # Options other commands' parsers may lack (`fdino app` reuses this function): ServiceConfig's defaults.
    optional = {
        "max_decode_bytes": ("max_decode_mb", lambda mb: int(mb * 2**20)),
        "decode_workers": ("decode_workers", int),
        "max_queue": ("max_queue", int),
        "request_timeout": ("request_timeout", float),
        "max_connections": ("max_connections", int),
        "keep_alive_timeout": ("keep_alive", int),
    }
    config = ServiceConfig(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        refresh_interval=args.refresh_interval,
        **{field: cast(getattr(args, name)) for field, (name, cast) in optional.items() if hasattr(args, name)},
    )
    model_info = model_args_record(args, str(Path(args.source).resolve()))
    return FeatureService(
        loaded, args.images, arch=loaded.info.arch, config=config, cache_dir=args.cache_dir, model_info=model_info
    )


def check_exposure(args: argparse.Namespace) -> str | None:
    """Why ``args`` may not be served as given (a public bind without a token), or None."""
    from .guard import is_loopback  # noqa: PLC0415

    if not is_loopback(args.host) and not args.token and not args.allow_public:
        return (
            f"--host {args.host} exposes the service beyond this machine: give --token TOKEN (or set ${TOKEN_ENV}) "
            "so that only clients with the token are served, or --allow-public to serve anyone who reaches the port"
        )
    return None


def run_serve(args: argparse.Namespace) -> int:
    problem = check_exposure(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        import uvicorn  # noqa: PLC0415

        from .app import create_app  # noqa: PLC0415
        from .guard import allowed_hosts  # noqa: PLC0415
    except ImportError as e:
        print(
            f"error: fdino serve needs the 'serve' extras ({e.name} is missing): pip install 'fdino[serve]'",
            file=sys.stderr,
        )
        return 2
    if args.images is not None and not args.images.is_dir():
        print(f"error: --images {str(args.images)!r} is not a folder", file=sys.stderr)
        return 2
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    try:
        service = build_service(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if service.index is not None:
        start = time.perf_counter()
        result = service.refresh()
        print(
            f"index: {len(service.index)} images in {args.images} ({result.added} embedded, {result.reused} from "
            f"cache, {len(service.index.skipped)} unreadable skipped) in {time.perf_counter() - start:.1f} s; "
            f"cache {service.index.cache_path}",
            flush=True,
        )
    page = f"http://{args.host}:{args.port}/" + ("?token=TOKEN" if args.token else "")
    print(f"serving {service.arch} on {page} (Ctrl+C stops)", flush=True)
    app = create_app(
        service, allowed_hosts=allowed_hosts(args.host, args.port, args.allow_host), token=args.token, docs=args.docs
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", **service.config.uvicorn_options())
    finally:
        service.close()
    return 0


__all__ = ["register", "run_serve", "build_service", "check_exposure"]
