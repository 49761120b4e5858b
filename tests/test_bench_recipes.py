"""The committed budget recipes (bench/recipes/*.toml) stay valid: each reads as `fdino train --config`
reads it and builds its backbone, so a renamed field or architecture fails here, not in a 20-minute run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fdino.cli import train_settings
from fdino.models import create_backbone

RECIPES = sorted((Path(__file__).resolve().parents[1] / "bench" / "recipes").glob("*.toml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_reads_and_builds_its_backbone(recipe):
    cfg, opts = train_settings(["--config", str(recipe), "--budget", "20m", "--seed", "1"])
    assert opts.budget == "20m" and cfg.seed == 1 and opts.data == "shapes10"
    backbone = create_backbone(cfg).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, cfg.global_crop_size, cfg.global_crop_size))
    assert out.shape[0] == 2 and torch.isfinite(out).all()
