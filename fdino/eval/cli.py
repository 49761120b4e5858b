"""Command-line front ends: ``fdino eval knn|linear``, ``attention``, ``embed``, ``viz``, ``search``.

`register(subparsers)` adds the commands to the main ``fdino`` parser (`fdino.cli`); each command
sets ``func(args) -> exit code``. ``python -m fdino.eval.cli ...`` runs them stand-alone.
Every command reads its model with `fdino.weights.load_model` and takes the same model arguments
(`fdino.weights.cli_args`): an fdino run or checkpoint, an fdino export, official DINO weights, or
timm weights with ``--arch``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from .knn import PAPER_KS, PAPER_TEMPERATURE

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where the help text already explains them or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        if isinstance(action.default, (list, tuple)):
            return f"{text} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


# --- shared arguments -----------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser, *, optional: bool = False, flag: bool = False) -> None:
    from ..weights.cli_args import add_model_arguments  # noqa: PLC0415

    default = " (default: the model named in the embeddings file)" if flag else ""
    add_model_arguments(p, optional=optional, as_flag=flag, default_help=default)
    g = p.add_argument_group("running")
    g.add_argument("--device", default=_DEVICE, help="torch device")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    g.add_argument("--num-workers", type=int, default=0, help="data loading processes")


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--n-last-blocks",
        type=int,
        default=1,
        help="concatenate the CLS tokens of the last n ViT blocks (paper, linear ViT-S: 4)",
    )
    p.add_argument(
        "--avgpool",
        action="store_true",
        help="append the average of the last block's patch tokens (paper, linear ViT-B)",
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="shapes10",
        help="data set name (shapes10, cifar10, cifar100, stl10, fashion-mnist, imagenet32, imagenet64) or an "
        "image folder with train/ and val/ (or test/) class subfolders",
    )
    p.add_argument(
        "--data-root",
        help="where the data set files are: torchvision's, STL-10 binary, downsampled ImageNet batch files "
        "(default: $FDINO_DATA or ~/.cache/fdino)",
    )
    p.add_argument("--download", action="store_true", help="let torchvision download a missing data set")


def _load_model(args: argparse.Namespace):
    from ..weights.cli_args import model_from_args  # noqa: PLC0415

    return model_from_args(args, device=args.device)


def _split(args: argparse.Namespace, role: str, model=None):
    from ..data import build_dataset  # noqa: PLC0415
    from ..data.sources import canonical_name  # noqa: PLC0415

    if canonical_name(str(args.data)) is not None:  # a named set: generated/stored at its own size
        return build_dataset(args.data, root=args.data_root, split=role, download=args.download)
    # A folder: the size the model sees decides whether its decoded images are cached (small ones only).
    size = model.image_size if model is not None else (getattr(args, "img_size", None) or 32)
    return build_dataset(args.data, root=args.data_root, split=role, download=args.download, image_size=size)


def _features(args, model, source):
    from ..data import EvalTransform  # noqa: PLC0415
    from .features import extract_features  # noqa: PLC0415

    return extract_features(
        model.backbone,
        source.dataset,
        batch_size=args.batch_size,
        device=args.device,
        n_last_blocks=args.n_last_blocks,
        avgpool=args.avgpool,
        num_workers=args.num_workers,
        transform=EvalTransform(model.image_size, mean=model.mean, std=model.std),
    )


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def _friendly(func):
    """Report user errors (bad paths, bad options) as one line and exit code 2, not a traceback."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


# --- commands -------------------------------------------------------------------------------------------
@_friendly
def run_knn(args: argparse.Namespace) -> int:
    from .features import raw_pixel_knn  # noqa: PLC0415
    from .knn import knn_classify  # noqa: PLC0415
    from .stats import representation_stats  # noqa: PLC0415

    if args.model is None and not args.raw_pixels:
        raise ValueError("give a model, or --raw-pixels for the pixel baseline alone")
    model = _load_model(args) if args.model is not None else None
    memory, query = _split(args, "memory", model), _split(args, "query", model)
    report: dict = {"data": args.data, "memory": len(memory), "query": len(query), "temperature": args.temperature}
    if model is not None:
        bank, bank_y = _features(args, model, memory)
        queries, query_y = _features(args, model, query)
        report["features"] = knn_classify(
            bank,
            bank_y,
            queries,
            query_y,
            ks=args.k,
            temperature=args.temperature,
            num_classes=memory.num_classes or None,
            query_chunk=args.query_chunk,
            bank_chunk=args.bank_chunk,
            device=args.device,
        )
        report["feature_stats"] = representation_stats(queries)
    if args.raw_pixels:
        from ..data import EvalTransform  # noqa: PLC0415

        # Pixels in [0, 1], resized only when asked (needed for folders of mixed image sizes).
        transform = EvalTransform(args.img_size, mean=(0.0,) * 3, std=(1.0,) * 3) if args.img_size else None
        report["raw_pixels"] = raw_pixel_knn(
            memory.dataset,
            query.dataset,
            ks=args.k,
            temperature=args.temperature,
            transform=transform,
            device=args.device,
        )
    print(f"k-NN on {args.data}: {len(memory)} memory / {len(query)} query images, T={args.temperature}")
    for name in ("features", "raw_pixels"):
        for k, acc in report.get(name, {}).items():
            print(f"  {name:<10} k={k:<4} top-1 {acc['top1']:6.2f}%  top-5 {acc['top5']:6.2f}%")
    if "feature_stats" in report:  # collapse shows as mean cosine -> 1, effective rank -> 1
        print("  query features: " + ", ".join(f"{k} {v:.3g}" for k, v in report["feature_stats"].items()))
    _write_json(args.json, report)
    return 0


@_friendly
def run_linear(args: argparse.Namespace) -> int:
    from .linear import linear_eval_images, linear_probe  # noqa: PLC0415

    model = _load_model(args)
    memory, query = _split(args, "memory", model), _split(args, "query", model)
    results = {}
    if args.mode == "fast":
        train, train_y = _features(args, model, memory)
        test, test_y = _features(args, model, query)
        for lr in args.lr or [None]:
            r = linear_probe(
                train,
                train_y,
                test,
                test_y,
                epochs=args.epochs,
                batch_size=args.probe_batch_size,
                lr=lr,
                standardize=not args.no_standardize,
                num_classes=memory.num_classes or None,
                device=args.device,
            )
            results[str(lr or "default")] = {k: r[k] for k in ("top1", "top5", "train_top1")}
    else:

        def progress(epoch: int, loss: float) -> None:
            print(f"  epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}", flush=True)

        for lr in args.lr or [None]:
            r = linear_eval_images(
                model.backbone,
                memory.dataset,
                query.dataset,
                image_size=model.image_size,
                mean=model.mean,
                std=model.std,
                epochs=args.epochs,
                batch_size=args.probe_batch_size,
                lr=lr,
                n_last_blocks=args.n_last_blocks,
                avgpool=args.avgpool,
                num_classes=memory.num_classes or None,
                device=args.device,
                num_workers=args.num_workers,
                on_epoch=progress,
            )
            results[str(lr or "default")] = {k: r[k] for k in ("top1", "top5")}
    print(f"linear probe ({args.mode}) on {args.data}: {len(memory)} train / {len(query)} test images")
    for lr, acc in results.items():
        print(f"  lr={lr:<8} top-1 {acc['top1']:6.2f}%  top-5 {acc['top5']:6.2f}%")
    if len(results) > 1:
        print("  (several learning rates: picking the best on the test split overstates accuracy)")
    _write_json(args.json, {"mode": args.mode, "data": args.data, "results": results})
    return 0


def _images_from_args(args, model) -> tuple[torch.Tensor, list[str]]:
    """Normalized evaluation views ``[N, 3, S, S]`` of the files given, or of data set images."""
    from ..data import EvalTransform, load_rgb  # noqa: PLC0415

    transform = EvalTransform(model.image_size, mean=model.mean, std=model.std)
    if args.images:
        return torch.stack([transform(load_rgb(p)) for p in args.images]), [Path(p).stem for p in args.images]
    source = _split(args, args.split, model)
    n = min(args.n, len(source))
    return torch.stack([transform(source.dataset[i][0]) for i in range(n)]), [f"{args.split}-{i}" for i in range(n)]


@_friendly
def run_attention(args: argparse.Namespace) -> int:
    from .attention import save_attention_grid  # noqa: PLC0415

    model = _load_model(args)
    images, names = _images_from_args(args, model)
    out = Path(args.out)
    for image, name in zip(images, names):
        path = save_attention_grid(
            model.backbone,
            image[None].to(args.device),
            out / f"{name}-attention.png",
            mean=model.mean,
            std=model.std,
            mass=args.mass,
        )
        print(f"wrote {path}")
    return 0


@_friendly
def run_embed(args: argparse.Namespace) -> int:
    from ..weights.cli_args import model_args_record  # noqa: PLC0415
    from .embed import embed_folder, save_embeddings  # noqa: PLC0415

    model = _load_model(args)
    emb, skipped = embed_folder(
        model.backbone,
        args.folder,
        image_size=model.image_size,
        mean=model.mean,
        std=model.std,
        batch_size=args.batch_size,
        device=args.device,
        n_last_blocks=args.n_last_blocks,
        avgpool=args.avgpool,
        num_workers=args.num_workers,
    )
    emb.info["model"] = model_args_record(args, str(Path(args.model).resolve()))
    path = save_embeddings(args.out, emb)
    for p, reason in skipped.items():
        print(f"skipped unreadable {p}: {reason}", file=sys.stderr)
    print(f"wrote {path}: {len(emb.paths)} images x {emb.features.shape[1]} features ({len(skipped)} skipped)")
    return 0


@_friendly
def run_search(args: argparse.Namespace) -> int:
    from ..data import load_rgb  # noqa: PLC0415
    from ..data.augment import as_uint8_chw  # noqa: PLC0415
    from .embed import embed_paths, load_embeddings, save_search_grid, search  # noqa: PLC0415

    emb = load_embeddings(args.embeddings)
    stored = emb.info.get("model", {})
    if args.model is None:
        if not stored.get("source"):
            raise ValueError(f"{args.embeddings} does not name its model; pass --model")
        args.model, args.arch, args.which = stored["source"], stored.get("arch"), stored.get("which", "teacher")
        args.patch_size, args.img_size = stored.get("patch_size"), stored.get("img_size")
        args.model_kwargs = stored.get("model_kwargs") or []
    model = _load_model(args)
    size = emb.info.get("image_size", model.image_size)
    feats, kept, skipped = embed_paths(
        model.backbone,
        [args.query],
        image_size=size,
        mean=model.mean,
        std=model.std,
        device=args.device,
        n_last_blocks=emb.info.get("n_last_blocks", 1),
        avgpool=emb.info.get("avgpool", False),
    )
    scores, index = search(feats, emb.features, args.k)
    print(f"top {scores.shape[1]} matches of {args.query} among {len(emb.paths)} images:")
    for s, i in zip(scores[0].tolist(), index[0].tolist()):
        print(f"  {s:.4f}  {emb.paths[i]}")
    if args.out:
        pixels = lambda p: as_uint8_chw(load_rgb(p)).float() / 255.0  # noqa: E731
        path = save_search_grid(
            pixels(args.query), [pixels(emb.paths[i]) for i in index[0].tolist()], scores[0].tolist(), args.out
        )
        print(f"wrote {path}")
    return 0


@_friendly
def run_viz(args: argparse.Namespace) -> int:
    from .tsne import tsne  # noqa: PLC0415
    from .viz import pca, save_patch_pca, save_scatter, subsample  # noqa: PLC0415

    model = _load_model(args)
    source = _split(args, args.split, model)
    feats, labels = _features(args, model, source)
    keep = subsample(len(feats), args.max_points, seed=args.seed)
    feats, labels = feats[keep], labels[keep]
    out = Path(args.out)
    names = list(source.classes)
    if "pca" in args.methods:
        print(f"wrote {save_scatter(pca(feats, 2), labels, out / 'pca.png', title='PCA', class_names=names)}")
    if "tsne" in args.methods:
        points = tsne(feats, perplexity=args.perplexity, iters=args.tsne_iters)
        print(f"wrote {save_scatter(points, labels, out / 'tsne.png', title='t-SNE', class_names=names)}")
    if args.patch_pca > 0:
        from ..data import EvalTransform  # noqa: PLC0415
        from ..models import is_vit  # noqa: PLC0415

        if is_vit(model.backbone):
            transform = EvalTransform(model.image_size, mean=model.mean, std=model.std)
            n = min(args.patch_pca, len(source))
            images = torch.stack([transform(source.dataset[i][0]) for i in range(n)]).to(args.device)
            path = save_patch_pca(
                model.backbone,
                images,
                out / "patch-pca.png",
                mean=model.mean,
                std=model.std,
                foreground=args.foreground,
            )
            print(f"wrote {path}")
        else:
            print("patch PCA skipped: the backbone is not a ViT")
    return 0


# --- registration ---------------------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add ``eval`` (``knn``, ``linear``), ``attention``, ``embed``, ``viz`` and ``search`` to a parser."""
    fmt = _Help
    ev = subparsers.add_parser(
        "eval",
        help="measure a representation: weighted k-NN, linear probe, few-label evaluation",
        description="Evaluate frozen features as in the DINO paper.",
    )
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="{knn,linear,fewshot}")
    ev_sub.required = True

    p = ev_sub.add_parser(
        "knn",
        formatter_class=fmt,
        help="weighted k-NN (paper: T=0.07, k=10/20/100/200)",
        description="Weighted k-NN classification: memory split as the bank, query split as "
        "queries; cosine similarity, votes weighted by exp(sim / T).",
    )
    _add_model_args(p, optional=True)
    _add_data_args(p)
    _add_feature_args(p)
    p.add_argument("--k", type=int, nargs="+", default=list(PAPER_KS), help="numbers of neighbours")
    p.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE, help="vote temperature T")
    p.add_argument("--raw-pixels", action="store_true", help="also report the raw-pixel baseline")
    p.add_argument("--query-chunk", type=int, default=1024, help="queries per similarity block")
    p.add_argument("--bank-chunk", type=int, default=32768, help="bank rows per similarity block")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=run_knn)

    p = ev_sub.add_parser(
        "linear",
        formatter_class=fmt,
        help="linear probe on frozen features",
        description="Linear classifier on frozen features. fast: train on cached features "
        "(one forward pass); paper: SGD on random-resized-crop + flip views through "
        "the frozen backbone for every step (slow, the published protocol).",
    )
    _add_model_args(p)
    _add_data_args(p)
    _add_feature_args(p)
    p.add_argument("--mode", choices=("fast", "paper"), default="fast", help="cached features or augmented images")
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument(
        "--lr",
        type=float,
        nargs="+",
        help="peak learning rate(s), cosine-decayed; several values are a sweep (default: 0.1 on "
        "standardized features in fast mode, 0.001 x batch / 256 in paper mode)",
    )
    p.add_argument("--probe-batch-size", type=int, default=1024, help="probe training batch size")
    p.add_argument(
        "--no-standardize",
        action="store_true",
        help="fast mode: train on raw features (the paper's setting) instead of standardized ones",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=run_linear)

    from ..finetune.cli import add_fewshot_parser  # noqa: PLC0415  (fdino.finetune builds on fdino.eval)

    add_fewshot_parser(ev_sub)

    p = subparsers.add_parser(
        "attention",
        formatter_class=fmt,
        help="CLS self-attention maps of the last block",
        description="Last-block CLS attention per head as heat maps and as the paper's "
        "masks (patches holding --mass of the attention); one PNG per image.",
    )
    _add_model_args(p)
    p.add_argument("images", nargs="*", help="image files (default: the first --n images of --data)")
    _add_data_args(p)
    p.add_argument("--split", default="query", help="data set split for --data images")
    p.add_argument("--n", type=int, default=4, help="number of --data images")
    p.add_argument("--mass", type=float, default=0.6, help="attention mass the masks keep")
    p.add_argument("--out", default="attention", help="output folder")
    p.set_defaults(func=run_attention)

    p = subparsers.add_parser(
        "embed",
        formatter_class=fmt,
        help="features of an image folder to a file",
        description="Embed every image under a folder; writes .safetensors (paths in the "
        "metadata) or .npy (paths in a .json sidecar), chosen by --out's suffix.",
    )
    _add_model_args(p)
    p.add_argument("folder", help="folder of images (class subfolders are stored as labels)")
    _add_feature_args(p)
    p.add_argument("--out", required=True, help="output file: NAME.safetensors or NAME.npy")
    p.set_defaults(func=run_embed)

    p = subparsers.add_parser(
        "search",
        formatter_class=fmt,
        help="most similar images in an embedded folder",
        description="Top-k cosine matches of a query image among embeddings from "
        "'fdino embed', printed and drawn as a PNG grid with scores.",
    )
    p.add_argument("embeddings", help="file written by 'fdino embed'")
    p.add_argument("query", help="query image file")
    p.add_argument("--k", type=int, default=8, help="number of matches")
    p.add_argument("--out", default="search.png", help="output PNG ('' for none)")
    _add_model_args(p, flag=True)
    p.set_defaults(func=run_search)

    p = subparsers.add_parser(
        "viz",
        formatter_class=fmt,
        help="PCA / t-SNE plots and patch-feature PCA",
        description="Scatter plots of features coloured by label (PCA, exact t-SNE) and the "
        "first 3 principal components of patch features as RGB.",
    )
    _add_model_args(p)
    _add_data_args(p)
    _add_feature_args(p)
    p.add_argument("--split", default="query", help="data set split to plot")
    p.add_argument("--methods", nargs="+", choices=("pca", "tsne"), default=["pca", "tsne"], help="scatter plots")
    p.add_argument("--max-points", type=int, default=2000, help="subsample to this many points")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--tsne-iters", type=int, default=750, help="t-SNE iterations (250 exaggerated)")
    p.add_argument("--patch-pca", type=int, default=8, help="images in the patch-PCA figure (0: none)")
    p.add_argument("--foreground", action="store_true", help="patch PCA of the foreground only (DINOv2 style)")
    p.add_argument("--seed", type=int, default=0, help="subsampling seed")
    p.add_argument("--out", default="viz", help="output folder")
    p.set_defaults(func=run_viz)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fdino", description="fdino evaluation and analysis commands")
    sub = parser.add_subparsers(dest="command", metavar="{eval,attention,embed,search,viz}")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
