"""Experiment trackers (fdino.trackers): the factory's errors, TensorBoard events read back, the order
in which the training job calls a tracker, and the optional MLflow / W&B backends read back from
their stores in the run folder (those two skip without their extras)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdino import cli, trackers
from fdino.train import TrainOptions

PARAMS = {"config": {"lr": 0.01, "augment": [["blur", 0.5]]}, "options": {"data": "shapes10", "data_root": None}}


def log_a_run(run_dir: Path, names: tuple[str, ...], *, resume_step: int = 0, steps=(2, 4), loss: float = 1.5):
    """What a training job does with its trackers: params (via the factory), metrics, files, close."""
    run_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(run_dir / "curves.png")
    (run_dir / "summary.json").write_text(json.dumps({"steps": steps[-1]}) + "\n")
    made = trackers.make_trackers(names, run_dir, PARAMS, resume_step)
    for t in made:
        for step in steps:
            t.log_metrics({"train/loss": loss + step, "train/lr": 0.1}, step)
        t.log_artifact(run_dir / "curves.png")
        t.log_artifact(run_dir / "summary.json")
        t.close()
    return made


# --- the factory and the option ------------------------------------------------------------------


def test_tracker_names_parse_and_unknown_names_list_the_allowed_ones():
    assert trackers.parse_trackers(" TensorBoard, mlflow,mlflow ") == ("tensorboard", "mlflow")
    assert trackers.parse_trackers("none") == trackers.parse_trackers("") == ()
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbord'.*tensorboard, mlflow, wandb"):
        TrainOptions(trackers="tensorboard,tensorbord")
    with pytest.raises(ValueError, match=r"choose from tensorboard, mlflow, wandb"):
        trackers.make_trackers(["comet"], Path("unused"), {}, 0)
    # The default keeps today's runs; --no-tensorboard still turns TensorBoard off.
    assert TrainOptions().tracker_names == ("tensorboard",)
    assert TrainOptions(tensorboard=False, trackers="tensorboard,mlflow").tracker_names == ("mlflow",)
    _, opts = cli.train_settings(["--trackers", "tensorboard,mlflow"])
    assert opts.trackers == "tensorboard,mlflow" and opts.tracker_names == ("tensorboard", "mlflow")


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_missing_package_names_the_extra_to_install(name, monkeypatch, tmp_path):
    monkeypatch.setitem(trackers._PACKAGES, name, ("fdino_no_such_package", name))
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'fdino\[{name}\]'"):
        trackers.make_trackers(["tensorboard", name], tmp_path, PARAMS, 0)
    assert not (tmp_path / "tb").exists(), "no tracker may start before all are known to be available"


def test_params_are_flattened_to_scalars_and_json():
    assert trackers.flatten_params(PARAMS) == {
        "config.lr": 0.01,
        "config.augment": '[["blur", 0.5]]',
        "options.data": "shapes10",
        "options.data_root": None,
    }


# --- TensorBoard (always installed) --------------------------------------------------------------


def test_tensorboard_events_hold_metrics_config_and_artifacts_and_a_resume_purges(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_a_run(tmp_path, ("tensorboard",), steps=(2, 4, 6))
    # A resume from the checkpoint at step 4: step 6 (logged after it by the killed run) is dropped.
    log_a_run(tmp_path, ("tensorboard",), resume_step=4, steps=(6, 8), loss=10.0)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(2, 3.5), (4, 5.5), (6, 16.0), (8, 18.0)]
    tags = events.Tags()
    assert "artifacts/curves" in tags["images"]
    assert {"config/text_summary", "artifacts/summary.json/text_summary"} <= set(tags["tensors"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| config.lr | 0.01 |" in config_text
    image = events.Images("artifacts/curves")[-1]
    assert (image.width, image.height, image.step) == (12, 8, 8)


# --- the training job's calls, in order ----------------------------------------------------------


class RecordingTracker:
    """Stands in for a backend: records what the training job calls."""

    calls: list[tuple] = []

    def __init__(self, run_dir: Path, *, resume_step: int) -> None:
        self.calls.append(("init", resume_step))

    def log_params(self, params):
        self.calls.append(("log_params", dict(params)))

    def log_metrics(self, metrics, step):
        self.calls.append(("log_metrics", step, sorted(metrics)))

    def log_artifact(self, path):
        self.calls.append(("log_artifact", Path(path)))

    def close(self, *, failed=False):
        self.calls.append(("close", failed))


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    """The smallest `fdino train` run: smoke preset, eager step, a 16-image folder, 4 steps of batch 4."""
    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (data / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(data / f"class{c}" / f"{i}.png")
    return [
        "train",
        "--preset",
        "smoke",
        "--no-compile",
        "--workers",
        "0",
        "--no-progress",
        "--eval-samples",
        "16",
        "--attention-images",
        "1",
        "--data",
        str(data),
        "--run-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "4",
        "--log-every",
        "2",
        "--eval-every",
        "2",
        *extra,
    ]


def test_the_training_job_logs_params_then_metrics_then_artifacts_then_closes(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.BACKENDS, "tensorboard", RecordingTracker)
    monkeypatch.setattr(RecordingTracker, "calls", [])
    assert cli.main(train_args(tmp_path)) == 0
    calls = RecordingTracker.calls
    assert [c[0] for c in calls[:2]] == ["init", "log_params"] and calls[0][1] == 0
    params = calls[1][1]
    assert params["options.trackers"] == "tensorboard" and params["config.batch_size"] == 4
    assert params["options.run_dir"] == str(tmp_path / "run")
    train_keys = ["train/images_per_s", "train/loss", "train/lr"]
    metrics = [(c[1], c[2]) for c in calls if c[0] == "log_metrics"]
    assert [step for step, _ in metrics] == [2, 2, 4, 4]
    assert all(set(train_keys) <= set(keys) for _, keys in metrics[0::2]) and metrics[1][1] == ["knn/top1"]
    run_dir = tmp_path / "run"
    assert calls[-4:] == [
        ("log_artifact", run_dir / "curves.png"),
        ("log_artifact", run_dir / "summary.json"),
        ("log_artifact", run_dir / "attention" / "teacher.png"),
        ("close", False),
    ]
    assert [c[0] for c in calls].count("close") == 1


def test_a_failing_run_closes_its_trackers_as_failed(tmp_path, monkeypatch):
    class Failing(RecordingTracker):
        def log_metrics(self, metrics, step):
            raise OSError("disk full")

    monkeypatch.setitem(trackers.BACKENDS, "tensorboard", Failing)
    monkeypatch.setattr(RecordingTracker, "calls", [])
    with pytest.raises(OSError, match="disk full"):
        cli.main(train_args(tmp_path))
    assert [c[0] for c in RecordingTracker.calls] == ["init", "log_params", "close"]
    assert RecordingTracker.calls[-1] == ("close", True)


# --- MLflow (extra: fdino[mlflow]) ---------------------------------------------------------------


def test_mlflow_file_store_holds_params_metrics_artifacts_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow", reason="the MLflow tracker needs the mlflow extra: pip install 'fdino[mlflow]'")
    from mlflow.tracking import MlflowClient

    (first,) = log_a_run(tmp_path, ("mlflow",), steps=(2, 4))
    (again,) = log_a_run(tmp_path, ("mlflow",), resume_step=4, steps=(6,))
    assert again.run_id == first.run_id == (tmp_path / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["config.lr"] == "0.01" and run.data.params["options.data"] == "shapes10"
    history = client.get_metric_history(first.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(2, 3.5), (4, 5.5), (6, 7.5)]
    assert sorted(a.path for a in client.list_artifacts(first.run_id)) == ["curves.png", "summary.json"]
    experiment = client.get_experiment_by_name("fdino")
    assert len(client.search_runs([experiment.experiment_id])) == 1, "a resume must not start a second run"
    # A new run (step 0) in the same folder, e.g. --overwrite, starts a fresh MLflow run.
    (fresh,) = log_a_run(tmp_path, ("mlflow",))
    assert fresh.run_id != first.run_id


# --- Weights & Biases (extra: fdino[wandb]) ------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline .wandb file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_config_metrics_and_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the W&B tracker needs the wandb extra: pip install 'fdino[wandb]'")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log_a_run(tmp_path, ("wandb",), steps=(2, 4))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / "files" / "summary.json").is_file() and (offline / "files" / "curves.png").is_file()
    records = wandb_records(offline / f"run-{run_id}.wandb")
    history = wandb_history(records)
    assert history[2]["train/loss"] == 3.5 and history[4]["train/loss"] == 5.5
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.config.update})
    assert config["config.lr"] == 0.01 and config["options.data"] == "shapes10"
    assert records[-1].WhichOneof("record_type") == "exit" and records[-1].exit.exit_code == 0
    # A resume writes an offline run with the same id (wandb sync appends it to the first).
    log_a_run(tmp_path, ("wandb",), resume_step=4, steps=(6,))
    newest = max(
        (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"), key=lambda p: p.stat().st_mtime
    )
    resumed = wandb_records(newest)
    assert {r.run.run_id for r in resumed if r.WhichOneof("record_type") == "run"} == {run_id}
    assert wandb_history(resumed)[6]["train/loss"] == 7.5


def wandb_history(records: list) -> dict[int, dict]:
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history[r.history.step.num] = items
    return history
