"""Data parallelism on torch.distributed, kept outside the math.

The step takes a *reducer*: a function that averages a list of tensors across workers in place.
`train_step(state, batch, reducer=mean_reducer(), world_size=W)` then averages the gradients,
the batch center and the metrics once per optimizer step; the single-process path passes no
reducer and runs no collective. With every worker holding B/W images of the global batch, the
averaged gradient of the per-worker mean losses is the gradient of the global mean loss, so W
workers compute the same update as one process with the whole batch.

Launch with torchrun (one node or many): ``torchrun --nproc_per_node N -m fdino train ...``.
NCCL on CUDA, gloo on CPU. BatchNorm statistics span all workers when ``DinoConfig.sync_batchnorm``
is on (the default; `fdino.sync_batchnorm`, summed by `MeanReducer.sum_across_workers`), so ResNets too
compute what one process with the whole batch would; with it off each worker normalizes its own images.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from .state import TrainState

DEFAULT_BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain `python` launch) this is a single process and nothing is
    initialized. ``device``: "cuda" or "cpu"; default CUDA when available. ``timeout_minutes``: how
    long a collective waits for a worker that stopped answering before it fails (it must cover rank 0's
    k-NN evaluations, during which the other ranks wait in the next step's collective).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            device_id=dev if use_cuda else None,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors with one dtype and device, each at most ``bucket_bytes``."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = buckets[-1] if buckets else None
        if last is None or last[0].dtype != t.dtype or last[0].device != t.device or size + nbytes > bucket_bytes:
            buckets.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return buckets


class _SumAcrossWorkers(torch.autograd.Function):
    """all_reduce(SUM) with its adjoint: the backward sums the cotangents across workers too
    (forward + setup_context, so it also runs under torch.func transforms)."""

    @staticmethod
    def forward(tensor: torch.Tensor, group) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class MeanReducer:
    """Averages tensors across the group in place, one all-reduce per bucket (call it with a list).

    Tensors are flattened into buckets of up to ``bucket_bytes`` (not one collective per
    parameter), summed with all_reduce, divided by the world size and copied back.
    `sum_across_workers` is the differentiable sum synced BatchNorm layers take their statistics with.
    """

    def __init__(self, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.group = group
        self.bucket_bytes = bucket_bytes

    def __call__(self, tensors: list[torch.Tensor]) -> None:
        world = dist.get_world_size(self.group)
        for bucket in _buckets(tensors, self.bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, group=self.group)
            flat.div_(world)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def sum_across_workers(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor: ``tensor`` summed over the group's workers; gradients flow to every worker's input."""
        return _SumAcrossWorkers.apply(tensor, self.group)


def mean_reducer(group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> MeanReducer:
    """The reducer `train_step` takes for data parallelism over ``group`` (default: the whole job)."""
    return MeanReducer(group, bucket_bytes)


def summing(reducer, world_size: int):
    """A sum all-reduce (tensor -> its sum over the workers) from the step's averaging ``reducer``, for the
    collectives inside a computation (the Sinkhorn targets' normalizations, `fdino.sinkhorn`)."""

    def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        reducer([out])
        return out * world_size

    return all_reduce_sum


def broadcast_state_(state: TrainState, src: int = 0, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Make every worker's state bitwise equal to rank ``src``'s (after init or resume)."""
    leaves = [t for t in pytree.tree_leaves(state) if t.device == state.device]
    for bucket in _buckets(leaves, bucket_bytes):
        flat = torch.cat([t.reshape(-1).to(bucket[0].dtype) for t in bucket])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def rank0_decides(flag: bool, info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every rank (one broadcast), so that all ranks stop at the same step: each rank's
    own clock would stop some ranks a step earlier and leave the others waiting in a collective."""
    return bool(rank0_value(int(flag), info))


def rank0_value(value: int, info: DistInfo) -> int:
    """Rank 0's ``value`` on every rank (one broadcast): decisions from one rank's clock, such as a budget's
    schedule length, must be the same everywhere."""
    if not info.enabled:
        return value
    decision = torch.tensor([int(value) if info.is_main else 0], dtype=torch.int64, device=info.device)
    dist.broadcast(decision, src=0)
    return int(decision.item())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
