"""What a sweep trains: a base config, variants (named overrides or a grid), seeds, a budget.

    name = "teacher-temperature"       # default: the file's stem
    preset = "small32_resnet"          # the base DinoConfig
    seeds = [0, 1, 2]                  # every variant runs once per seed (same data order per seed)

    [config]                           # DinoConfig fields for every variant (on top of the preset)
    epochs = 4

    [options]                          # TrainOptions for every run (the budget: budget = "20m", max_steps)
    data = "shapes10"
    eval_every = 100

    [grid]                             # a grid: every combination is a variant ...
    teacher_temp = [0.02, 0.04, 0.07]

    [[variants]]                       # ... or named variants (either, or both: grid first)
    name = "no centering"
    centering = "none"

The built-in studies (`STUDIES`) are the paper's ablations as variant lists on any base config.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import check_int
from ..config import DinoConfig
from ..config_file import checked_fields, read_settings
from ..presets import PRESETS
from ..train import TrainOptions

Overrides = tuple[tuple[str, Any], ...]
# How a sweep trains variants that can batch (fdino.sweep.runner.run_sweep(batched=...)).
BATCHED_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Variant:
    """One arm of a sweep: a name and the DinoConfig fields it changes."""

    name: str
    overrides: Overrides = ()


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A whole sweep; `runs` yields every (variant, seed, config, options) it trains."""

    name: str
    """Name of the sweep (titles of the report)."""
    preset: str = "small32_resnet"
    """Base preset (see fdino.presets.PRESETS)."""
    config: Overrides = ()
    """DinoConfig overrides applied to the preset for every variant."""
    options: Overrides = ()
    """TrainOptions for every run (run_dir is set per run by the sweep)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds (DinoConfig.seed: initialization, augmentation and data order) run for every variant."""
    variants: tuple[Variant, ...] = (Variant("default"),)
    """The arms of the sweep, in report order."""
    grid: Overrides = ()
    """The grid's axes (field, values) when the variants came from a grid: the report draws a heat map."""
    study: str | None = None
    """The built-in study this spec was made from, if any (the report quotes the paper's finding)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"SweepSpec.preset={self.preset!r} is unknown; allowed: {sorted(PRESETS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"SweepSpec.seeds={self.seeds!r}: give at least one seed, each once")
        for seed in self.seeds:
            check_int("SweepSpec.seeds[i]", seed, lo=0)
        names = [v.name for v in self.variants]
        if not names or len(set(names)) != len(names) or not all(names):
            raise ValueError(
                f"SweepSpec.variants: give at least one variant, each with its own non-empty name: {names}"
            )
        if "run_dir" in dict(self.options):
            raise ValueError("SweepSpec.options: run_dir is set by the sweep (one folder per variant and seed)")
        list(self.runs())  # builds every variant's config and options: they fail now, not hours into the sweep

    def base_config(self) -> DinoConfig:
        return PRESETS[self.preset]().replace(**dict(self.config))

    def runs(self) -> Iterator[tuple[Variant, int, DinoConfig, TrainOptions]]:
        base = self.base_config()
        for variant in self.variants:
            try:
                cfg = base.replace(**dict(variant.overrides))
            except (TypeError, ValueError) as err:
                raise ValueError(f"sweep variant {variant.name!r}: {err}") from None
            opts = TrainOptions(**dict(self.options))
            for seed in self.seeds:
                yield variant, seed, cfg.replace(seed=seed), opts


def variant_name(overrides: Overrides) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides) or "default"


def grid_variants(axes: Overrides) -> tuple[Variant, ...]:
    """Every combination of the axes' values, first axis slowest."""
    names = [name for name, _ in axes]
    combos = itertools.product(*(values for _, values in axes))
    return tuple(Variant(variant_name(tuple(zip(names, combo))), tuple(zip(names, combo))) for combo in combos)


def load_spec(path: str | Path) -> SweepSpec:
    """A `SweepSpec` from a TOML or JSON file (see the module docstring); errors name the key."""
    path = Path(path)
    data = read_settings(path)
    allowed = {"name", "preset", "seeds", "config", "options", "grid", "variants"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} at the top level; allowed: {sorted(allowed)}")
    config = checked_fields(path, "config", DinoConfig, data.get("config", {}))
    options = checked_fields(path, "options", TrainOptions, data.get("options", {}))
    grid_table = data.get("grid", {})
    for field, values in grid_table.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: [grid] {field} must be a non-empty list of values, got {values!r}")
    grid = tuple(
        (f, tuple(checked_fields(path, "grid", DinoConfig, {f: v})[f] for v in vs)) for f, vs in grid_table.items()
    )
    variants = list(grid_variants(grid)) if grid else []
    for i, entry in enumerate(data.get("variants", [])):
        entry = dict(entry)
        name = entry.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f'{path}: [[variants]] entry {i} needs a name = "..."')
        variants.append(Variant(name, tuple(checked_fields(path, f"variants.{name}", DinoConfig, entry).items())))
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list):
        raise ValueError(f"{path}: seeds = {seeds!r} must be a list of integers")
    return SweepSpec(
        name=str(data.get("name", path.stem)),
        preset=data.get("preset", "small32_resnet"),
        config=tuple(config.items()),
        options=tuple(options.items()),
        seeds=tuple(seeds),
        variants=tuple(variants) or (Variant("default"),),
        grid=grid if grid and not data.get("variants") else (),
    )


# --- the paper's ablations as studies ---------------------------------------------------------------------
def _centering_sharpening(base: DinoConfig) -> tuple[Variant, ...]:
    flat = (("teacher_temp", base.student_temp), ("warmup_teacher_temp", base.student_temp))
    return (
        Variant("centering + sharpening (DINO)"),
        Variant("centering only (teacher_temp = student_temp)", flat),
        Variant("sharpening only (no centering)", (("centering", "none"),)),
        Variant("neither", (("centering", "none"), *flat)),
    )


def _values(field: str, values: tuple, *, also: tuple[str, ...] = ()) -> Callable[[DinoConfig], tuple[Variant, ...]]:
    """A one-axis study: ``field`` (and the fields in ``also``, set to the same value) over ``values``."""

    def build(_base: DinoConfig) -> tuple[Variant, ...]:
        return tuple(Variant(f"{field}={v}", ((field, v), *((a, v) for a in also))) for v in values)

    return build


# DINOv2's two additions to DINO's objective (Oquab et al. 2023, sec. 4), as a 2 x 2 grid.
_DINOV2_AXES: Overrides = (("centering", ("ema", "sinkhorn")), ("koleo_weight", (0.0, 0.1)))


def _dinov2_objective(_base: DinoConfig) -> tuple[Variant, ...]:
    return grid_variants(_DINOV2_AXES)


# Studies whose variants form a grid of more than one axis (the report draws a heat map of 2-D grids).
_STUDY_GRIDS: dict[str, Overrides] = {"centering-sinkhorn-koleo": _DINOV2_AXES}

# study -> (variants from the base config, the paper's finding to print beside the measurement)
STUDIES: dict[str, tuple[Callable[[DinoConfig], tuple[Variant, ...]], str]] = {
    "centering-sharpening": (
        _centering_sharpening,
        "Paper (section 5.3, figure 7): centering alone makes the teacher uniform (entropy near log K), "
        "sharpening alone makes it one-hot (entropy near 0); both collapse (KL near 0). Only both together train.",
    ),
    "teacher-temperature": (
        _values("teacher_temp", (0.02, 0.04, 0.07), also=("warmup_teacher_temp",)),
        "Paper (section 3.1, appendix): tau_t = 0.04 (warmed up to 0.07 on ImageNet) sharpens the teacher; "
        "too high a teacher temperature without warm-up destabilizes training.",
    ),
    "teacher-momentum": (
        _values("teacher_momentum", (0.9, 0.99, 0.996, 0.9995)),
        "Paper (section 3.1): momentum 0.996 raised to 1 along a cosine schedule; the EMA teacher is better than "
        "the student it is built from during training (section 5.2, figure 6).",
    ),
    "teacher-update": (
        _values("teacher_update", ("ema", "student_copy", "previous_epoch", "frozen")),
        "Paper (section 5.2): copying the student (or the previous iteration) as teacher fails; the previous "
        "epoch's student works but below the momentum (EMA) teacher.",
    ),
    "local-crops": (
        _values("n_local_crops", (0, 2, 6)),
        "Paper (section 3.1, ablation of multi-crop): adding small local crops improves the representation "
        "at a modest cost.",
    ),
    "out-dim": (
        _values("out_dim", (256, 1024, 4096)),
        "Paper (appendix, output dimension): larger K helps up to 65536 on ImageNet.",
    ),
    "centering-sinkhorn-koleo": (
        _dinov2_objective,
        "DINOv2 (Oquab et al. 2023, section 4) replaces centering by Sinkhorn-Knopp teacher targets (from SwAV) "
        "and adds the KoLeo regularizer (weight 0.1), which spreads the features in a batch and is reported to "
        "help nearest-neighbour retrieval. Variants that use either train unbatched.",
    ),
}


def study_spec(study: str, **fields: Any) -> SweepSpec:
    """The built-in ``study`` as a `SweepSpec` (``fields``: preset, config, options, seeds, name)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; built-in studies: {sorted(STUDIES)}")
    build, _ = STUDIES[study]
    preset = fields.get("preset", "small32_resnet")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is unknown; allowed: {sorted(PRESETS)}")
    base = PRESETS[preset]().replace(**dict(fields.get("config", ())))
    variants = build(base)
    if study in _STUDY_GRIDS:
        grid = _STUDY_GRIDS[study]
    elif study == "centering-sharpening":
        grid = ()
    else:
        grid = ((variants[0].overrides[0][0], tuple(v.overrides[0][1] for v in variants)),)
    return SweepSpec(**{"name": study, **fields, "variants": variants, "grid": grid, "study": study})


__all__ = ["STUDIES", "SweepSpec", "Variant", "grid_variants", "load_spec", "study_spec", "variant_name"]
