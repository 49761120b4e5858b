"""Evaluation during training: the teacher's k-NN on a held-out split, snapshots of its features, attention maps.

`EvalSets.build` picks the labeled memory bank and queries once per run; `evaluate_knn` loads the
state's backbone weights into the module it keeps, so an evaluation builds nothing new.
`evaluate_and_snapshot` is the training job's evaluation: the k-NN number and, from the query
features that k-NN already extracted, ``embeddings/step-N.png`` (a PCA scatter coloured by label;
t-SNE in ``embeddings/tsne/`` on request) and, for ViTs, ``attention/step-N.png``. Nothing here
draws from the global RNG, so a run with snapshots ends bitwise equal to one without.
"""

from __future__ import annotations

import functools
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
from .eval.render import denormalize
from .eval.tsne import tsne
from .eval.viz import pca, save_scatter, subsample
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
    classes: tuple[str, ...] = ()

    @property
    def labeled(self) -> bool:
        return self.memory is not None and self.query is not None

    @classmethod
    def build(cls, opts, cfg: DinoConfig, device: torch.device) -> EvalSets:
        backbone = create_backbone(cfg.replace(grad_checkpointing=False), drop_path_rate=0.0).to(device).eval()
        transform = EvalTransform(cfg.global_crop_size)
        memory = query = None
        num_classes, note, classes = 0, "no labels: k-NN skipped", ()

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
                num_classes, classes = mem_src.num_classes, tuple(mem_src.classes)
        return cls(memory, query, backbone, transform, opts.knn_k, device, num_classes, note, classes)

    def features(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(self.backbone, dataset, batch_size=256, device=self.device, transform=self.transform)

    def raw_pixel_knn(self) -> float:
        result = raw_pixel_knn(self.memory, self.query, ks=(self.k,), num_classes=self.num_classes or None)
        return result[self.k]["top1"]

    @functools.cached_property
    def snapshot_rows(self) -> torch.Tensor:
        """Indices of the queries plotted in every snapshot (the same ones each time, at most SNAPSHOT_POINTS).

        `subsample` draws them with its own seeded generator: the global RNG is left alone."""
        return subsample(len(self.query), SNAPSHOT_POINTS)

    @functools.cached_property
    def thumbnails(self) -> torch.Tensor:
        """``[n, 3, s, s]`` in [0, 1], s <= THUMBNAIL_PX: the plotted queries for TensorBoard's projector.

        The images do not change during a run, so they are loaded and shrunk once, at the first snapshot."""
        images = torch.stack([self.transform(self.query[int(i)][0]) for i in self.snapshot_rows])
        pixels = denormalize(images, self.transform.mean, self.transform.std)
        if max(pixels.shape[-2:]) > THUMBNAIL_PX:
            pixels = torch.nn.functional.interpolate(
                pixels, size=(THUMBNAIL_PX, THUMBNAIL_PX), antialias=True, mode="bilinear", align_corners=False
            ).clamp(0, 1)
        return pixels


SNAPSHOT_POINTS = 1000  # a legible scatter; its exact t-SNE takes ~20 s on 2 CPU cores (O(N^2) per iteration)
THUMBNAIL_PX = 32  # projector sprite cells: 1000 of them make a 1024 px sprite (TensorBoard's limit: 8192)


def knn_reading(evals: EvalSets, state: TrainState, which: str = "teacher") -> tuple[float, torch.Tensor, torch.Tensor]:
    """Weighted k-NN top-1 (%), and the query features ``[Q, D]`` (CPU) and labels ``[Q]`` it classified."""
    evals.backbone.load_state_dict(backbone_weights(state, which), strict=True)
    bank, bank_labels = evals.features(evals.memory)
    queries, query_labels = evals.features(evals.query)
    result = knn_classify(
        bank, bank_labels, queries, query_labels, ks=(evals.k,), num_classes=evals.num_classes or None
    )
    return result[evals.k]["top1"], queries, query_labels


def evaluate_knn(evals: EvalSets, state: TrainState, which: str = "teacher") -> float:
    """Weighted k-NN top-1 (%) of the teacher's (or student's) backbone features."""
    return knn_reading(evals, state, which)[0]


@dataclass(frozen=True)
class Snapshot:
    """What one evaluation left for the trackers (`fdino.run_log.MetricsLog.snapshot`)."""

    step: int
    images: dict[str, Path]
    """Tracker tag -> PNG written in the run folder (``embeddings/pca``, ``attention/teacher``, ...)."""
    features: torch.Tensor
    """``[n, D]`` teacher features of the plotted queries (CPU float32), for TensorBoard's projector."""
    labels: list[str]
    """The ``n`` queries' class names (or label numbers), the projector's metadata."""
    thumbnails: torch.Tensor | None
    """``[n, 3, s, s]`` in [0, 1], the projector's images; None when no tracker shows them."""


def evaluate_and_snapshot(
    run_dir: Path, evals: EvalSets, state: TrainState, step: int, opts, probe=None
) -> tuple[float, float | None, Snapshot | None]:
    """The teacher's k-NN top-1 (%) at ``step``, the online linear ``probe``'s top-1 (%) on the same held-out
    query features (None without a probe, `fdino.train_probe.OnlineProbe`), and the snapshot unless
    ``opts.embedding_snapshots`` is off.

    The snapshot reuses the features k-NN extracted (the backbone runs once per query) and writes
    ``embeddings/step-N.png`` (PCA), ``embeddings/tsne/step-N.png`` with ``opts.embedding_tsne``
    and, for a ViT, ``attention/step-N.png`` on the same ``opts.attention_images`` queries as the
    final ``attention/teacher.png``. PCA and t-SNE are deterministic; a second evaluation at the
    same step (a resumed run) rewrites the same files.
    """
    top1, queries, labels = knn_reading(evals, state)
    probe_top1 = probe.held_out_top1(queries, labels) if probe is not None else None
    if not opts.embedding_snapshots:
        return top1, probe_top1, None
    rows = evals.snapshot_rows
    features, labels = queries[rows], labels[rows]
    projections = [("pca", "PCA", pca, run_dir / "embeddings")]
    if opts.embedding_tsne:  # seconds per evaluation on a CPU, hence opt-in
        projections.append(("tsne", "t-SNE", tsne, run_dir / "embeddings" / "tsne"))
    images = {}
    for kind, name, project, folder in projections if len(rows) >= 3 else ():  # t-SNE needs 3 points, PCA 2
        title = f"teacher at step {step}: {name} of {len(rows)} held-out images, {evals.k}-NN {top1:.1f}%"
        images[f"embeddings/{kind}"] = save_scatter(
            project(features), labels, folder / f"step-{step}.png", title=title, class_names=evals.classes
        )
    attention = save_attention(run_dir, evals, state, opts.attention_images, name=f"step-{step}")
    if attention is not None:
        images["attention/teacher"] = attention
    names = [evals.classes[v] if 0 <= v < len(evals.classes) else str(v) for v in labels.tolist()]
    thumbnails = evals.thumbnails if "tensorboard" in opts.tracker_names else None
    return top1, probe_top1, Snapshot(step, images, features, names, thumbnails)


def save_attention(
    run_dir: Path, evals: EvalSets | None, state: TrainState, n_images: int, *, name: str = "teacher"
) -> Path | None:
    """``attention/<name>.png``: the teacher's attention maps on the first query images (ViT backbones only)."""
    if n_images <= 0 or evals is None or not is_vit(evals.backbone) or evals.query is None:
        return None
    evals.backbone.load_state_dict(backbone_weights(state, "teacher"), strict=True)
    images = torch.stack([evals.transform(evals.query[i][0]) for i in range(min(n_images, len(evals.query)))])
    return save_attention_grid(
        evals.backbone,
        images.to(evals.device),
        run_dir / "attention" / f"{name}.png",
        mean=evals.transform.mean,
        std=evals.transform.std,
    )
