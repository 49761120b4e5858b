"""Worker for the data-parallel equivalence tests; run with
``torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT_FILE [vit|resnet]``.

Each rank trains on its half of the same batches the single-process run sees; rank 0 saves
its final state(s). ``resnet`` trains the BatchNorm ResNet twice, with sync_batchnorm on and off.
Shared setup (configs, batches) lives in `dist_setup`.
"""

from __future__ import annotations

import sys

import torch
from dist_setup import CFG, N_STEPS, RESNET_CFG, batches

import fdino
from fdino.checkpoint import state_to_dict
from fdino.distributed import broadcast_state_, init_from_env, mean_reducer, shutdown


def train(cfg, info):
    state = fdino.init_state(cfg, device="cpu")
    broadcast_state_(state)
    reducer = mean_reducer(bucket_bytes=4096)  # small buckets: exercise several collectives
    local = cfg.batch_size // info.world_size
    for batch in batches(N_STEPS, cfg):
        shard = [c[info.rank * local : (info.rank + 1) * local] for c in batch]
        state, metrics = fdino.train_step_eager(state, shard, reducer=reducer, world_size=info.world_size)
    return {"state": state_to_dict(state), "loss": metrics["loss"]}


def main(out_file: str, which: str = "vit") -> None:
    info = init_from_env(device="cpu")
    if which == "vit":
        result = train(CFG, info)
    else:
        result = {f"sync={sync}": train(RESNET_CFG.replace(sync_batchnorm=sync), info) for sync in (True, False)}
    if info.is_main:
        torch.save(result, out_file)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
