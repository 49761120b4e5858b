"""The model arguments every command shares (``fdino eval ...``, ``export``, ``quantize``, ``serve``):
one list of sources in the help, one set of flags, one call to `load_model`."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from .load import MODEL_SOURCES_HELP, LoadedModel, load_model


def add_model_arguments(
    p: argparse.ArgumentParser,
    *,
    dest: str = "model",
    optional: bool = False,
    as_flag: bool = False,
    default_help: str = "",
) -> None:
    """The model source (positional ``dest``, or ``--model`` with ``as_flag``) and how to read it.
    ``optional``: the positional may be left out; ``default_help`` says what happens then."""
    if as_flag:
        p.add_argument("--model", dest=dest, help=MODEL_SOURCES_HELP + default_help)
    else:
        p.add_argument(
            dest, metavar=dest.upper(), nargs="?" if optional else None, help=MODEL_SOURCES_HELP + default_help
        )
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        help="timm model name for weights that do not name their architecture "
        "(e.g. vit_small_patch16_224; official DINO weights: recognized when omitted)",
    )
    g.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="network of a training checkpoint (default: teacher, the one the paper evaluates)",
    )
    g.add_argument("--patch-size", type=int, help="ViT patch size of plain weights (default: read off the weights)")
    g.add_argument(
        "--img-size",
        type=int,
        help="input resolution (default: the training crop size / the ViT's img_size; 224 for CNNs)",
    )
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra timm.create_model arguments for plain weights, e.g. embed_dim=384 depth=12",
    )


def parse_model_kwargs(items: list[str]) -> dict[str, Any]:
    """``["depth=4", "act=gelu"]`` -> ``{"depth": 4, "act": "gelu"}`` (Python literals where they parse)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs entry {item!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def model_from_args(args: argparse.Namespace, *, dest: str = "model", device: str = "cpu") -> LoadedModel:
    """`load_model` with the arguments `add_model_arguments` defined."""
    return load_model(
        getattr(args, dest),
        arch=args.arch,
        which=args.which,
        device=device,
        patch_size=args.patch_size,
        img_size=args.img_size,
        model_kwargs=parse_model_kwargs(args.model_kwargs),
    )


def model_args_record(args: argparse.Namespace, source: str) -> dict[str, Any]:
    """What `model_from_args` needs to load the same model again (stored beside embeddings)."""
    return {
        "source": source,
        "arch": args.arch,
        "which": args.which,
        "patch_size": args.patch_size,
        "img_size": args.img_size,
        "model_kwargs": list(args.model_kwargs),
    }


__all__ = ["add_model_arguments", "model_args_record", "model_from_args", "parse_model_kwargs"]
