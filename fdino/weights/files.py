"""Reading weight files safely, and unwrapping whatever they hold to one flat backbone state dict.

Only ``weights_only`` loading is used, so a file can never execute code. The one class
allow-listed is ``argparse.Namespace``: the official DINO training checkpoints keep their
command-line arguments under ``"args"`` (a plain attribute bag with no reduce hook).
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
WHICH = ("teacher", "student")
# Wrappers in front of backbone key names: DDP (``module.``), torch.compile (``_orig_mod.``), the
# official MultiCropWrapper and fdino's DinoNetwork (``backbone.``), some SSL libraries (``encoder.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")
# Entries of a checkpoint that hold a state dict one level down.
NESTED_KEYS = ("state_dict", "model", "backbone")


def check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which={which!r} is invalid: allowed 'teacher' (the one the paper evaluates) or 'student'")


def torch_load_safe(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (plus `SAFE_GLOBALS`), memory-mapped when possible."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            try:  # mmap: peeking at a multi-GB checkpoint costs no memory and almost no time
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise ValueError(f"{path} is not a readable weights file ({err})") from err
        raise ValueError(
            f"{path} holds pickled Python objects (e.g. a whole nn.Module), which are not loaded "
            f"for safety; save its state_dict() instead"
        ) from err


def read_weights_file(path: str | Path) -> Any:
    """The contents of a ``.safetensors`` file (a flat dict of tensors) or a torch file (anything)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))
    return torch_load_safe(path)


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove every leading wrapper prefix (`WRAPPER_PREFIXES`, repeatedly) from each key."""
    out = {}
    for name, tensor in state.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name[len(next(p for p in WRAPPER_PREFIXES if name.startswith(p))) :]
        out[name] = tensor
    return out


def unwrap_state_dict(data: Any, which: str = "teacher") -> dict[str, torch.Tensor]:
    """One flat ``{timm-style name: tensor}`` dict from a loaded file.

    Looks at ``data[which]`` (training checkpoints hold a ``"teacher"`` and a ``"student"``), then
    one level into `NESTED_KEYS` while no state dict is found yet, and strips `WRAPPER_PREFIXES`.
    Keys the backbone has no place for (a projection head, a classifier) are left for the model
    builder to drop.
    """
    check_which(which)
    found = data
    if isinstance(found, Mapping) and isinstance(found.get(which), Mapping):
        found = found[which]
    for key in NESTED_KEYS:
        if isinstance(found, Mapping) and not is_state_dict(found) and isinstance(found.get(key), Mapping):
            found = found[key]
    if not is_state_dict(found):
        held = sorted(map(str, data))[:12] if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(
            f"no state dict of tensors found (looked at '{which}', {list(NESTED_KEYS)} and the top "
            f"level; the file holds {held})"
        )
    return strip_prefixes(found)
