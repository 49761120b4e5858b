"""Experiment trackers behind the training job: TensorBoard, MLflow (local file store), W&B (offline).

    trackers = make_trackers(("tensorboard", "mlflow"), run_dir, {"config": ..., "options": ...}, resume_step=0)

Each backend keeps everything inside the run folder and never needs a network: TensorBoard events in
``run_dir/tb``, an MLflow file store in ``run_dir/mlruns``, a W&B offline run in ``run_dir/wandb``
(upload it later with ``wandb sync``). A resumed run (``resume_step > 0``) appends to the same MLflow
and W&B run: their ids are kept in ``run_dir/mlflow_run_id`` and ``run_dir/wandb_run_id``. Only the
training job's edges (``fdino.run_log.MetricsLog``) use these; the train step never sees them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("tensorboard", "mlflow", "wandb")
# backend -> (module it imports, the pip extra that installs it); tensorboard ships with fdino.
_PACKAGES = {"tensorboard": ("tensorboard", None), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
_MLFLOW_PARAM_CHARS = 500  # MLflow 2.0's limit on a param value (later versions allow more)


class Tracker(Protocol):
    """What the training job logs: the config once, metrics per log step, files at the end.

    Optional, called only when a tracker has them (so a minimal tracker needs just these four):
    ``log_image(tag, path, step)``, a PNG that changes over the run (the embedding snapshots), and
    ``log_embedding(tag, features [n, D], labels: list[str], images [n, 3, s, s] | None, step)``, the
    points behind it. All three backends here have both; see each for what it keeps.
    """

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self, *, failed: bool = False) -> None: ...


def parse_trackers(text: str) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> ``("tensorboard", "mlflow")``; ``""`` or ``"none"``: no tracker."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(
            f"TrainOptions.trackers={text!r}: unknown tracker {unknown[0]!r}; choose a comma-separated list "
            f"of {', '.join(TRACKERS)} (or 'none')"
        )
    return names


def check_available(names: Iterable[str]) -> None:
    """Fail early, naming the extra to install, if a chosen tracker's package is missing."""
    for name in names:
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            hint = f"pip install 'fdino[{extra}]'" if extra else f"pip install {module}"
            raise ModuleNotFoundError(f"the {name} tracker needs the {module} package: {hint}")


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"config.lr": 0.1, ...}``; scalars kept, anything else as JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def make_trackers(names: Iterable[str], run_dir: Path, config: Mapping[str, Any], resume_step: int) -> list[Tracker]:
    """One tracker per name (see TRACKERS), each given the flattened ``config`` as its params.

    ``resume_step``: the step a resumed run continues from (0: a new run): TensorBoard drops events a
    killed run wrote after it, MLflow and W&B continue the run whose id the run folder holds.
    """
    names = tuple(names)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}: choose from {', '.join(TRACKERS)}")
    check_available(n for n in names if n in _PACKAGES)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = flatten_params(config)
    trackers = []
    for name in names:
        tracker = BACKENDS[name](run_dir, resume_step=resume_step)
        tracker.log_params(params)
        trackers.append(tracker)
    return trackers


def _stored_id(path: Path, resume_step: int) -> str | None:
    """The backend run id a resumed run continues; a new run (step 0) always starts a fresh one."""
    if resume_step > 0 and path.exists():
        return path.read_text().strip() or None
    return None


def _rgb_pixels(path: Path):
    """A PNG as a ``[H, W, 3]`` uint8 array."""
    import numpy as np  # noqa: PLC0415  (only for images)
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardTracker:
    """Scalars, the config as a text table, the snapshots (images and the projector's points) and the
    final images/JSON in ``run_dir/tb``."""

    def __init__(self, run_dir: Path, *, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (slow import, only when asked)

        self.step = resume_step
        self.resume_step = resume_step
        # Drops the events a killed run logged after its last checkpoint (at resume_step, whose own
        # reading was logged before the checkpoint was written and is kept).
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", "| name | value |\n|---|---|\n" + rows, global_step=self.step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.step = step
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.suffix == ".png":
            self.writer.add_image(f"artifacts/{path.stem}", _rgb_pixels(path), self.step, dataformats="HWC")
        elif path.suffix in (".json", ".txt"):
            text = "\n".join("    " + line for line in path.read_text().splitlines())  # a markdown code block
            self.writer.add_text(f"artifacts/{path.name}", text, self.step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """One image per step under ``tag``: the Images tab's slider walks through the run."""
        self.writer.add_image(tag, _rgb_pixels(Path(path)), step, dataformats="HWC")

    def log_embedding(self, tag: str, features, labels: list[str], images, step: int) -> None:
        """The points for the Projector tab: ``tb/<step>/<tag>/`` and ``tb/projector_config.pbtxt``."""
        if not hasattr(self.writer, "_projector_config"):
            self._keep_earlier_projections()
        self.writer.add_embedding(features, metadata=labels, label_img=images, global_step=step, tag=tag)

    def _keep_earlier_projections(self) -> None:
        """A resumed run's writer would rewrite projector_config.pbtxt with its own points only; seed it
        with the entries up to ``resume_step`` (later ones: a killed run's, which TensorBoard's purge also
        drops), so the projector keeps every step. SummaryWriter keeps the config in ``_projector_config``."""
        config_path = Path(self.writer.get_logdir()) / "projector_config.pbtxt"
        if not self.resume_step or not config_path.is_file():
            return
        from google.protobuf import text_format  # noqa: PLC0415  (tensorboard's dependency)
        from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig  # noqa: PLC0415

        old = text_format.Parse(config_path.read_text(), ProjectorConfig())
        config = ProjectorConfig()
        config.embeddings.extend(e for e in old.embeddings if int(e.tensor_name.rsplit(":", 1)[-1]) <= self.resume_step)
        self.writer._projector_config = config

    def close(self, *, failed: bool = False) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run per fdino run, in a file store at ``run_dir/mlruns`` (no server)."""

    def __init__(self, run_dir: Path, *, resume_step: int) -> None:
        # MLflow 3 refuses the file store unless asked for it; it is what needs no server or database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient  # noqa: PLC0415  (optional extra)

        self.client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
        id_file = run_dir / "mlflow_run_id"
        run_id = _stored_id(id_file, resume_step)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name("fdino")
            eid = experiment.experiment_id if experiment else self.client.create_experiment("fdino")
            run_id = self.client.create_run(eid, run_name=run_dir.resolve().name).info.run_id
            id_file.write_text(run_id + "\n")
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415  (optional extra)

        # MLflow params cannot change: a resumed run adds only new ones (run.json keeps the overrides).
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):  # at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415  (optional extra)

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """Kept as the artifact ``<tag>/<file name>`` (the file name holds the step: MLflow has no image steps)."""
        self.client.log_artifact(self.run_id, str(path), artifact_path=tag)

    def log_embedding(self, tag: str, features, labels: list[str], images, step: int) -> None:
        """Not kept: MLflow has no projector to show the points, and as files they would be megabytes per
        evaluation; the snapshot PNG (`log_image`) shows them."""

    def close(self, *, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker:
    """A W&B offline run in ``run_dir/wandb`` (``wandb sync`` uploads it later); nothing goes online."""

    def __init__(self, run_dir: Path, *, resume_step: int) -> None:
        for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DISABLE_GIT", "true")):
            os.environ.setdefault(key, value)
        import wandb  # noqa: PLC0415  (optional extra)

        id_file = run_dir / "wandb_run_id"
        run_id = _stored_id(id_file, resume_step)
        resumed = run_id is not None
        if run_id is None:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project="fdino",
            name=run_dir.resolve().name,
            dir=str(run_dir),
            mode="offline",
            id=run_id,
            resume="allow" if resumed else None,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path) -> None:
        path = Path(path).resolve()
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def log_image(self, tag: str, path: Path, step: int) -> None:
        import wandb  # noqa: PLC0415  (optional extra)

        self.run.log({tag: wandb.Image(str(path))}, step=step)

    def log_embedding(self, tag: str, features, labels: list[str], images, step: int) -> None:
        """Not kept: W&B would need an n x D table in the run file per evaluation to project the points
        itself; the snapshot PNG (`log_image`) shows them."""

    def close(self, *, failed: bool = False) -> None:
        import wandb  # noqa: PLC0415  (optional extra)

        self.run.finish(exit_code=1 if failed else 0)
        # finish() can return before the wandb service has written the offline run file; teardown
        # waits for the service, so the run folder is complete when the training job returns.
        wandb.teardown()


BACKENDS: dict[str, Any] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}
