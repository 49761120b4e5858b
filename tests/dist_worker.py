"""Worker for the data-parallel equivalence test; run with
``torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT_FILE``.

Each rank trains on its half of the same batches the single-process run sees; rank 0 saves
its final state. Shared setup (config, batches) lives in `dist_setup`.
"""

from __future__ import annotations

import sys

import torch
from dist_setup import CFG, N_STEPS, batches

import fdino
from fdino.checkpoint import state_to_dict
from fdino.distributed import broadcast_state_, init_from_env, mean_reducer, shutdown


def main(out_file: str) -> None:
    info = init_from_env(device="cpu")
    state = fdino.init_state(CFG, device="cpu")
    broadcast_state_(state)
    reducer = mean_reducer(bucket_bytes=4096)  # small buckets: exercise several collectives
    local = CFG.batch_size // info.world_size
    for batch in batches(N_STEPS):
        shard = [c[info.rank * local : (info.rank + 1) * local] for c in batch]
        state, metrics = fdino.train_step_eager(state, shard, reducer=reducer, world_size=info.world_size)
    if info.is_main:
        torch.save({"state": state_to_dict(state), "loss": metrics["loss"]}, out_file)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
