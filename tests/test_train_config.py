"""`fdino train` settings: TrainOptions flags generated from the dataclass, and `--config` files
(TOML or a run's run.json) that reproduce a run's DinoConfig and TrainOptions, flags winning."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fdino import cli, presets
from fdino.config import DinoConfig, field_doc
from fdino.train import TrainOptions

TOML = """
preset = "smoke"

[config]
out_dim = 32
global_crop_scale = [0.3, 1.0]
backbone_kwargs = { embed_dim = 32, depth = 1, num_heads = 2 }
augment = { hue = 0.5, blur_sigma = [0.2, 0.4] }
norm_last_layer = false
lr = 0.01

[options]
data = "shapes10"
run_dir = "RUN_DIR"
compile = false
workers = 0
max_steps = 3
log_every = 1
eval_samples = 40
attention_images = 0
progress = false
tensorboard = false
max_minutes = 5
"""

EXPECTED_CFG = presets.smoke(
    out_dim=32,
    global_crop_scale=(0.3, 1.0),
    lr=0.01,
    norm_last_layer=False,
    backbone_kwargs=(("embed_dim", 32), ("depth", 1), ("num_heads", 2)),
    augment=(("hue", 0.5), ("blur_sigma", (0.2, 0.4))),
)


def write_toml(tmp_path: Path, text: str = TOML) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    path = tmp_path / "run.toml"
    path.write_text(text.replace("RUN_DIR", str(run_dir)))
    return path, run_dir


def expected_opts(run_dir: Path) -> TrainOptions:
    return TrainOptions(
        data="shapes10",
        run_dir=str(run_dir),
        compile=False,
        workers=0,
        max_steps=3,
        log_every=1,
        eval_samples=40,
        attention_images=0,
        progress=False,
        tensorboard=False,
        max_minutes=5.0,
    )


def test_toml_and_run_json_give_the_same_config_and_options(tmp_path):
    toml_path, run_dir = write_toml(tmp_path)
    cfg, opts = cli.train_settings(["--config", str(toml_path)])
    assert cfg == EXPECTED_CFG and opts == expected_opts(run_dir)
    as_json = tmp_path / "copy.json"  # the run.json format: what a run writes into its folder
    as_json.write_text(json.dumps({"config": cfg.to_dict(), "options": opts.to_dict()}))
    assert cli.train_settings(["--config", str(as_json)]) == (cfg, opts)


def test_flags_override_the_file(tmp_path):
    toml_path, run_dir = write_toml(tmp_path)
    cfg, opts = cli.train_settings(
        [
            "--config",
            str(toml_path),
            "--out-dim",
            "48",
            "--lr",
            "0.02",
            "--compile",
            "--max-steps",
            "7",
            "--run-dir",
            str(tmp_path / "other"),
        ]
    )
    assert cfg == EXPECTED_CFG.replace(out_dim=48, lr=0.02)
    other = str(tmp_path / "other")
    assert opts == dataclasses.replace(expected_opts(run_dir), compile=True, max_steps=7, run_dir=other)
    # --preset replaces the file's preset; the file's [config] still applies on top of it.
    cfg, _ = cli.train_settings(["--config", str(toml_path), "--preset", "small32"])
    assert cfg == presets.small32(
        **{
            k: getattr(EXPECTED_CFG, k)
            for k in ("out_dim", "global_crop_scale", "backbone_kwargs", "augment", "norm_last_layer", "lr")
        }
    )


@pytest.mark.parametrize(
    "text,names",
    [
        ("[config]\nout_dims = 3\n", ["'out_dims'", "[config]", "out_dim"]),
        ("[options]\nmax_step = 3\n", ["'max_step'", "[options]", "max_steps"]),
        ("presets = 'smoke'\n", ["'presets'", "allowed: ['preset', 'config', 'options']"]),
    ],
)
def test_an_unknown_key_is_an_error_naming_it_and_the_allowed_ones(tmp_path, capsys, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        cli.train_settings(["--config", str(path)])
    assert all(name in str(err.value) for name in names) and str(path) in str(err.value)
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "unknown key" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,message",
    [
        ("[options]\ncompile = 'no'\n", "compile = 'no' is not a bool"),
        ("[options]\nworkers = true\n", "workers = True is not a int"),
        ("[config]\nout_dim = 3.5\n", "out_dim = 3.5 is not a int"),
        ("preset = 'nope'\n", "unknown preset 'nope'"),
    ],
)
def test_a_value_of_the_wrong_type_is_an_error_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        cli.train_settings(["--config", str(path)])


def test_config_file_must_exist_and_be_toml_or_json(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err
    (tmp_path / "run.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match=r"must end in \.toml or \.json"):
        cli.train_settings(["--config", str(tmp_path / "run.yaml")])


def test_every_train_option_is_a_flag_with_its_docstring_and_old_spellings_work():
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    for f in dataclasses.fields(TrainOptions):
        assert f"--{f.name.replace('_', '-')}" in help_text
        assert " ".join(field_doc(f.name, TrainOptions).split()) in help_text, f.name
    _, opts = cli.train_settings(
        [
            "--no-compile",
            "--no-tensorboard",
            "--no-progress",
            "--deterministic",
            "--download",
            "--workers",
            "1",
            "--max-minutes",
            "2.5",
            "--device",
            "cpu",
        ]
    )
    assert (opts.compile, opts.tensorboard, opts.progress, opts.deterministic, opts.download) == (
        False,
        False,
        False,
        True,
        True,
    )
    assert (opts.workers, opts.max_minutes, opts.device) == (1, 2.5, "cpu")
    assert cli.train_settings([])[1] == TrainOptions(run_dir="runs/shapes10-small32_resnet")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--device", "tpu"])
    assert not hasattr(cli, "_TRAIN_OPTION_FLAGS")


def test_resume_takes_no_config_file_or_preset(tmp_path, capsys):
    toml_path, _ = write_toml(tmp_path)
    assert cli.main(["train", "--resume", str(tmp_path), "--config", str(toml_path)]) == 2
    assert "drop ['--config']" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path), "--preset", "smoke"]) == 2
    assert "drop ['--preset']" in capsys.readouterr().err


def test_a_run_from_a_config_file_records_it_and_its_run_json_starts_it_again(tmp_path):
    toml_path, run_dir = write_toml(tmp_path)
    assert cli.main(["train", "--config", str(toml_path)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["knn_top1_teacher"] is not None
    meta = json.loads((run_dir / "run.json").read_text())
    cfg, opts = cli.train_settings(["--config", str(run_dir / "run.json")])
    assert cfg == DinoConfig.from_dict(meta["config"]) and opts == TrainOptions(**meta["options"])
    # The same settings as the TOML file; only steps_per_epoch was filled in from the data set.
    assert cfg == EXPECTED_CFG.replace(steps_per_epoch=cfg.steps_per_epoch) and opts == expected_opts(run_dir)
    # Starting it again lands in the same folder: refused until --overwrite, as for any run.
    assert cli.main(["train", "--config", str(run_dir / "run.json")]) == 2
