"""fdino.sweep: experiments and ablations, many variants x seeds of a config compared in one report.

    spec = study_spec("centering-sharpening", options=(("data", "shapes10"), ("max_steps", 600)))
    results = run_sweep(spec, "runs/sweep-centering")    # results.md / .json, curves.png
    spec = load_spec("grid.toml")                       # a [grid] or [[variants]] file

Variants run one after another as ordinary fdino runs (resumable, same data order per seed).
"""

from .report import results_markdown, summarize, write_report
from .runner import run_folder, run_sweep
from .spec import STUDIES, SweepSpec, Variant, grid_variants, load_spec, study_spec

__all__ = [
    "STUDIES",
    "SweepSpec",
    "Variant",
    "grid_variants",
    "load_spec",
    "results_markdown",
    "run_folder",
    "run_sweep",
    "study_spec",
    "summarize",
    "write_report",
]
