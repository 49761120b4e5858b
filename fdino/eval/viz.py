"""Pictures of a representation: PCA / t-SNE scatter plots, and patch features as colours.

* `pca` and `tsne` (in `fdino.eval.tsne`) map features ``[N, D]`` to 2-D; `save_scatter` draws
  the points coloured by label.
* `patch_pca_rgb` shows what the DINOv2 paper's figure 1 shows: the first three principal
  components of the last block's patch tokens, fitted jointly over a set of images, as RGB, so
  corresponding parts of different images get the same colour. The optional foreground split
  (DINOv2: threshold the first component, then refit PCA on the foreground patches) is
  `foreground=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..models import is_vit
from .render import cell_scale, denormalize, enlarge, save_grid


def pca(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Projection on the first ``k`` principal components: ``[N, D] -> [N, k]`` float32.

    Exact (eigendecomposition of the D x D covariance, in float64) for D <= 2048, randomized
    (`torch.pca_lowrank`) above. Signs are fixed so each component's largest-magnitude loading is
    positive, making the output deterministic.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca needs [N >= 2, D] features, got {tuple(x.shape)}")
    k = min(k, x.shape[1])
    centered = x.double() - x.double().mean(dim=0)
    if x.shape[1] <= 2048:
        _, vectors = torch.linalg.eigh(centered.T @ centered)  # ascending eigenvalues
        basis = vectors.flip(-1)[:, :k]  # (D, k)
    else:
        _, _, v = torch.pca_lowrank(centered, q=min(k + 8, *centered.shape), center=False, niter=6)
        basis = v[:, :k]
    pivot = basis.abs().argmax(dim=0)
    basis = basis * basis[pivot, torch.arange(k)].sign()
    return (centered @ basis).float()


def subsample(n: int, max_points: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``min(n, max_points)`` rows drawn without replacement (seeded)."""
    if n <= max_points:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_points].sort().values


def save_scatter(
    points: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | Path,
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
    size_px: int = 800,
) -> Path:
    """A 2-D scatter plot ``points [N, 2]`` coloured by ``labels [N]`` (-1: grey, unlabeled) as PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    pts = points.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(size_px / 100, size_px / 100), dpi=100)
    try:
        if labels is None:
            ax.scatter(pts[:, 0], pts[:, 1], s=6, c="tab:blue", linewidths=0)
        else:
            lab = labels.cpu().numpy()
            classes = sorted(set(int(v) for v in lab))
            cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
            for j, c in enumerate(classes):
                sel = lab == c
                name = "unlabeled" if c < 0 else (class_names[c] if class_names and c < len(class_names) else str(c))
                colour = "lightgrey" if c < 0 else cmap(j % cmap.N)
                ax.scatter(pts[sel, 0], pts[sel, 1], s=6, color=colour, label=name, linewidths=0)
            if len(classes) <= 20:
                ax.legend(markerscale=3, fontsize=8, loc="best", frameon=True)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


@torch.no_grad()
def patch_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last block's patch tokens after the final norm: ``[N, 3, H, W] -> [N, h, w, D]`` float32."""
    if not is_vit(backbone):
        raise ValueError(f"patch features need a timm ViT; got {type(backbone).__name__}")
    was_training = backbone.training
    backbone.eval()
    try:
        (tokens,) = backbone.get_intermediate_layers(images, n=1, norm=True)  # (N, L, D), prefix removed
    finally:
        backbone.train(was_training)
    h, w = backbone.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    return tokens.float().reshape(len(images), h, w, -1)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale each column of ``[M, 3]`` to [0, 1] (jointly over all images)."""
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def patch_pca_rgb(tokens: torch.Tensor, *, foreground: bool = False) -> torch.Tensor:
    """First three principal components of patch tokens as colours: ``[N, h, w, D] -> [N, 3, h, w]``.

    The PCA is fitted jointly over all images' patches. ``foreground=True``: patches whose first
    component is above its median are foreground (the sign is chosen so the minority side is
    foreground, as objects usually cover less than half of the image); the colours then come
    from a second PCA on the foreground only and the background is black (DINOv2, figure 1).
    """
    n, h, w, d = tokens.shape
    flat = tokens.reshape(-1, d)
    comps = pca(flat, 3)
    if comps.shape[1] < 3:
        comps = torch.cat([comps, comps.new_zeros(len(comps), 3 - comps.shape[1])], dim=1)
    if not foreground:
        return _to_unit(comps).reshape(n, h, w, 3).permute(0, 3, 1, 2)
    first = comps[:, 0]
    fg = first > 0 if (first > 0).float().mean() <= 0.5 else first <= 0
    rgb = torch.zeros(len(flat), 3)
    if fg.sum() >= 3:
        rgb[fg] = _to_unit(pca(flat[fg], 3))
    return rgb.reshape(n, h, w, 3).permute(0, 3, 1, 2)


def save_patch_pca(
    backbone: nn.Module,
    images: torch.Tensor,
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    foreground: bool = False,
    min_cell: int = 96,
) -> Path:
    """PNG with two rows: the images, and their patch-feature PCA as RGB under each one."""
    rgb = patch_pca_rgb(patch_tokens(backbone, images).cpu(), foreground=foreground)
    pixels = denormalize(images, mean, std)
    scale = cell_scale(max(images.shape[-2:]), min_cell)
    size = (images.shape[-2] * scale, images.shape[-1] * scale)
    top = list(enlarge(pixels, size, smooth=True))
    bottom = list(enlarge(rgb, size))
    return save_grid([top, bottom], path)


__all__ = ["pca", "subsample", "save_scatter", "patch_tokens", "patch_pca_rgb", "save_patch_pca"]
