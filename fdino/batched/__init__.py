"""Many variants of one DINO config trained as one batched, pure step (`torch.func.vmap`).

    bstate = init_batched([cfg.replace(teacher_temp=t, seed=s) for t in (0.02, 0.04, 0.07) for s in (0, 1, 2)])
    bstate, metrics = batched_train_step(bstate, batch)    # batch: V crops, each [N, B, C, H, W]
    state_i = unstack(bstate, i)                           # an ordinary TrainState: save, resume, evaluate

Variants may differ in the fields of `BATCHABLE` (scalars and the centering / teacher-update
switches); others (architecture, out_dim, crops) change the graph and train one after another.
"""

from .hyper import BATCHABLE, batch_groups, configs_of, differing_fields, hyperparams_of, structure
from .state import BatchedState, init_batched, stack_states, unstack
from .step import batched_train_step, batched_train_step_eager

__all__ = [
    "BATCHABLE",
    "BatchedState",
    "batch_groups",
    "batched_train_step",
    "batched_train_step_eager",
    "configs_of",
    "differing_fields",
    "hyperparams_of",
    "init_batched",
    "stack_states",
    "structure",
    "unstack",
]
