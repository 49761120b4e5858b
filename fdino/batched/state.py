"""`BatchedState`: N training states stacked along a leading variant axis, with their hyperparameters as data.

    bstate = init_batched([cfg.replace(teacher_temp=t, seed=s) for t in temps for s in seeds])
    single = unstack(bstate, i)            # variant i as an ordinary TrainState (its own config)

Every leaf of ``bstate.state`` has shape ``[N, *leaf]``; ``bstate.hparams`` holds each variant's
batchable fields as ``[N]`` float64 (see `fdino.batched.hyper`). The static part is the shared
structure config, so one compiled graph serves every mix of values of the same structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from ..config import DinoConfig
from ..state import TrainState, default_device, init_state
from .hyper import Hyperparams, configs_of, differing_fields, hyperparams_of, structure


@dataclass(frozen=True)
class BatchedState:
    """N stacked `TrainState`s and their hyperparameters.

    Fields:
        cfg: the shared structure (`fdino.batched.hyper.structure`; static).
        state: a `TrainState` whose every leaf has a leading ``[N]`` variant axis (its ``cfg`` is ``cfg``).
        hparams: ``{field: [N] float64}``, each variant's batchable config values.
    """

    cfg: DinoConfig
    state: TrainState
    hparams: Hyperparams

    @property
    def n_variants(self) -> int:
        return int(self.state.step.shape[0])

    @property
    def device(self) -> torch.device:
        return self.state.device

    def configs(self) -> tuple[DinoConfig, ...]:
        """Each variant's full config (reads the hyperparameters on the host)."""
        return configs_of(self.cfg, self.hparams)


pytree.register_pytree_node(
    BatchedState,
    lambda b: ([b.state, b.hparams], b.cfg),
    lambda children, cfg: BatchedState(cfg, *children),
    serialized_type_name="fdino.BatchedState",
    flatten_with_keys_fn=lambda b: (
        [(pytree.GetAttrKey("state"), b.state), (pytree.GetAttrKey("hparams"), b.hparams)],
        b.cfg,
    ),
)


def stack_states(states: Sequence[TrainState]) -> BatchedState:
    """One `BatchedState` from single states whose configs differ only in batchable fields (copies)."""
    if not states:
        raise ValueError("stack_states needs at least one TrainState")
    first = states[0]
    if first.cfg.optimizer != "adamw":
        raise ValueError(
            f"batched variants train with optimizer='adamw' (the stacked update is AdamW), not "
            f"{first.cfg.optimizer!r}; run these variants one after another (fdino.train_step)"
        )
    for i, s in enumerate(states[1:], 1):
        fields = differing_fields(first.cfg, s.cfg)
        if fields:
            raise ValueError(
                f"state {i} cannot batch with state 0: their configs differ in {fields}, which shape the computation; "
                "run such variants one after another (fdino.batched.hyper.batch_groups groups the ones that can)"
            )
        if s.device != first.device:
            raise ValueError(f"state {i} is on {s.device} but state 0 on {first.device}; move them to one device")
    base = structure(first.cfg)
    stacked = pytree.tree_map(lambda *leaves: torch.stack(leaves), *[s.replace(cfg=base) for s in states])
    return BatchedState(base, stacked, hyperparams_of([s.cfg for s in states], first.device))


def init_batched(cfgs: Sequence[DinoConfig], device: str | torch.device | None = None) -> BatchedState:
    """Fresh states for ``cfgs`` (each initialized from its own ``seed``, as `fdino.init_state` does), stacked."""
    device = torch.device(device) if device is not None else default_device()
    return stack_states([init_state(cfg, device=device) for cfg in cfgs])


def unstack(bstate: BatchedState, i: int) -> TrainState:
    """Variant ``i`` as an ordinary `TrainState` with its own config (new tensors, not views of the stack)."""
    n = bstate.n_variants
    if not -n <= i < n:
        raise IndexError(f"variant {i} is out of range: the batched state holds {n} variants")
    single = pytree.tree_map(lambda t: t[i].clone(), bstate.state)
    return dataclasses.replace(single, cfg=bstate.configs()[i])


__all__ = ["BatchedState", "init_batched", "stack_states", "unstack"]
