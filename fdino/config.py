"""`DinoConfig`: every hyperparameter of a DINO run, frozen and validated on creation.

Defaults follow the paper (Caron et al. 2021) and its reference code for ViT-S/16. Named presets
live in `fdino.presets`. A config is hashable, so compiled steps and module templates are cached
per config.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

from . import checks
from .loss_inputs import LOSS_IMPLS

PRECISIONS = ("fp32", "bf16", "auto")
# Ablation switches of the paper's collapse study (sec. 5.3, Fig. 7) and teacher study (sec. 5.2, Table 6);
# "sinkhorn": DINOv2's Sinkhorn-Knopp teacher targets (Oquab et al. 2023), see fdino.sinkhorn.
CENTERINGS = ("ema", "none", "sinkhorn")
TEACHER_UPDATES = ("ema", "student_copy", "previous_epoch", "frozen")
# The projection head's hidden layers: Linear -> [norm] -> activation (fdino.models.DinoHead).
HEAD_NORMS = ("none", "batchnorm", "layernorm")
HEAD_ACTIVATIONS = ("gelu", "relu")
# Optimizers of the reference code (main_dino.py --optimizer): AdamW for ViTs, SGD or LARS for convnets.
OPTIMIZERS = ("adamw", "sgd", "lars")
# Warm-up forms: fdino's own, and the reference code's (utils.cosine_scheduler, DINOLoss's per-epoch table).
LR_WARMUPS = ("fdino", "official")
TEACHER_TEMP_WARMUPS = ("per_step", "per_epoch")
# Sanity caps on the crops per image of a run, shared with fdino.data.MultiCropConfig (which
# DinoConfig's crop fields configure). Not the fused loss kernel's limit on all crops together,
# fdino.loss_inputs.KERNEL_MAX_CROPS, which merely has the same value as MAX_GLOBAL_CROPS.
MAX_GLOBAL_CROPS = 16
MAX_LOCAL_CROPS = 64


@dataclass(frozen=True, kw_only=True)
class DinoConfig:
    """All settings of a DINO training run (model, crops, loss, schedules, optimizer)."""

    # --- backbone -------------------------------------------------------------------------
    arch: str = "vit_small_patch16_224"
    """Any timm model name (ViT, ResNet, ConvNeXt, ...); its classifier is removed."""
    patch_size: int | None = None
    """Override of a ViT's patch size (e.g. 8 for ViT-S/8, 4 for 32 px images)."""
    img_size: int | None = None
    """ViT input size the position embeddings are built for; defaults to `global_crop_size`."""
    backbone_kwargs: tuple[tuple[str, Any], ...] = ()
    """Extra keyword arguments for `timm.create_model`, as (name, value) pairs (e.g. depth)."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate of the student backbone (the teacher shares the module)."""

    # --- projection head (paper section 3.1, appendix) --------------------------------------
    out_dim: int = 65536
    """K: the dimension of the head output the softmax is taken over."""
    head_hidden_dim: int = 2048
    """Width of the head's hidden MLP layers."""
    head_bottleneck_dim: int = 256
    """Width of the L2-normalized bottleneck before the weight-normalized last layer."""
    head_n_layers: int = 3
    """Number of MLP layers before the bottleneck output (1 means one linear layer)."""
    norm_last_layer: bool = True
    """Fix the last layer's weight-norm scale g to 1 (logits are cosines); stabilizes ViT."""
    head_norm: str = "none"
    """Norm after each hidden linear layer of the head: 'none', 'batchnorm' (paper's ResNet-50), 'layernorm'."""
    head_activation: str = "gelu"
    """Activation of the head's hidden layers: 'gelu' (paper) or 'relu'."""
    head_weight_norm: bool = True
    """Weight-normalized last layer (paper); off: a plain linear layer without bias (needs norm_last_layer off)."""
    head_use_bn: bool = False
    """Old spelling of head_norm='batchnorm' (presets, run.json files); read into head_norm, then stored False."""

    # --- multi-crop --------------------------------------------------------------------------
    n_global_crops: int = 2
    """Global crops per image; they are the teacher's inputs (the paper uses 2)."""
    n_local_crops: int = 10
    """Local (small) crops per image, seen by the student only."""
    global_crop_size: int = 224
    """Side of a global crop in pixels."""
    local_crop_size: int = 96
    """Side of a local crop in pixels."""
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    """RandomResizedCrop area range of global crops."""
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    """RandomResizedCrop area range of local crops."""
    augment: tuple[tuple[str, Any], ...] = ()
    """Overrides of the paper's augmentation recipe (fdino.data.MultiCropConfig fields), e.g. hue."""

    # --- loss --------------------------------------------------------------------------------
    student_temp: float = 0.1
    """Student softmax temperature tau_s."""
    teacher_temp: float = 0.04
    """Teacher softmax temperature tau_t after its warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0; linear warm-up to `teacher_temp`."""
    warmup_teacher_temp_epochs: float = 0.0
    """Length of the teacher temperature warm-up, in epochs (see `teacher_temp_warmup`)."""
    teacher_temp_warmup: str = "per_step"
    """'per_step' (a linear ramp over steps) or 'per_epoch' (reference code: linspace over epochs, one per epoch)."""
    center_momentum: float = 0.9
    """m in c <- m c + (1 - m) mean(teacher logits)."""
    # Collapse study (paper sec. 5.3): centering alone -> uniform teacher (entropy near log K),
    # sharpening alone -> one-hot teacher (entropy near 0); see fdino.diagnostics.
    # "sinkhorn" (DINOv2) replaces the centered softmax by Sinkhorn-Knopp targets over the whole batch (all
    # workers); the center is then unused by the loss but keeps its EMA (center_norm stays a diagnostic, and a
    # resume with "ema" starts from a warm center). Its loss takes probabilities, so it runs the reference loss:
    # the fused kernel computes the teacher softmax from logits and a center inside the kernel.
    centering: str = "ema"
    """'ema' (paper), 'none' (center 0), 'sinkhorn' (DINOv2 targets); no sharpening is teacher_temp == student_temp."""
    sinkhorn_iterations: int = 3
    """Row/column normalization rounds of centering='sinkhorn' (DINOv2: 3)."""
    # KoLeo (DINOv2; Sablayrolles et al. 2019): -mean log(distance to the nearest neighbour) of the student's
    # L2-normalized backbone features, per global crop over each worker's (micro-)batch as DINOv2 does, summed
    # over the global crops; with several workers or micro-batches it is therefore not one big batch's value.
    koleo_weight: float = 0.0
    """Weight of the KoLeo regularizer on the student's global-crop backbone features (0: off; DINOv2: 0.1)."""
    loss_impl: str = "auto"
    """'auto' (fused Triton kernel on CUDA, reference elsewhere), 'triton' or 'reference'."""

    # --- schedules and optimizer ---------------------------------------------------------------
    epochs: int = 100
    """Length of the run; the cosine schedules end here."""
    steps_per_epoch: int = 1000
    """Optimizer steps per epoch (data set size // batch_size); converts epochs to steps."""
    schedule_steps: int = 0
    """The run's length in steps (0: epochs x steps_per_epoch); every epoch length of the schedule scales with it."""
    batch_size: int = 1024
    """Images per optimizer step summed over devices and micro-batches (scales the lr)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; center and teacher EMA update once per step."""
    lr: float = 5e-4
    """Peak learning rate per 256 images; the applied peak is lr * batch_size / 256."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: float = 10.0
    """Linear learning-rate warm-up from 0, in epochs (see `lr_warmup`)."""
    lr_warmup: str = "fdino"
    """'fdino' (peak * s / W over W steps) or 'official' (reference code: np.linspace(0, peak, W), peak at W - 1)."""
    weight_decay: float = 0.04
    """Weight decay at step 0 (cosine to `weight_decay_end`); not applied to biases and norms."""
    weight_decay_end: float = 0.4
    """Weight decay at the last step."""
    optimizer: str = "adamw"
    """'adamw' (ViTs), 'sgd' (momentum, L2 weight decay) or 'lars' (SGD, layer-wise trust ratio) as main_dino.py."""
    optimizer_momentum: float = 0.9
    """Momentum of 'sgd' and 'lars' (mu <- m mu + update); AdamW uses `adam_betas` instead."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW beta1, beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 3.0
    """Clip each parameter's gradient norm to this value (paper semantics); 0 disables."""
    freeze_last_layer: float = 1.0
    """Epochs during which the head's last layer is not updated at all."""
    teacher_momentum: float = 0.996
    """Teacher EMA momentum at step 0; cosine schedule to `teacher_momentum_end`."""
    teacher_momentum_end: float = 1.0
    """Teacher EMA momentum at the last step."""
    # Teacher study (paper sec. 5.2, Table 6). Every mode is the same EMA with its own momentum per
    # step (0: copy the student, 1: keep); see fdino.schedules.teacher_momentum.
    teacher_update: str = "ema"
    """'ema' (cosine momentum), 'student_copy' (= student), 'previous_epoch' (copied at epoch ends), 'frozen'."""

    # --- execution -------------------------------------------------------------------------------
    precision: str = "fp32"
    """'fp32'; 'bf16' autocast for the forwards (teacher logits, center, loss stay fp32); 'auto': bf16 where fast."""
    grad_checkpointing: bool = False
    """Recompute backbone blocks in the backward pass to save activation memory."""
    sync_batchnorm: bool = True
    """Data parallelism: BatchNorm statistics over all workers' images (as SyncBatchNorm); no effect on ViTs."""
    seed: int = 0
    """Seed of parameter initialization and of the step's RNG stream."""

    def __post_init__(self) -> None:
        # Pairs may arrive as lists (JSON, user code); configs must stay hashable (they key caches).
        for name in ("backbone_kwargs", "augment"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, _frozen(value))
        _fold_head_use_bn(self)
        _validate(self)

    # Derived quantities used by the schedules, kept here so every caller agrees.
    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run."""
        return self.schedule_steps or self.epochs * self.steps_per_epoch

    @property
    def schedule_epoch_steps(self) -> float:
        """Steps per epoch of the schedule: ``steps_per_epoch``, scaled by ``schedule_steps`` when that is set,
        so warm-ups and the last-layer freeze keep their share of a run fitted to a budget (`fdino.budget`)."""
        if not self.schedule_steps:
            return float(self.steps_per_epoch)
        return self.schedule_steps / self.epochs

    @property
    def n_crops(self) -> int:
        """V: all crops per image, global first."""
        return self.n_global_crops + self.n_local_crops

    @property
    def peak_lr(self) -> float:
        """The learning rate at the end of warm-up: lr scaled linearly by batch_size / 256."""
        return self.lr * self.batch_size / 256.0

    def replace(self, **changes: Any) -> DinoConfig:
        """A copy with some fields changed (validated again)."""
        if changes.get("head_use_bn") is False and "head_norm" not in changes and self.head_norm == "batchnorm":
            changes["head_norm"] = "none"  # the old spelling's "off" (it is stored False even when BN is on)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DinoConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown DinoConfig field(s) {unknown}; known fields: {sorted(names)}")
        fixed = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            fixed[key] = value
        return cls(**fixed)


def _frozen(value: Any) -> Any:
    """Nested lists -> nested tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _fold_head_use_bn(cfg: DinoConfig) -> None:
    """``head_use_bn=True`` (the field's old meaning) -> ``head_norm='batchnorm'``, stored as False.

    One spelling per head, so configs that build the same network are equal (and hash equal: they
    key compiled steps), and merging a run.json or preset over another (`fdino.cli`) cannot leave
    two fields contradicting each other.
    """
    if cfg.head_use_bn is True:
        if cfg.head_norm not in ("none", "batchnorm"):
            _fail("head_use_bn", True, f"False with head_norm={cfg.head_norm!r} (head_use_bn=True means 'batchnorm')")
        object.__setattr__(cfg, "head_norm", "batchnorm")
        object.__setattr__(cfg, "head_use_bn", False)
    elif cfg.head_use_bn is not False:
        _fail("head_use_bn", cfg.head_use_bn, "a bool (better: head_norm='batchnorm' or 'none')")


def _fail(name: str, value: Any, allowed: str) -> None:
    checks.fail(f"DinoConfig.{name}", value, allowed)


def _check_range(cfg: DinoConfig, name: str, lo: float, hi: float, *, lo_open=False, hi_open=False):
    checks.check_real(f"DinoConfig.{name}", getattr(cfg, name), lo, hi, lo_open=lo_open, hi_open=hi_open)


def _check_int(cfg: DinoConfig, name: str, lo: int, hi: int = 2**31) -> None:
    checks.check_int(f"DinoConfig.{name}", getattr(cfg, name), lo, hi)


def _check_scale(cfg: DinoConfig, name: str) -> None:
    value = getattr(cfg, name)
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(checks.is_number(v) for v in value)
        and 0 < value[0] <= value[1] <= 1
    )
    if not ok:
        _fail(name, value, "a pair (lo, hi) with 0 < lo <= hi <= 1")


def _check_sinkhorn(cfg: DinoConfig) -> None:
    if cfg.grad_accum_steps != 1:
        _fail(
            "grad_accum_steps",
            cfg.grad_accum_steps,
            "1 with centering='sinkhorn' (its targets normalize over the whole batch, which micro-batches would "
            "split); use centering='ema' or a smaller batch_size without accumulation",
        )
    if cfg.loss_impl == "triton":
        _fail(
            "loss_impl",
            cfg.loss_impl,
            "'auto' or 'reference' with centering='sinkhorn' (the fused kernel takes teacher logits and a center, "
            "not the Sinkhorn target probabilities)",
        )


def _validate(cfg: DinoConfig) -> None:
    if not isinstance(cfg.arch, str) or not cfg.arch:
        _fail("arch", cfg.arch, "a timm model name such as 'vit_small_patch16_224' or 'resnet50'")
    for name in ("patch_size", "img_size"):
        if getattr(cfg, name) is not None:
            _check_int(cfg, name, 1)
    if not isinstance(cfg.backbone_kwargs, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in cfg.backbone_kwargs
    ):
        _fail("backbone_kwargs", cfg.backbone_kwargs, "a tuple of (name, value) pairs")
    _check_range(cfg, "drop_path_rate", 0.0, 1.0, hi_open=True)
    _check_int(cfg, "out_dim", 1, 2**22)
    _check_int(cfg, "head_hidden_dim", 1)
    _check_int(cfg, "head_bottleneck_dim", 1)
    _check_int(cfg, "head_n_layers", 1, 16)
    if cfg.head_norm not in HEAD_NORMS:
        _fail("head_norm", cfg.head_norm, f"one of {HEAD_NORMS}")
    if cfg.head_activation not in HEAD_ACTIVATIONS:
        _fail("head_activation", cfg.head_activation, f"one of {HEAD_ACTIVATIONS}")
    if not isinstance(cfg.head_weight_norm, bool):
        _fail("head_weight_norm", cfg.head_weight_norm, "True or False")
    if not cfg.head_weight_norm and cfg.norm_last_layer:
        _fail(
            "norm_last_layer",
            True,
            "False when head_weight_norm=False (it fixes the weight-norm scale, which a plain last layer does not "
            "have: --norm-last-layer false), or keep head_weight_norm",
        )
    _check_int(cfg, "n_global_crops", 1, MAX_GLOBAL_CROPS)
    _check_int(cfg, "n_local_crops", 0, MAX_LOCAL_CROPS)
    if cfg.n_crops < 2:
        _fail("n_local_crops", cfg.n_local_crops, "at least 1 when n_global_crops is 1 (no pairs)")
    _check_int(cfg, "global_crop_size", 1)
    _check_int(cfg, "local_crop_size", 1)
    if not isinstance(cfg.augment, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in cfg.augment
    ):
        _fail("augment", cfg.augment, "a tuple of (MultiCropConfig field, value) pairs")
    _check_scale(cfg, "global_crop_scale")
    _check_scale(cfg, "local_crop_scale")
    _check_range(cfg, "student_temp", 0.0, 100.0, lo_open=True)
    _check_range(cfg, "teacher_temp", 0.0, 100.0, lo_open=True)
    _check_range(cfg, "warmup_teacher_temp", 0.0, 100.0, lo_open=True)
    _check_range(cfg, "warmup_teacher_temp_epochs", 0.0, float(cfg.epochs) if isinstance(cfg.epochs, int) else 0.0)
    _check_range(cfg, "center_momentum", 0.0, 1.0)
    _check_int(cfg, "epochs", 1)
    _check_int(cfg, "steps_per_epoch", 1)
    _check_int(cfg, "schedule_steps", 0)
    _check_int(cfg, "batch_size", 1)
    _check_int(cfg, "grad_accum_steps", 1)
    if cfg.batch_size % cfg.grad_accum_steps:
        _fail("grad_accum_steps", cfg.grad_accum_steps, f"a divisor of batch_size={cfg.batch_size}")
    _check_range(cfg, "lr", 0.0, 10.0)
    _check_range(cfg, "min_lr", 0.0, 10.0)
    _check_range(cfg, "warmup_epochs", 0.0, float(cfg.epochs))
    _check_range(cfg, "weight_decay", 0.0, 10.0)
    _check_range(cfg, "weight_decay_end", 0.0, 10.0)
    b = cfg.adam_betas
    if not (isinstance(b, tuple) and len(b) == 2 and all(isinstance(x, float) and 0 <= x < 1 for x in b)):
        _fail("adam_betas", b, "a pair of floats in [0, 1)")
    _check_range(cfg, "adam_eps", 0.0, 1.0, lo_open=True)
    if cfg.optimizer not in OPTIMIZERS:
        _fail("optimizer", cfg.optimizer, f"one of {OPTIMIZERS}")
    _check_range(cfg, "optimizer_momentum", 0.0, 1.0, hi_open=True)
    if cfg.lr_warmup not in LR_WARMUPS:
        _fail("lr_warmup", cfg.lr_warmup, f"one of {LR_WARMUPS}")
    if cfg.teacher_temp_warmup not in TEACHER_TEMP_WARMUPS:
        _fail("teacher_temp_warmup", cfg.teacher_temp_warmup, f"one of {TEACHER_TEMP_WARMUPS}")
    if cfg.teacher_temp_warmup == "per_epoch" and cfg.warmup_teacher_temp_epochs != int(cfg.warmup_teacher_temp_epochs):
        _fail(
            "warmup_teacher_temp_epochs",
            cfg.warmup_teacher_temp_epochs,
            "a whole number of epochs with teacher_temp_warmup='per_epoch' (or use 'per_step')",
        )
    _check_range(cfg, "clip_grad", 0.0, 1e9)
    _check_range(cfg, "freeze_last_layer", 0.0, float(cfg.epochs))
    _check_range(cfg, "teacher_momentum", 0.0, 1.0)
    _check_range(cfg, "teacher_momentum_end", 0.0, 1.0)
    if cfg.centering not in CENTERINGS:
        _fail("centering", cfg.centering, f"one of {CENTERINGS}")
    _check_int(cfg, "sinkhorn_iterations", 1, 1000)
    _check_range(cfg, "koleo_weight", 0.0, 1e6)
    if cfg.centering == "sinkhorn":
        _check_sinkhorn(cfg)
    if cfg.teacher_update not in TEACHER_UPDATES:
        _fail("teacher_update", cfg.teacher_update, f"one of {TEACHER_UPDATES}")
    if cfg.loss_impl not in LOSS_IMPLS:
        _fail("loss_impl", cfg.loss_impl, f"one of {LOSS_IMPLS}")
    if cfg.precision not in PRECISIONS:
        _fail("precision", cfg.precision, f"one of {PRECISIONS}")
    _check_int(cfg, "seed", 0, 2**63 - 1)
    if not isinstance(cfg.sync_batchnorm, bool):
        _fail("sync_batchnorm", cfg.sync_batchnorm, "True or False")


def config_fields() -> list[dataclasses.Field]:
    """The fields of DinoConfig in declaration order (for CLIs and docs)."""
    return list(dataclasses.fields(DinoConfig))


def field_doc(name: str, cls: type = DinoConfig) -> str:
    """The one-line docstring written under a field of dataclass ``cls`` (parsed from its source)."""
    return _field_docs(cls).get(name, "")


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs


__all__ = [
    "DinoConfig",
    "config_fields",
    "field_doc",
    "CENTERINGS",
    "HEAD_ACTIVATIONS",
    "HEAD_NORMS",
    "LR_WARMUPS",
    "MAX_GLOBAL_CROPS",
    "MAX_LOCAL_CROPS",
    "OPTIMIZERS",
    "PRECISIONS",
    "TEACHER_TEMP_WARMUPS",
    "TEACHER_UPDATES",
]
