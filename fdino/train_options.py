"""How a training job runs (`TrainOptions`), as opposed to what it trains (`fdino.config.DinoConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .budget import parse_budget
from .checks import check_int, check_real
from .trackers import parse_trackers

DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """How to run a training job (the config says what to train)."""

    data: str = "shapes10"
    """Data set name (shapes10, cifar10, cifar100, stl10, fashion-mnist, imagenet32, imagenet64) or an image folder."""
    data_root: str | None = None
    """Folder of the data set's files (see fdino.data.build_dataset); default $FDINO_DATA or ~/.cache/fdino."""
    download: bool = False
    """Let torchvision download a missing data set (needs a network)."""
    init_weights: str = ""
    """Start both backbones from a model (fdino run/export, official DINO, timm weights for --arch); head fresh."""
    run_dir: str = "runs/demo"
    """Folder for checkpoints, logs, plots (`fdino train` without it: runs/<data>-<preset>)."""
    device: str = dataclasses.field(default="auto", metadata={"choices": DEVICES})
    """'auto' (CUDA if present, else CPU), 'cuda' or 'cpu'."""
    compile: bool = True
    """Use the compiled train_step (torch.compile); off: the eager reference step."""
    workers: int = 2
    """DataLoader worker processes."""
    log_every: int = 10
    """Steps between metric reads (the only host syncs of the loop)."""
    ckpt_every: int = 100
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept on disk."""
    eval_every: int = 1000
    """Steps between k-NN evaluations of the teacher, besides the start and the end (0: those two only)."""
    knn_k: int = 20
    """k of the weighted k-NN evaluation."""
    eval_samples: int = 2000
    """Memory-bank and query images used by k-NN during training (0: all)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: the whole schedule)."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) once this much wall time has passed in this process (0: no limit)."""
    budget: str = ""
    """Fit the whole schedule into this: a time (20m, 2h, 90s) measured on this machine, or a number of steps."""
    dist_timeout_minutes: float = 30.0
    """Under torchrun: how long a collective waits for a worker that stopped answering before the job fails."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): bitwise reproducible runs and resumes."""
    attention_images: int = 4
    """Images whose attention maps are saved at each k-NN evaluation and at the end (ViT backbones)."""
    embedding_snapshots: bool = True
    """At each k-NN evaluation: PCA of the query features in embeddings/, attention maps in attention/, to trackers."""
    embedding_tsne: bool = False
    """Add a t-SNE of the query features to each snapshot (exact: ~20 s per evaluation on 2 CPU cores)."""
    tensorboard: bool = True
    """Write TensorBoard events to run_dir/tb (off: drops tensorboard from the trackers)."""
    trackers: str = "tensorboard"
    """Experiment trackers, comma-separated: tensorboard, mlflow (run_dir/mlruns), wandb (offline); 'none'."""
    progress: bool = True
    """Show a progress bar."""
    linear_probe: bool = False
    """Train a linear classifier on the teacher's detached features beside DINO (labeled data); its top-1 is logged."""
    probe_lr: float = 1e-3
    """AdamW learning rate of the online linear probe (its own optimizer; DINO's state is not touched)."""
    probe_every: int = 1
    """Steps between online linear probe updates (each costs one no-grad teacher forward of a global crop)."""

    def __post_init__(self) -> None:
        # Checked here, not mid-run: a bad value must fail before any compile or data work starts.
        for name, lo in (
            ("workers", 0),
            ("log_every", 1),
            ("ckpt_every", 1),
            ("keep_checkpoints", 1),
            ("eval_every", 0),
            ("knn_k", 1),
            ("eval_samples", 0),
            ("max_steps", 0),
            ("attention_images", 0),
            ("probe_every", 1),
        ):
            check_int(f"TrainOptions.{name}", getattr(self, name), lo=lo)
        if not isinstance(self.init_weights, str):
            raise ValueError(
                f"TrainOptions.init_weights={self.init_weights!r} is invalid: give a model source as a path string"
            )
        check_real("TrainOptions.max_minutes", self.max_minutes, lo=0)  # 0: no limit
        check_real("TrainOptions.probe_lr", self.probe_lr, lo=0, hi=10, lo_open=True)
        check_real("TrainOptions.dist_timeout_minutes", self.dist_timeout_minutes, lo=0.05)
        if self.device not in DEVICES:
            raise ValueError(f"TrainOptions.device={self.device!r} is invalid: choose one of {DEVICES}")
        parse_trackers(self.trackers)
        parse_budget(self.budget)

    @property
    def tracker_names(self) -> tuple[str, ...]:
        """The trackers this run writes to: ``trackers`` less tensorboard when ``tensorboard`` is off."""
        return tuple(n for n in parse_trackers(self.trackers) if self.tensorboard or n != "tensorboard")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that may change when a run is resumed (how it runs, not what it computes).
RESUMABLE_OVERRIDES = (
    "device",
    "compile",
    "workers",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "eval_every",
    "max_steps",
    "max_minutes",
    "dist_timeout_minutes",
    "progress",
    "tensorboard",
    "trackers",
    "deterministic",
    "embedding_snapshots",
    "embedding_tsne",
)


def resolve_device(name: str, info_device: torch.device) -> str:
    """``name`` is one of DEVICES (TrainOptions checks it); 'auto' follows the distributed setup."""
    if name == "auto":
        return info_device.type
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available; use --device cpu")
    return name
