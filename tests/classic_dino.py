"""A classic imperative DINO step, structured like the paper's reference training loop.

Written independently of fdino's step for the equivalence tests: nn.Module student and teacher,
`torch.optim.AdamW` (or, per ``cfg.optimizer``, `torch.optim.SGD` with momentum, or `ReferenceLARS`)
with two parameter groups, a per-pair Python loop for the loss, per-parameter gradient clipping,
last-layer gradients set to None while frozen, and a per-parameter EMA loop. Schedules are evaluated
with Python floats from their closed forms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fdino import DinoConfig
from fdino.models import create_network


class ReferenceLARS(torch.optim.Optimizer):
    """LARS written from its equations, one parameter at a time (as the reference code's utils.LARS):
    d = g + wd p and d *= eta ||p|| / ||d|| (when both norms > 0) for ndim > 1; mu = m mu + d; p -= lr mu."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.clone()
                if p.ndim > 1:
                    d = d + group["weight_decay"] * p
                    p_norm, d_norm = float(p.norm()), float(d.norm())
                    if p_norm > 0 and d_norm > 0:
                        d = d * (group["eta"] * p_norm / d_norm)
                state = self.state[p]
                mu = state.setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(d)
                p.sub_(group["lr"] * mu)


def _cosine(start, end, progress):
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


class ClassicDino:
    def __init__(self, cfg: DinoConfig, student_init: dict, buffers_init: dict):
        self.cfg = cfg
        self.student = create_network(cfg)
        self.teacher = create_network(cfg, teacher=True)
        for net in (self.student, self.teacher):
            net.load_state_dict({**student_init, **buffers_init})
            net.train()
        for p in self.teacher.parameters():
            p.requires_grad = False
        regularized, not_regularized = [], []
        for name, p in self.student.named_parameters():
            (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
        groups = [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
        if cfg.optimizer == "sgd":  # main_dino.py: torch.optim.SGD(params_groups, lr=0, momentum=0.9)
            self.opt = torch.optim.SGD(groups, lr=0.0, momentum=cfg.optimizer_momentum)
        elif cfg.optimizer == "lars":
            self.opt = ReferenceLARS(groups, momentum=cfg.optimizer_momentum)
        else:
            self.opt = torch.optim.AdamW(groups, lr=0.0, betas=cfg.adam_betas, eps=cfg.adam_eps)
        self.center = torch.zeros(1, cfg.out_dim)
        self.it = 0

    def schedules(self):
        cfg, s = self.cfg, self.it
        total, warm = cfg.total_steps, round(cfg.warmup_epochs * cfg.steps_per_epoch)
        peak = cfg.lr * cfg.batch_size / 256
        ramp_end = max(warm - 1, 1) if cfg.lr_warmup == "official" else warm  # np.linspace(0, peak, W) or s / W
        lr = peak * s / ramp_end if s < warm else _cosine(peak, cfg.min_lr, (s - warm) / max(total - warm, 1))
        wd = _cosine(cfg.weight_decay, cfg.weight_decay_end, s / total)
        m = _cosine(cfg.teacher_momentum, cfg.teacher_momentum_end, s / total)
        t_warm = cfg.warmup_teacher_temp_epochs * cfg.steps_per_epoch
        tt = (
            cfg.teacher_temp
            if t_warm <= 0
            else (cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * min(s / t_warm, 1.0))
        )
        if cfg.teacher_temp_warmup == "per_epoch" and t_warm > 0:  # DINOLoss's table, indexed by epoch
            n, epoch = int(cfg.warmup_teacher_temp_epochs), s // cfg.steps_per_epoch
            ramp = cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * epoch / max(n - 1, 1)
            tt = ramp if epoch < max(n - 1, 1) else cfg.teacher_temp
        return lr, wd, m, tt

    def loss(self, student_out, teacher_out, teacher_temp):
        cfg = self.cfg
        student_chunks = (student_out / cfg.student_temp).chunk(cfg.n_crops)
        teacher_chunks = (
            F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach().chunk(cfg.n_global_crops)
        )
        total, n = 0.0, 0
        for iq, q in enumerate(teacher_chunks):
            for v in range(cfg.n_crops):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student_chunks[v], dim=-1), dim=-1).mean()
                n += 1
        return total / n

    def step(self, crops):
        cfg = self.cfg
        lr, wd, m, tt = self.schedules()
        for i, group in enumerate(self.opt.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        with torch.no_grad():
            teacher_out = self.teacher(crops[: cfg.n_global_crops])
        student_out = self.student(crops)
        loss = self.loss(student_out, teacher_out, tt)
        batch_center = teacher_out.sum(dim=0, keepdim=True) / len(teacher_out)
        self.center = self.center * cfg.center_momentum + batch_center * (1 - cfg.center_momentum)
        self.opt.zero_grad()
        loss.backward()
        if cfg.clip_grad > 0:
            for p in self.student.parameters():
                if p.grad is not None:
                    clip_coef = cfg.clip_grad / (p.grad.norm(2) + 1e-6)
                    if clip_coef < 1:
                        p.grad.mul_(clip_coef)
        if self.it < round(cfg.freeze_last_layer * cfg.steps_per_epoch):
            for name, p in self.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        self.opt.step()
        with torch.no_grad():
            for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
                pt.mul_(m).add_((1 - m) * ps.detach())
        self.it += 1
        return float(loss.detach())
