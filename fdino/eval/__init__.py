"""fdino.eval: what a user does after training (Caron et al. 2021, section 4 and figures).

Measure the representation the way the paper does (weighted k-NN, linear probe), look at what
the network attends to (CLS attention maps and masks, patch-feature PCA), map the feature space
(PCA / t-SNE), and embed and search image folders. The math is in pure functions; files are
read and written only by the ``save_*`` functions and the CLI (`fdino.eval.cli`).

Models come from `fdino.weights.load_model` (a run, a checkpoint, an export, official or timm weights)::

    from fdino.eval import extract_features, knn_classify, raw_pixel_knn, save_attention_grid
    from fdino.weights import load_model
    model = load_model("runs/demo")                             # the teacher, frozen
    bank, bank_y = extract_features(model.backbone, memory_dataset, transform=...)
    query, query_y = extract_features(model.backbone, query_dataset, transform=...)
    knn_classify(bank, bank_y, query, query_y, ks=(20,))      # {20: {"top1": %, "top5": %}}
    raw_pixel_knn(memory_dataset, query_dataset, ks=(20,))      # the same on centered raw pixels
    save_attention_grid(model.backbone, images, "attn.png", mean=model.mean, std=model.std)
    representation_stats(query)   # {"mean_cosine", "normalized_std", "effective_rank"}: collapse signs
"""

from .attention import PAPER_MASS, attention_masks, cls_attention, save_attention_grid
from .embed import Embeddings, embed_folder, embed_paths, load_embeddings, save_embeddings, save_search_grid, search
from .features import batch_features, extract_features, raw_pixel_features, raw_pixel_knn
from .knn import PAPER_KS, PAPER_TEMPERATURE, center_features, knn_classify, knn_topk, knn_vote, topk_accuracy
from .linear import LinearProbe, linear_eval_images, linear_probe, probe_accuracy, train_linear_probe
from .stats import representation_stats
from .tsne import tsne
from .viz import patch_pca_rgb, patch_tokens, pca, save_patch_pca, save_scatter

__all__ = [
    # features and k-NN
    "extract_features",
    "representation_stats",
    "batch_features",
    "raw_pixel_features",
    "raw_pixel_knn",
    "knn_classify",
    "knn_topk",
    "knn_vote",
    "topk_accuracy",
    "center_features",
    "PAPER_KS",
    "PAPER_TEMPERATURE",
    # linear probe
    "LinearProbe",
    "train_linear_probe",
    "linear_probe",
    "probe_accuracy",
    "linear_eval_images",
    # attention and pictures
    "cls_attention",
    "attention_masks",
    "save_attention_grid",
    "PAPER_MASS",
    "pca",
    "tsne",
    "save_scatter",
    "patch_tokens",
    "patch_pca_rgb",
    "save_patch_pca",
    # embeddings and search
    "Embeddings",
    "embed_paths",
    "embed_folder",
    "save_embeddings",
    "load_embeddings",
    "search",
    "save_search_grid",
]
