"""Starting a training run from a model's backbone weights (``fdino train --init-weights SOURCE``).

The source is anything `load_model` reads (an fdino run, checkpoint or export, official DINO
weights, timm weights for the run's ``arch``). Its backbone must fit the run's exactly: every
parameter and buffer by name, with equal shapes, none left over. The student and the teacher both
start from it (the paper's teacher starts as a copy of the student); the projection head, the
optimizer moments and the center start fresh.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import DinoConfig
from ..state import TrainState
from .load import LoadedModel, load_model

PREFIX = "backbone."  # where the backbone's tensors sit in TrainState.student / student_buffers


def load_start_weights(source: str | Path | Mapping[str, Any], cfg: DinoConfig) -> LoadedModel:
    """The backbone of ``source`` read as ``fdino knn --model SOURCE --arch cfg.arch`` would, but strict:
    weights the backbone has no place for are an error. Plain weights are built as ``cfg.arch`` with
    ``cfg.backbone_kwargs``; ViT patch size and position table come from the weights themselves."""
    with warnings.catch_warnings():
        # An fdino source names its own architecture: the run's arch is only needed for plain weights.
        warnings.filterwarnings("ignore", message=r"arch=.* ignored: .* is an fdino model")
        try:
            return load_model(source, arch=cfg.arch, model_kwargs=dict(cfg.backbone_kwargs), device="cpu", strict=True)
        except ValueError as err:
            raise ValueError(
                f"--init-weights {source}: {err}. For fdino train: make the run's backbone the weights' with "
                "--arch, --patch-size, --img-size and --backbone-kwargs (e.g. embed_dim=384,depth=12,num_heads=6)"
            ) from err


def start_from_weights(state: TrainState, source: str | Path | Mapping[str, Any]) -> TrainState:
    """``state`` (a fresh one) with the student's and the teacher's backbone taken from ``source``.

    Every backbone parameter and buffer of ``state`` must be in the source with the same shape, and
    the source must have nothing else; else a ValueError names the tensors, both shapes and the
    settings to change. Tensors are copied (no storage shared between student, teacher and source)
    in the state's dtype and device. The head, the optimizer state and the center stay as they are.
    """
    loaded = load_start_weights(source, state.cfg)
    weights = {**dict(loaded.backbone.named_parameters()), **dict(loaded.backbone.named_buffers())}
    check_fits(state, weights, loaded, source)

    def take(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: weights[k[len(PREFIX) :]].detach().to(dtype=v.dtype, device=v.device, copy=True)
            if k.startswith(PREFIX)
            else v
            for k, v in tree.items()
        }

    return state.replace(
        student=take(state.student),
        student_buffers=take(state.student_buffers),
        teacher=take(state.teacher),
        teacher_buffers=take(state.teacher_buffers),
    )


def check_fits(state: TrainState, weights: Mapping[str, torch.Tensor], loaded: LoadedModel, source: Any) -> None:
    """Raise a ValueError unless ``weights`` has exactly the run's backbone tensors, shape for shape."""
    own = {k[len(PREFIX) :]: v for k, v in {**state.student, **state.student_buffers}.items() if k.startswith(PREFIX)}
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    wrong = [k for k in sorted(set(own) & set(weights)) if own[k].shape != weights[k].shape]
    if not (missing or extra or wrong):
        return
    problems = [f"{k}: source {tuple(weights[k].shape)}, run {tuple(own[k].shape)}" for k in wrong[:6]]
    if missing:
        problems.append(f"the source lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"the run has no place for {extra[:6]}{' ...' if len(extra) > 6 else ''}")
    raise ValueError(
        f"--init-weights {source}: the source's backbone does not fit this run's "
        f"({len(wrong)} shape mismatches, {len(missing)} missing, {len(extra)} extra): {'; '.join(problems)}. "
        f"Start the run with the source's architecture: {source_settings(loaded)}"
    )


def source_settings(loaded: LoadedModel) -> str:
    """The ``fdino train`` flags that build the source's backbone (what the error tells the user to pass)."""
    kwargs = {k: v for k, v in loaded.info.model_kwargs.items() if k not in ("dynamic_img_size", "drop_path_rate")}
    flags = [f"--arch {loaded.info.arch}"]
    flags += [f"--{k.replace('_', '-')} {kwargs.pop(k)}" for k in ("patch_size", "img_size") if k in kwargs]
    if kwargs:
        flags.append("--backbone-kwargs " + ",".join(f"{k}={v}".replace(" ", "") for k, v in kwargs.items()))
    return " ".join(flags) + " (a ViT's --img-size sizes its position table; other crop sizes interpolate it)"


__all__ = ["check_fits", "load_start_weights", "source_settings", "start_from_weights"]
