"""The DINO training step (paper Algorithm 1) as pure functions over `TrainState`.

    train_step(state, batch) -> (state, metrics)

``batch`` is a sequence of V crop tensors ``[B, C, H, W]``, the G global crops first. One step:
1. schedules at ``state.step`` (0-d tensors: lr, weight decay, momentum, teacher temperature, whether
   the last layer is frozen), evaluated outside the compiled graph and passed in as tensors;
2. teacher forward on the global crops (no gradient), student forward on all crops, both through
   `torch.func.functional_call` on stateless templates; crops of one resolution share a call;
3. loss and gradients with `torch.func.grad_and_value` (the loss returns the batch center too);
4. per-parameter gradient clipping, the optimizer (AdamW, SGD or LARS), last-layer freezing;
5. teacher EMA (one `_foreach_lerp_`), then the center EMA with the batch center (`update_center_`);
   the ablations of `DinoConfig.teacher_update` and ``centering="none"`` change only the momentum
   schedule and skip the center EMA (the teacher then subtracts 0). DINOv2's options (``centering=
   "sinkhorn"``, ``koleo_weight``) change only the objective (`fdino.objective`).

Donation: ``train_step`` updates the tensors of the input state IN PLACE and returns a state
holding those same tensors (like JAX's donated buffers: no second copy of parameters, moments or
teacher). Keep a copy with `fdino.clone_state` if you need the old values. Metrics are device
tensors; nothing in the step reads a value on the host.

With ``grad_accum_steps > 1`` the batch is split into micro-batches whose gradients are summed
(each weighted by its share of the batch) against the same teacher outputs' center; the center and
the teacher EMA update once per optimizer step, so the result equals one step on the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch._dynamo
from torch.func import functional_call, grad_and_value
from torch.nn.utils.stateless import _reparametrize_module

from . import schedules
from .config import DinoConfig
from .distributed import summing
from .ema import ema_update_
from .loss import update_center_
from .models import fused_attention_pays, is_last_layer, is_regularized, network_template
from .objective import step_diagnostics, student_objective, teacher_targets, wants_features
from .optim import clip_grads_per_param_, optimizer_update_
from .precision import resolve_precision
from .sinkhorn import AllReduceSum
from .state import TrainState
from .sync_batchnorm import step_batchnorm_sync

Tree = dict[str, torch.Tensor]
# Reduces (sums or averages) tensors across data-parallel workers in place; see fdino.distributed.
Reducer = Callable[[list[torch.Tensor]], None]


def _autocast(cfg: DinoConfig, device: torch.device):
    if resolve_precision(cfg.precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Config fields only the schedules read. The step evaluates the schedules outside the compiled graph and
# passes their values in as tensors, and builds the graph for `graph_config(cfg)` (these fields at their
# defaults), so a run whose schedule changes (a --budget's fitted length, a resume with a new lr) reuses
# the compiled graph instead of compiling for minutes again.
SCHEDULE_FIELDS = (
    "epochs",
    "steps_per_epoch",
    "schedule_steps",
    "lr",
    "min_lr",
    "warmup_epochs",
    "lr_warmup",
    "weight_decay",
    "weight_decay_end",
    "teacher_momentum",
    "teacher_momentum_end",
    "teacher_update",
    "warmup_teacher_temp",
    "teacher_temp",
    "warmup_teacher_temp_epochs",
    "teacher_temp_warmup",
)
_DEFAULTS = DinoConfig()


def graph_config(cfg: DinoConfig) -> DinoConfig:
    """``cfg`` as the compiled graph sees it: schedule-only fields at their defaults."""
    fields = {name: getattr(_DEFAULTS, name) for name in SCHEDULE_FIELDS}
    # Whether the last layer can be frozen is structure (its own optimizer group); for how long is schedule.
    fields["freeze_last_layer"] = _DEFAULTS.freeze_last_layer if cfg.freeze_last_layer > 0 else 0.0
    return cfg.replace(**fields)


def step_schedules(cfg: DinoConfig, step: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every scheduled value at ``step`` as 0-d tensors on its device: `schedules.all_schedules` plus
    ``last_layer_frozen``. A handful of scalar ops per step, no host read."""
    return {**schedules.all_schedules(cfg, step), "last_layer_frozen": schedules.last_layer_frozen(cfg, step)}


class Networks(NamedTuple):
    """The stateless module templates the step drives (resolved outside compiled code)."""

    student: torch.nn.Module
    teacher: torch.nn.Module


def networks(cfg: DinoConfig, device: torch.device, *, vmapped: bool = False) -> Networks:
    """The student and teacher templates for steps of ``cfg`` on ``device`` (``vmapped``: the batched step)."""
    layout = {
        "fused_attention": fused_attention_pays(device, resolve_precision(cfg.precision, device)),
        "channels_last": not vmapped,
    }
    return Networks(network_template(cfg, teacher=False, **layout), network_template(cfg, teacher=True, **layout))


def teacher_logits(
    cfg: DinoConfig, net: torch.nn.Module, teacher: Tree, teacher_buffers: Tree, global_crops: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``[G*B, K]`` fp32 teacher outputs (no gradient; BatchNorm statistics update in place)."""
    with torch.no_grad(), _autocast(cfg, global_crops[0].device):
        out = functional_call(net, (teacher, teacher_buffers), (list(global_crops),))
    return out.float()


def micro_grads(
    cfg: DinoConfig,
    nets: Networks,
    state: TrainState,
    crops: Sequence[torch.Tensor],
    center: torch.Tensor,
    teacher_temp: torch.Tensor,
    student_temp: torch.Tensor | float | None = None,
    all_reduce_sum: AllReduceSum | None = None,
) -> tuple[Tree, dict[str, torch.Tensor]]:
    """Gradients of the DINO loss on one (micro-)batch w.r.t. the student parameters.

    ``student_temp`` defaults to ``cfg.student_temp``; `fdino.batched` passes each variant's as a tensor.
    ``all_reduce_sum``: sums across workers inside the Sinkhorn targets (``centering="sinkhorn"``, several workers).
    Returns ``(grads, out)`` with ``out`` holding ``loss``, ``batch_center``, the diagnostics (and ``koleo``).
    """
    g = cfg.n_global_crops
    student_temp = cfg.student_temp if student_temp is None else student_temp
    t_logits = teacher_logits(cfg, nets.teacher, state.teacher, state.teacher_buffers, crops[:g])
    targets = teacher_targets(cfg, t_logits, teacher_temp, all_reduce_sum)  # None unless centering="sinkhorn"

    def loss_of_outputs(s_out):
        return student_objective(cfg, s_out, t_logits, targets, center, student_temp, teacher_temp)

    def loss_fn(params: Tree, buffers: Tree):
        with _autocast(cfg, crops[0].device):
            s_out = functional_call(nets.student, (params, buffers), (list(crops), wants_features(cfg)))
        return loss_of_outputs(s_out)

    if cfg.grad_checkpointing:
        grads, (loss, aux) = _checkpointed_grad_and_value(
            cfg, nets.student, state.student, state.student_buffers, crops, loss_of_outputs
        )
    else:
        # Buffers are an explicit (non-differentiated) input: functorch forbids mutating captured tensors.
        grads, (loss, aux) = grad_and_value(loss_fn, has_aux=True)(state.student, state.student_buffers)
    loss = aux.pop("dino_loss", loss)  # with KoLeo, `loss` is the total; the metric stays the DINO loss
    out = {"loss": loss.detach(), **aux}
    out.update(step_diagnostics(t_logits, targets, center, teacher_temp, loss))
    return grads, out


def _checkpointed_grad_and_value(
    cfg: DinoConfig, net: torch.nn.Module, params: Tree, buffers: Tree, crops: Sequence[torch.Tensor], loss_of_logits
):
    """`grad_and_value` for backbones with activation checkpointing.

    Checkpointing recomputes blocks during the backward pass through saved-tensor hooks, which
    `torch.func` transforms do not support, so this path uses autograd on detached leaf copies of
    the parameters. The stateless template must see those tensors during the recomputation too,
    so the parameter substitution (what `functional_call` does internally) spans the backward.
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with _reparametrize_module(net, {**leaves, **buffers}):
        with torch.enable_grad(), _autocast(cfg, crops[0].device):
            s_out = net(list(crops), wants_features(cfg))
        loss, aux = loss_of_logits(s_out)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads)), (loss.detach(), aux)


def loss_center(cfg: DinoConfig, state: TrainState) -> torch.Tensor:
    """The ``[K]`` center the teacher softmax subtracts: the running center, or 0 when ``centering="none"``
    (the state's center then never updates; zeros here also hold for a state resumed from a centered run)."""
    if cfg.centering == "none":
        return torch.zeros_like(state.center)
    return state.center


def apply_update(
    cfg: DinoConfig, state: TrainState, grads: Tree, batch_center: torch.Tensor, sched: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Clip, optimizer step (``cfg.optimizer``), teacher EMA and center EMA, in place on ``state``; returns metrics."""
    names = list(state.student)
    grad_list = [grads[k] for k in names]
    grad_norm = clip_grads_per_param_(grad_list, cfg.clip_grad)
    # The last layer is its own group only when it can be frozen (a static property of the config).
    last = [k for k in names if cfg.freeze_last_layer > 0 and is_last_layer(k)]
    rest = [k for k in names if k not in last]
    for frozen, group in ((None, rest), (sched["last_layer_frozen"], last)):
        decay = [is_regularized(k, state.student[k]) for k in group]
        optimizer_update_(
            cfg,
            state.opt,
            state.student,
            grads,
            group,
            lr=sched["lr"],
            wd=sched["wd"],
            regularized=decay,
            frozen=frozen,
        )
    # Every teacher_update mode is this EMA with its own momentum schedule (0 copies, 1 keeps).
    ema_update_([state.teacher[k] for k in names], [state.student[k] for k in names], sched["momentum"])
    if cfg.centering in ("ema", "sinkhorn"):  # sinkhorn: unused by the loss, kept as a diagnostic
        update_center_(state.center, batch_center, cfg.center_momentum)
    state.step.add_(1)
    return {"grad_norm": grad_norm}


def _full_step(
    cfg: DinoConfig,
    nets: Networks,
    state: TrainState,
    crops: Sequence[torch.Tensor],
    sched: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One optimizer step on one batch without accumulation or collectives (one compiled graph)."""
    grads, out = micro_grads(cfg, nets, state, crops, loss_center(cfg, state), sched["teacher_temp"])
    metrics = apply_update(cfg, state, grads, out.pop("batch_center"), sched)
    return {**out, **metrics}


def _accumulated_step(
    cfg: DinoConfig,
    nets: Networks,
    state: TrainState,
    crops: Sequence[torch.Tensor],
    sched: dict[str, torch.Tensor],
    grad_fn,
    update_fn,
    reducer: Reducer | None,
) -> dict[str, torch.Tensor]:
    """Micro-batched and/or data-parallel step: grads summed over micro-batches (each weighted by
    its share of the batch, so the loss normalization is that of the whole batch), then reduced
    across workers, then one update. Center and teacher are fixed during accumulation."""
    n_micro = cfg.grad_accum_steps
    chunks = [torch.chunk(c, n_micro) for c in crops]
    center = loss_center(cfg, state)
    total: Tree | None = None
    outs: list[dict[str, torch.Tensor]] = []
    for i in range(n_micro):
        grads, out = grad_fn(cfg, nets, state, [c[i] for c in chunks], center, sched["teacher_temp"])
        if total is None:
            total = {k: g / n_micro for k, g in grads.items()}
        else:
            torch._foreach_add_(list(total.values()), list(grads.values()), alpha=1.0 / n_micro)
        outs.append(out)
    out = {k: torch.stack([o[k] for o in outs]).mean(0) for k in outs[0]}
    if reducer is not None:
        # One collective pass over gradients and statistics: every worker averages the same tensors.
        reducer(list(total.values()) + [out["batch_center"]] + [out[k] for k in out if k != "batch_center"])
    metrics = update_fn(cfg, state, total, out.pop("batch_center"), sched)
    return {**out, **metrics}


def check_batch(cfg: DinoConfig, state: TrainState, batch: Sequence[torch.Tensor], world_size: int = 1) -> None:
    """Host-side shape checks of a batch; errors name the problem and the fix."""
    if not isinstance(batch, (list, tuple)):
        raise TypeError(
            f"batch must be a list of {cfg.n_crops} crop tensors (global crops first), got {type(batch).__name__}"
        )
    if len(batch) != cfg.n_crops:
        raise ValueError(
            f"batch has {len(batch)} crops but the config expects n_global_crops + n_local_crops = "
            f"{cfg.n_global_crops} + {cfg.n_local_crops} = {cfg.n_crops}; fix the augmentation or the config"
        )
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    b = None
    for i, (crop, size) in enumerate(zip(batch, sizes)):
        kind = "global" if i < cfg.n_global_crops else "local"
        if not isinstance(crop, torch.Tensor) or crop.ndim != 4:
            raise ValueError(
                f"crop {i} ({kind}) must be a [B, C, H, W] tensor, got {getattr(crop, 'shape', type(crop))}"
            )
        if not crop.is_floating_point():
            raise TypeError(f"crop {i} ({kind}) has dtype {crop.dtype}; convert images to float and normalize them")
        if tuple(crop.shape[-2:]) != (size, size):
            raise ValueError(
                f"crop {i} ({kind}) is {tuple(crop.shape[-2:])} pixels but the config's {kind}_crop_size is {size}; "
                "global crops come first, then local crops"
            )
        if crop.device != state.device:
            raise ValueError(f"crop {i} is on {crop.device} but the state is on {state.device}; move the batch")
        b = crop.shape[0] if b is None else b
        if crop.shape[0] != b:
            raise ValueError(f"crop {i} has {crop.shape[0]} images but crop 0 has {b}: every crop needs the same batch")
    if b * world_size != cfg.batch_size:
        raise ValueError(
            f"batch has B={b} images per crop x {world_size} worker(s) = {b * world_size}, but DinoConfig.batch_size="
            f"{cfg.batch_size} (it scales the lr and normalizes the loss); set batch_size={b * world_size} or pass "
            "full batches"
        )
    if b % cfg.grad_accum_steps:
        raise ValueError(f"B={b} is not divisible by grad_accum_steps={cfg.grad_accum_steps}")


@contextlib.contextmanager
def step_rng(rng: torch.Tensor, device: torch.device):
    """Reseed the device RNG from (seed, draws) for the step and restore the caller's RNG after.

    ``rng`` is a state's ``[2]`` (or a batched state's ``[N, 2]``, seeded from its first row) CPU
    int64 tensor. Stochastic depth draws from the global generator; reseeding per step from the
    state makes the step a function of the state alone (resume reproduces it) without touching
    the caller's RNG.
    """
    seed, draws = (int(v) for v in rng.reshape(-1, 2)[0].tolist())  # a CPU tensor: no device sync
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 0x9E3779B97F4A7C15 + draws) % (2**63))
        yield
    rng[..., 1] += 1


@functools.lru_cache(maxsize=8)
def _compiled(cfg: DinoConfig, kind: str):
    fn = {"full": _full_step, "grads": micro_grads, "update": apply_update}[kind]
    if not cfg.grad_checkpointing or kind == "update":
        return torch.compile(fn, fullgraph=True, dynamic=False)
    # The checkpointing path calls torch.autograd.grad; dynamo traces it into the graph only with
    # trace_autograd_ops (torch >= 2.14). Older versions compile it with graph breaks instead.
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return torch.compile(fn, fullgraph=False, dynamic=False)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)

    @functools.wraps(fn)
    def run(*args):
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args)

    return run


def _run(state: TrainState, batch, *, compiled: bool, reducer: Reducer | None, world_size: int):
    check_batch(state.cfg, state, batch, world_size)
    sched = step_schedules(state.cfg, state.step)
    cfg = graph_config(state.cfg)
    crops, nets = list(batch), networks(cfg, state.device)
    with step_rng(state.rng, state.device), step_batchnorm_sync(cfg, nets, reducer) as bn_synced:
        if cfg.grad_accum_steps == 1 and reducer is None:
            full = _compiled(cfg, "full") if compiled else _full_step
            metrics = full(cfg, nets, state, crops, sched)
        else:
            # Synced BatchNorm's collectives run eagerly (they are not traced into the compiled graph).
            grad_fn = _compiled(cfg, "grads") if compiled and not bn_synced else micro_grads
            if reducer is not None and cfg.centering == "sinkhorn":
                # Sinkhorn's sums across workers run inside the gradient function: eager (collectives are not
                # traced into the compiled graph); the update stays compiled.
                grad_fn = functools.partial(micro_grads, all_reduce_sum=summing(reducer, world_size))
            update_fn = _compiled(cfg, "update") if compiled else apply_update
            metrics = _accumulated_step(cfg, nets, state, crops, sched, grad_fn, update_fn, reducer)
    sched.pop("last_layer_frozen")
    return state, {**sched, **metrics}


def train_step(
    state: TrainState, batch: Sequence[torch.Tensor], *, reducer: Reducer | None = None, world_size: int = 1
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """One DINO optimizer step, compiled with `torch.compile` (one graph per config, built on first use).

    Donates ``state`` (updated in place; see the module docstring). ``reducer`` (data-parallel
    training) averages gradients and statistics across ``world_size`` workers; see `fdino.distributed`.
    Returns ``(state, metrics)``; metrics are 0-d device tensors: loss, lr, wd, momentum,
    teacher_temp, grad_norm, teacher_entropy, teacher_effective_dims, kl, center_norm.
    """
    return _run(state, batch, compiled=True, reducer=reducer, world_size=world_size)


def train_step_eager(
    state: TrainState, batch: Sequence[torch.Tensor], *, reducer: Reducer | None = None, world_size: int = 1
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """`train_step` without `torch.compile` (same math, same donation): the reference path."""
    return _run(state, batch, compiled=False, reducer=reducer, world_size=world_size)
