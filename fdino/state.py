"""`TrainState`: the one explicit state of a DINO run, as a pytree.

Everything that changes during training is here and nowhere else: student parameters and
buffers, teacher parameters and buffers, the optimizer's state (AdamW moments and step counts, or
SGD / LARS momentum buffers), the center, the step and the RNG stream. The config is static
metadata (the pytree context), not a leaf.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from .config import DinoConfig
from .models import create_network, split_params_and_buffers
from .optim import OptimizerState, init_optimizer

Tree = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainState:
    """All mutable training state. Leaves are tensors; ``cfg`` is static.

    Fields:
        cfg: the run's `DinoConfig` (static).
        student, student_buffers: trainable parameters and buffers (e.g. BatchNorm statistics).
        teacher, teacher_buffers: the EMA teacher (same keys as the student).
        opt: the state of ``cfg.optimizer`` for ``student``: `AdamWState` (moments and per-parameter step
            counts) for 'adamw', `MomentumState` (momentum buffers) for 'sgd' and 'lars'.
        center: ``[K]`` fp32 running center of the teacher logits.
        step: 0-d int64, optimizer steps taken; every schedule is a function of it.
        rng: ``[2]`` int64 on the CPU: (seed, draws). The step's randomness (stochastic depth)
            is reseeded from it each step, so a run is reproducible from the state alone.
    """

    cfg: DinoConfig
    student: Tree
    student_buffers: Tree
    teacher: Tree
    teacher_buffers: Tree
    opt: OptimizerState
    center: torch.Tensor
    step: torch.Tensor
    rng: torch.Tensor

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)

    @property
    def device(self) -> torch.device:
        return self.center.device


_LEAF_FIELDS = ("student", "student_buffers", "teacher", "teacher_buffers", "opt", "center", "step", "rng")


def _flatten(state: TrainState):
    return [getattr(state, f) for f in _LEAF_FIELDS], state.cfg


def _unflatten(children, cfg) -> TrainState:
    return TrainState(cfg, *children)


def _flatten_with_keys(state: TrainState):
    return [(pytree.GetAttrKey(f), getattr(state, f)) for f in _LEAF_FIELDS], state.cfg


pytree.register_pytree_node(
    TrainState,
    _flatten,
    _unflatten,
    serialized_type_name="fdino.TrainState",
    flatten_with_keys_fn=_flatten_with_keys,
)


def init_state(cfg: DinoConfig, seed: int | None = None, device: str | torch.device | None = None) -> TrainState:
    """A fresh state: student initialized from ``seed`` (default ``cfg.seed``), teacher an exact copy.

    The teacher gets bitwise the same parameters and buffers as the student (paper: the teacher
    is initialized from the student). Parameters are fp32 on ``device`` (default: CUDA if
    available, else CPU); ``precision`` only affects the forward passes.
    """
    seed = cfg.seed if seed is None else seed
    device = torch.device(device) if device is not None else default_device()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = create_network(cfg)
    student, student_buffers = split_params_and_buffers(network.to(device))
    teacher = {k: v.clone() for k, v in student.items()}
    teacher_buffers = {k: v.clone() for k, v in student_buffers.items()}
    return TrainState(
        cfg=cfg,
        student=student,
        student_buffers=student_buffers,
        teacher=teacher,
        teacher_buffers=teacher_buffers,
        opt=init_optimizer(cfg.optimizer, student),
        center=torch.zeros(cfg.out_dim, dtype=torch.float32, device=device),
        step=torch.zeros((), dtype=torch.int64, device=device),
        rng=torch.tensor([seed, 0], dtype=torch.int64),
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def clone_state(state: TrainState) -> TrainState:
    """A deep copy (new tensors): keep one before a donating `train_step` if you need the old values."""
    return pytree.tree_map(lambda t: t.clone(), state)


def tree_allclose(a, b, *, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """Every leaf of two pytrees of the same structure is close (bitwise equal by default)."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    return all(
        torch.allclose(x.float(), y.float(), rtol=rtol, atol=atol) if x.is_floating_point() else torch.equal(x, y)
        for x, y in zip(la, lb)
    )
