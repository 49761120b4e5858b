"""fdino's backbone export: safetensors weights with what it takes to rebuild the model in the metadata.

``backbone.safetensors`` holds the backbone's parameters and buffers (timm key names) and, in the
file's metadata (string -> string), the JSON of `ExportInfo` under ``"fdino"``. The same JSON is
written to a sidecar ``backbone.json`` for people and tools that do not read safetensors headers.
`fdino.weights.load_model` rebuilds the module from the file alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD

FORMAT = "fdino-backbone-v1"
METADATA_KEY = "fdino"
# A model folder that is not a training run (what `fdino finetune` and `fdino supervised` write)
# holds its backbone export under this name; `load_model(folder)` reads it.
FOLDER_MODEL_FILE = "model.safetensors"


@dataclass(frozen=True, kw_only=True)
class ExportInfo:
    """How to rebuild and feed a backbone: what an export stores, and what `load_model` reports."""

    arch: str
    """timm model name."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``timm.create_model(arch, num_classes=0, **model_kwargs)``."""
    dino_config: dict[str, Any] | None = None
    """The training `DinoConfig` (``to_dict``) for fdino checkpoints, None for other sources."""
    which: str = "teacher"
    """Which network of the checkpoint it is."""
    image_size: int = 224
    """Evaluation resolution (input side in pixels)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Normalization mean of the inputs."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Normalization standard deviation of the inputs."""
    feature_dim: int = 0
    """Width of the feature the backbone returns."""
    format: str = FORMAT
    """File format tag."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExportInfo:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"not an fdino backbone export (format {data.get('format')!r}, expected {FORMAT!r})")
        for key in ("mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)


def export_safetensors(backbone: nn.Module, path: str | Path, info: ExportInfo) -> tuple[Path, Path]:
    """Write ``path`` (.safetensors: weights + metadata) and its sidecar ``.json``; returns both."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Contiguous private copies: safetensors refuses views and tensors sharing storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: info.to_json(), "format": FORMAT})
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps(json.loads(info.to_json()), indent=2, sort_keys=True) + "\n")
    return path, sidecar


def read_export_info(path: str | Path) -> ExportInfo | None:
    """The `ExportInfo` in a safetensors file's metadata, or None for other safetensors files."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return ExportInfo.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else None


__all__ = ["ExportInfo", "FOLDER_MODEL_FILE", "FORMAT", "METADATA_KEY", "export_safetensors", "read_export_info"]
