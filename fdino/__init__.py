"""fdino: fast, pure-functional DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised
Vision Transformers") in PyTorch.

    state = fdino.init_state(fdino.presets.smoke())
    state, metrics = fdino.train_step(state, crops)   # crops: list of [B, 3, H, W], global first
"""

from . import presets, schedules
from .batched import BatchedState, batched_train_step, batched_train_step_eager, init_batched, stack_states, unstack
from .config import DinoConfig
from .diagnostics import collapse_report, teacher_diagnostics
from .ema import ema_update_
from .loss import dino_loss, dino_loss_reference, update_center_
from .models import create_backbone, create_network
from .optim import AdamWState, MomentumState
from .state import TrainState, clone_state, init_state, tree_allclose
from .step import check_batch, train_step, train_step_eager

__version__ = "0.1.0"

__all__ = [
    "AdamWState",
    "BatchedState",
    "DinoConfig",
    "MomentumState",
    "TrainState",
    "batched_train_step",
    "batched_train_step_eager",
    "check_batch",
    "clone_state",
    "collapse_report",
    "create_backbone",
    "create_network",
    "dino_loss",
    "dino_loss_reference",
    "ema_update_",
    "init_batched",
    "init_state",
    "presets",
    "schedules",
    "stack_states",
    "teacher_diagnostics",
    "train_step",
    "train_step_eager",
    "tree_allclose",
    "unstack",
    "update_center_",
]
