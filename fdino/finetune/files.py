"""A fine-tuned (or supervised) model on disk, and back.

A model folder holds:
  * ``model.safetensors``: the backbone as an fdino export (`fdino.weights.export_safetensors`), so
    every command that takes a model (eval, attention, embed, export, serve, finetune) loads the
    folder through `fdino.weights.load_model`;
  * ``classifier.safetensors``: the linear head (``weight [C, D]``, ``bias [C]``; class names in the
    metadata), which `load_classifier` puts back on the backbone;
  * ``finetune.json``: the config, the source, the label subset, accuracies and the curve;
  * ``curve.png``: training loss and test top-1 against the epoch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..eval.linear import LinearProbe
from ..weights import ExportInfo, LoadedModel, export_safetensors, load_model
from ..weights.export_file import FOLDER_MODEL_FILE

HEAD_FILE = "classifier.safetensors"
REPORT_FILE = "finetune.json"
CURVE_FILE = "curve.png"


class Classifier(NamedTuple):
    """A backbone and its linear head: what a fine-tune or the supervised baseline produced."""

    model: LoadedModel
    head: LinearProbe
    classes: tuple[str, ...]
    report: dict[str, Any]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[B, 3, S, S]`` (the model's size and normalization) -> ``[B, C]``."""
        with torch.no_grad():
            feats = self.model.backbone(images.to(next(self.model.backbone.parameters()).device))
        return self.head.logits(feats.cpu())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices ``[B]``."""
        return self.logits(images).argmax(dim=1)


def save_curve(path: Path, curve: list[dict[str, float]], title: str) -> Path:
    import matplotlib  # noqa: PLC0415  (slow import, only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after choosing the headless backend)

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot([c["epoch"] for c in curve], [c["loss"] for c in curve], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss")
    evaluated = [c for c in curve if "top1" in c]
    ax_acc.plot([c["epoch"] for c in evaluated], [c["top1"] for c in evaluated], marker="o", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_classifier(
    out: str | Path,
    backbone: torch.nn.Module,
    head: LinearProbe,
    info: ExportInfo,
    *,
    classes: Sequence[str],
    report: dict[str, Any],
    curve: list[dict[str, float]] | None = None,
) -> dict[str, Path]:
    """Write a model folder (see the module docstring); returns the paths by role."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = dataclasses.replace(info, feature_dim=int(head.weight.shape[1]))
    model_path, sidecar = export_safetensors(backbone, out / FOLDER_MODEL_FILE, info)
    head_path = out / HEAD_FILE
    tensors = {"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()}
    save_file(tensors, str(head_path), metadata={"classes": json.dumps(list(classes))})
    report_path = out / REPORT_FILE
    report_path.write_text(json.dumps({**report, "curve": curve or []}, indent=2) + "\n")
    paths = {"model": model_path, "model_info": sidecar, "head": head_path, "report": report_path}
    if curve:
        paths["curve"] = save_curve(out / CURVE_FILE, curve, str(report.get("title", out.name)))
    return paths


def load_classifier(folder: str | Path, *, device: str | torch.device = "cpu") -> Classifier:
    """The backbone (through `load_model`) and the head of a folder written by `save_classifier`."""
    from safetensors import safe_open  # noqa: PLC0415

    folder = Path(folder)
    head_path = folder / HEAD_FILE
    if not head_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {HEAD_FILE}: not a folder written by 'fdino finetune' or 'fdino supervised'"
        )
    model = load_model(folder, device=device)
    with safe_open(str(head_path), framework="pt") as f:
        head = LinearProbe(f.get_tensor("weight"), f.get_tensor("bias"))
        classes = tuple(json.loads((f.metadata() or {}).get("classes", "[]")))
    report_path = folder / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if head.weight.shape[1] != model.info.feature_dim:
        raise ValueError(
            f"{head_path} expects {head.weight.shape[1]}-d features but the backbone gives "
            f"{model.info.feature_dim}: the folder mixes files of two models; write it again"
        )
    return Classifier(model, head, classes, report)


__all__ = ["CURVE_FILE", "Classifier", "HEAD_FILE", "REPORT_FILE", "load_classifier", "save_classifier", "save_curve"]
