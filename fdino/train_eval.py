"""Evaluation during training: the teacher's k-NN on a held-out split, and its attention maps at the end.

`EvalSets.build` picks the labeled memory bank and queries once per run; `evaluate_knn` loads the
state's backbone weights into the module it keeps, so an evaluation builds nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .checkpoint import backbone_weights
from .config import DinoConfig
from .data import EvalTransform, build_dataset
from .eval.attention import save_attention_grid
from .eval.features import extract_features, raw_pixel_knn
from .eval.knn import knn_classify
from .models import create_backbone, is_vit
from .state import TrainState


def _evenly_spaced(dataset: Dataset, n: int) -> Dataset:
    """A deterministic subset of ``n`` items spread over the whole data set (all classes present)."""
    if n <= 0 or n >= len(dataset):
        return dataset
    step = len(dataset) / n
    return Subset(dataset, [int(i * step) for i in range(n)])


def _has_labels(dataset: Dataset) -> bool:
    probe = [dataset[i][1] for i in range(min(len(dataset), 8))]
    return bool(probe) and all(int(label) >= 0 for label in probe)


@dataclass
class EvalSets:
    """Labeled memory bank and queries for k-NN, and a backbone module to load weights into."""

    memory: Dataset | None
    query: Dataset | None
    backbone: torch.nn.Module
    transform: Any
    k: int
    device: torch.device
    num_classes: int
    note: str = ""

    @property
    def labeled(self) -> bool:
        return self.memory is not None and self.query is not None

    @classmethod
    def build(cls, opts, cfg: DinoConfig, device: torch.device) -> EvalSets:
        backbone = create_backbone(cfg.replace(grad_checkpointing=False), drop_path_rate=0.0).to(device).eval()
        transform = EvalTransform(cfg.global_crop_size)
        memory = query = None
        num_classes, note = 0, "no labels: k-NN skipped"

        def build(split: str):
            return build_dataset(opts.data, root=opts.data_root, split=split, image_size=cfg.global_crop_size)

        try:
            mem_src = build("memory")
        except ValueError:
            mem_src = None  # e.g. a flat folder: nothing labeled to evaluate on
        if mem_src is not None and _has_labels(mem_src.dataset):
            try:
                mem, qry = mem_src.dataset, build("query").dataset
                note = "memory bank: train split, queries: held-out split"
            except ValueError:
                # A labeled folder without val/ or test/: every 5th image becomes a query. Training
                # still sees every image (without labels), as on ImageNet's train split.
                idx = range(len(mem_src.dataset))
                mem = Subset(mem_src.dataset, [i for i in idx if i % 5])
                qry = Subset(mem_src.dataset, [i for i in idx if not i % 5])
                note = "labeled folder without a val/ split: every 5th image is a k-NN query"
            if _has_labels(qry):
                memory = _evenly_spaced(mem, opts.eval_samples)
                query = _evenly_spaced(qry, opts.eval_samples // 2 if opts.eval_samples else 0)
                num_classes = mem_src.num_classes
        return cls(memory, query, backbone, transform, opts.knn_k, device, num_classes, note)

    def features(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(self.backbone, dataset, batch_size=256, device=self.device, transform=self.transform)

    def raw_pixel_knn(self) -> float:
        result = raw_pixel_knn(self.memory, self.query, ks=(self.k,), num_classes=self.num_classes or None)
        return result[self.k]["top1"]


def evaluate_knn(evals: EvalSets, state: TrainState, which: str = "teacher") -> float:
    """Weighted k-NN top-1 (%) of the teacher's (or student's) backbone features."""
    evals.backbone.load_state_dict(backbone_weights(state, which), strict=True)
    bank, bank_labels = evals.features(evals.memory)
    queries, query_labels = evals.features(evals.query)
    result = knn_classify(
        bank, bank_labels, queries, query_labels, ks=(evals.k,), num_classes=evals.num_classes or None
    )
    return result[evals.k]["top1"]


def save_attention(run_dir: Path, evals: EvalSets | None, state: TrainState, n_images: int) -> Path | None:
    """Attention maps of the trained teacher on the first query images (ViT backbones only)."""
    if n_images <= 0 or evals is None or not is_vit(evals.backbone) or evals.query is None:
        return None
    evals.backbone.load_state_dict(backbone_weights(state, "teacher"), strict=True)
    images = torch.stack([evals.transform(evals.query[i][0]) for i in range(min(n_images, len(evals.query)))])
    return save_attention_grid(
        evals.backbone,
        images.to(evals.device),
        run_dir / "attention" / "teacher.png",
        mean=evals.transform.mean,
        std=evals.transform.std,
    )
