"""``fdino export`` and ``fdino quantize``: argparse wiring (the lead's `fdino.cli` calls `register`).

Each command is ``func(args) -> int`` (0 success, 1 a check failed, 2 bad input); all printing
happens here, the library functions return values.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

FORMATS = ("safetensors", "onnx")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    from ..weights.cli_args import add_model_arguments  # noqa: PLC0415

    add_model_arguments(p, dest="source")


def _add_knn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="shapes10",
        help="data set for the k-NN comparison: a built-in name or an "
        "image folder (default: shapes10, the built-in 32 px set)",
    )
    p.add_argument(
        "--n-memory",
        type=int,
        default=None,
        help="use the first N memory-bank (train) images (default: all; bound it for large models on a CPU)",
    )
    p.add_argument("--n-query", type=int, default=None, help="use the first N query (test) images (default: all)")
    p.add_argument("--k", type=int, default=20, help="neighbours of the weighted k-NN vote (default: 20, as the paper)")
    p.add_argument("--bench-batch", type=int, default=64, help="images per timed forward (default: 64)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch and ONNX Runtime alike (default: PyTorch's current setting)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``quantize`` subcommands."""
    p = subparsers.add_parser(
        "export",
        help="export the backbone to safetensors (+ JSON config) and ONNX, verified with onnxruntime",
        description="Export a trained backbone (the teacher by default) to safetensors with its config in the "
        "metadata and a sidecar .json, and to ONNX (dynamic batch; dynamic image size for CNNs and "
        "ViTs built with dynamic_img_size). The ONNX model is run with onnxruntime on the CPU and its "
        "features compared with PyTorch (cosine >= 0.9999 or the command fails). --int8 also writes "
        "a dynamically quantized int8 ONNX model and measures its k-NN top-1 change and speed-up. "
        "--prune sets a fraction of the Linear/Conv2d weights to zero first (exports keep their format and "
        "load as usual) and reports the sparsity, k-NN top-1 change, forward time and compressed size.",
    )
    _add_source_args(p)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: RUN_DIR/export for run folders, else SOURCE_STEM-export beside it)",
    )
    p.add_argument(
        "--formats", default="safetensors,onnx", help="comma-separated subset of safetensors,onnx (default: both)"
    )
    p.add_argument(
        "--fixed-size",
        action="store_true",
        help="fix H and W (the model's input size, --img-size) in the ONNX graph; the batch stays dynamic",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's choice)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write backbone.int8.onnx (onnxruntime dynamic int8) and print its k-NN top-1 change and speed-up",
    )
    p.add_argument(
        "--prune",
        type=float,
        default=None,
        metavar="FRACTION",
        help="prune before exporting: zero this fraction (0 < FRACTION < 1) of every Linear/Conv2d weight tensor "
        "by L1 magnitude, per layer (norms, biases, embeddings untouched); prints sparsity, k-NN top-1 change, "
        "forward time and zlib-compressed size (zeros shrink files only when compressed)",
    )
    p.add_argument(
        "--prune-structured",
        action="store_true",
        help="with --prune: zero whole attention heads, MLP units and conv output channels (L2 norm) instead of "
        "single weights; masks only: the tensors keep their shapes (so exports load as usual) and dense kernels "
        "still compute the zeros; the printed forward times show what it buys",
    )
    _add_knn_args(p)
    p.set_defaults(func=run_export)

    q = subparsers.add_parser(
        "quantize",
        help="dynamic int8 quantization for CPU inference: k-NN top-1 change and speed-up",
        description="Quantize the Linear layers to int8 (dynamic quantization: int8 weights, activations "
        "quantized at run time) and compare with fp32 on a data set: weighted k-NN top-1 and the "
        "time of one forward. Backends: onnxruntime (quantizes the ONNX export; the one to deploy) "
        "and torch (torch.ao.quantization.quantize_dynamic, deprecated in PyTorch but working).",
    )
    _add_source_args(q)
    q.add_argument(
        "--backend",
        choices=("onnxruntime", "torch", "both"),
        default="both",
        help="quantization backend(s) to measure (default: both)",
    )
    q.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the fp32 and int8 ONNX files (default: a temporary folder, deleted afterwards)",
    )
    _add_knn_args(q)
    q.set_defaults(func=run_quantize)


def _default_out(source: Path) -> Path:
    return source / "export" if source.is_dir() else source.with_name(source.stem + "-export")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _missing_extras() -> list[str]:
    """Packages of the ``export`` extras that are not installed."""
    import importlib.util  # noqa: PLC0415

    return [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]


def _extras_error() -> int | None:
    missing = _missing_extras()
    if missing:
        return _err(
            f"ONNX export needs the 'export' extras (missing: {', '.join(missing)}): pip install 'fdino[export]'"
        )
    return None


def _load(args: argparse.Namespace):
    from ..weights.cli_args import model_from_args  # noqa: PLC0415

    return model_from_args(args, dest="source")


def _knn_data(args: argparse.Namespace, loaded) -> tuple[Any, Any, Any]:
    """``(memory, query, transform)`` for the k-NN comparison."""
    from torch.utils.data import Subset  # noqa: PLC0415

    from ..data import EvalTransform, build_dataset  # noqa: PLC0415
    from ..data.sources import canonical_name  # noqa: PLC0415

    out = []
    for role, n in (("memory", args.n_memory), ("query", args.n_query)):
        if canonical_name(str(args.data)) == "shapes10":
            ds = build_dataset(args.data, split=role, n=n).dataset  # generated: only what is asked for
        else:
            ds = build_dataset(args.data, split=role).dataset
            ds = Subset(ds, range(min(n, len(ds)))) if n else ds
        out.append(ds)
    return out[0], out[1], EvalTransform(loaded.image_size, mean=loaded.mean, std=loaded.std)


def _set_threads(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def _size(path: Path, *, compressed: bool = False) -> str:
    """``"1.23 MB"``, with the zlib-compressed size when asked (what the zeros of a pruned model save)."""
    from .prune import compressed_size  # noqa: PLC0415

    text = f"{path.stat().st_size / 1e6:.2f} MB"
    return (text + f", zlib {compressed_size(path.read_bytes()) / 1e6:.2f} MB") if compressed else text


def _export_and_check(
    loaded, out: Path, threads: int, *, dynamic: bool = True, opset: int | None = None, compressed: bool = False
):
    """Write ``backbone.onnx``, compare with PyTorch, print the result; ``(path, check, onnx model)``."""
    from .onnx_export import OnnxBackbone, check_shapes, compare_onnx, export_onnx, onnx_session  # noqa: PLC0415

    backbone, size = loaded.backbone, loaded.image_size
    path = export_onnx(backbone, out / "backbone.onnx", image_size=size, dynamic_size=dynamic, opset=opset)
    onnx_model = OnnxBackbone(onnx_session(path, threads=threads), backbone.num_features)
    check = compare_onnx(backbone, onnx_model, check_shapes(backbone, size, dynamic))
    verdict = "ok" if check.ok else "FAILED"
    print(f"onnx: {path} ({_size(path, compressed=compressed)})")
    print(
        f"onnx check (onnxruntime CPU vs PyTorch, inputs {', '.join('x'.join(map(str, s)) for s in check.shapes)}): "
        f"min cosine {check.min_cosine:.7f} (>= 0.9999: {verdict}), max |diff| {check.max_abs_diff:.2e}"
    )
    return path, check, onnx_model


def _load_with_threads(args: argparse.Namespace):
    """The model named by the arguments and the thread count now set; (None, 0) after printing why not."""
    try:
        loaded = _load(args)
    except (FileNotFoundError, ValueError) as e:
        _err(str(e))
        return None, 0
    return loaded, _set_threads(args)


def run_export(args: argparse.Namespace) -> int:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        return _err(f"--formats {args.formats!r}: allowed a comma-separated subset of {','.join(FORMATS)}")
    if args.int8 and "onnx" not in formats:
        return _err("--int8 quantizes the ONNX export; add onnx to --formats")
    pruning = args.prune is not None
    if pruning and not 0 < args.prune < 1:
        return _err(f"--prune {args.prune:g}: allowed 0 < FRACTION < 1 (the fraction of the weights set to zero)")
    if args.prune_structured and not pruning:
        return _err("--prune-structured needs --prune FRACTION (0 < FRACTION < 1)")
    if "onnx" in formats and (code := _extras_error()) is not None:
        return code
    loaded, threads = _load_with_threads(args)
    if loaded is None:
        return 2
    out = args.out or _default_out(Path(args.source))
    out.mkdir(parents=True, exist_ok=True)
    info = loaded.info
    print(f"model: {info.arch} ({info.which}), feature dim {info.feature_dim}, input {info.image_size} px")
    data = _knn_data(args, loaded) if pruning or args.int8 else None
    dense = loaded
    if pruning:
        loaded = _prune(dense, args, data, threads)  # what every format below exports
    if "safetensors" in formats:
        from ..weights import export_safetensors  # noqa: PLC0415

        st, sidecar = export_safetensors(loaded.backbone, out / "backbone.safetensors", info)
        print(f"safetensors: {st} ({_size(st, compressed=pruning)}), config: {sidecar}")
        if pruning:
            with tempfile.TemporaryDirectory(prefix="fdino-export-") as tmp:
                unpruned, _ = export_safetensors(dense.backbone, Path(tmp) / "backbone.safetensors", info)
                print(f"unpruned safetensors for comparison: {_size(unpruned, compressed=True)}")
    status = 0
    if "onnx" in formats:
        path, check, onnx_fp32 = _export_and_check(
            loaded, out, threads, dynamic=not args.fixed_size, opset=args.opset, compressed=pruning
        )
        status = 0 if check.ok else 1
        if args.int8:
            status = max(status, _int8_onnxruntime(loaded, path, onnx_fp32, args, threads, data=data))
    return status


def _prune(loaded, args: argparse.Namespace, data, threads: int):
    """``loaded`` with its backbone pruned as ``--prune`` says; prints the sparsity and what it costs."""
    from .prune import prune_backbone  # noqa: PLC0415
    from .quantize import compare_models  # noqa: PLC0415

    backbone, stats = prune_backbone(loaded.backbone, args.prune, structured=args.prune_structured)
    print(stats.summary())
    memory, query, transform = data
    scheme = "structured" if args.prune_structured else "unstructured"
    report = compare_models(
        loaded.backbone,
        backbone,
        memory,
        query,
        transform=transform,
        label=f"prune {100 * args.prune:g}% ({scheme}, torch)",
        names=("dense", "pruned"),
        k=args.k,
        bench_batch=args.bench_batch,
    )
    print(f"{report.summary()} [{_data_note(args, memory, query, threads)}]")
    return dataclasses.replace(loaded, backbone=backbone)


def _data_note(args: argparse.Namespace, memory, query, threads: int) -> str:
    return (
        f"{args.data}: {len(memory)} memory / {len(query)} query images, {threads} thread{'s' if threads != 1 else ''}"
    )


def _int8_onnxruntime(loaded, fp32_path: Path, onnx_fp32, args: argparse.Namespace, threads: int, *, data=None) -> int:
    from .onnx_export import OnnxBackbone, onnx_session, quantize_onnx  # noqa: PLC0415
    from .quantize import compare_int8  # noqa: PLC0415

    pruned = getattr(args, "prune", None) is not None
    int8_path = quantize_onnx(fp32_path, fp32_path.with_name("backbone.int8.onnx"))
    print(f"int8 onnx: {int8_path} ({_size(int8_path, compressed=pruned)})")
    onnx_int8 = OnnxBackbone(onnx_session(int8_path, threads=threads), loaded.backbone.num_features)
    memory, query, transform = data or _knn_data(args, loaded)
    report = compare_int8(
        onnx_fp32,
        onnx_int8,
        memory,
        query,
        transform=transform,
        backend="onnxruntime",
        k=args.k,
        bench_batch=args.bench_batch,
    )
    of = ", of the pruned model" if pruned else ""
    print(f"{report.summary()} [{_data_note(args, memory, query, threads)}{of}]")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    if args.backend in ("onnxruntime", "both") and (code := _extras_error()) is not None:
        return code
    loaded, threads = _load_with_threads(args)
    if loaded is None:
        return 2
    backends = ("onnxruntime", "torch") if args.backend == "both" else (args.backend,)
    print(
        f"model: {loaded.info.arch} ({loaded.info.which}), input {loaded.info.image_size} px; "
        f"{args.data}, {threads} thread{'s' if threads != 1 else ''}"
    )
    status = 0
    if "onnxruntime" in backends:
        with tempfile.TemporaryDirectory(prefix="fdino-quantize-") as tmp:
            out = args.out or Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            path, check, onnx_fp32 = _export_and_check(loaded, out, threads)
            status = 0 if check.ok else 1
            status = max(status, _int8_onnxruntime(loaded, path, onnx_fp32, args, threads))
    if "torch" in backends:
        from .quantize import compare_int8, quantize_torch  # noqa: PLC0415

        backbone = loaded.backbone.cpu()
        try:
            int8 = quantize_torch(backbone)
        except RuntimeError as e:
            print(f"torch int8: unavailable: {e}", file=sys.stderr)
            return 1
        print("torch int8: torch.ao.quantization.quantize_dynamic (deprecated upstream; use onnxruntime to deploy)")
        memory, query, transform = _knn_data(args, loaded)
        report = compare_int8(
            backbone, int8, memory, query, transform=transform, backend="torch", k=args.k, bench_batch=args.bench_batch
        )
        print(f"{report.summary()} [{len(memory)} memory / {len(query)} query images]")
    return status


__all__ = ["register", "run_export", "run_quantize"]
