"""The training job's online linear probe (``TrainOptions.linear_probe``): `fdino.probe` driven by the loop.

Rank 0 alone trains it (the other ranks' shards add nothing a progress signal needs), after each
``probe_every``-th DINO step, on the teacher's features of the batch's first global crop and the
batch's labels. At log steps `reading` gives its running training top-1 since the previous log (for
metrics.jsonl and the trackers); at k-NN evaluations `held_out_top1` classifies the held-out query
features that k-NN extracted anyway. The probe and its open window of counts are saved in every
checkpoint (``ckpt["probe"]``), so a resumed run continues it exactly.
"""

from __future__ import annotations

import torch

from .probe import LinearProbe, init_probe, probe_from_dict, probe_to_dict, probe_top1, probe_update_, teacher_features
from .state import TrainState

_WINDOW = ("window.loss", "window.correct", "window.seen", "window.updates")


class OnlineProbe:
    """A `LinearProbe` plus the counts of its current logging window (device tensors: no per-step host read)."""

    def __init__(self, probe: LinearProbe, *, lr: float, every: int, window: dict[str, torch.Tensor] | None = None):
        self.probe, self.lr, self.every = probe, lr, every
        device = probe.params["weight"].device
        self.window = window or {k: torch.zeros((), dtype=torch.float64, device=device) for k in _WINDOW}

    @classmethod
    def start(cls, opts, evals, saved: dict[str, torch.Tensor] | None, device: torch.device) -> OnlineProbe | None:
        """The run's probe: None unless ``opts.linear_probe`` and the data set has labels (``evals.labeled``);
        ``saved``: a checkpoint's ``probe`` entry to continue from."""
        if not opts.linear_probe or evals is None or not evals.labeled:
            return None
        if saved:
            window = {k: saved[k].to(device) for k in _WINDOW}
            probe = probe_from_dict({k: v for k, v in saved.items() if k not in _WINDOW}, device)
        else:
            window, probe = None, init_probe(int(evals.backbone.num_features), evals.num_classes, device)
        return cls(probe, lr=opts.probe_lr, every=opts.probe_every, window=window)

    def after_step(self, step: int, state: TrainState, crops: list[torch.Tensor], labels: torch.Tensor) -> None:
        """Train on the batch the DINO step ``step`` just took (its first global crop), with the updated teacher."""
        if step % self.every or bool((labels < 0).any()):  # CPU labels; unlabeled images (-1): nothing to learn
            return
        labels = labels.to(crops[0].device)
        out = probe_update_(self.probe, teacher_features(state, crops[0]), labels, lr=self.lr)
        for key in ("loss", "correct", "seen"):
            self.window[f"window.{key}"] += out[key] * (out["seen"] if key == "loss" else 1)
        self.window["window.updates"] += 1

    def reading(self) -> dict[str, float]:
        """``probe_train_top1`` (%) and ``probe_loss`` over the updates since the last reading; then a new window.
        Empty when no update happened in the window."""
        seen = float(self.window["window.seen"])
        values = {}
        if seen > 0:
            values = {
                "probe_train_top1": 100.0 * float(self.window["window.correct"]) / seen,
                "probe_loss": float(self.window["window.loss"]) / seen,
            }
        for t in self.window.values():
            t.zero_()
        return values

    def held_out_top1(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return probe_top1(self.probe, features, labels)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {**probe_to_dict(self.probe), **self.window}
