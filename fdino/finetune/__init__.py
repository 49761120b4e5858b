"""fdino.finetune: use what was learned. Did self-supervision pay off on my data?

    from fdino.finetune import finetune, recipe_for, label_subset, train_supervised, fewshot
    model = load_model("runs/demo")                                   # any model source
    idx = label_subset(labels, fraction=0.01, seed=0)                 # class-balanced, deterministic
    result = finetune(model.backbone, Subset(train, idx), test, recipe_for(model.backbone, freeze="blocks:2"),
                      image_size=model.image_size, mean=model.mean, std=model.std)
    result.top1, result.curve
    save_classifier("runs/ft", result.backbone, result.head, model.info, classes=..., report={})
    load_classifier("runs/ft").predict(images)                         # and load_model("runs/ft") for the rest
    baseline, info = train_supervised(model.cfg, Subset(train, idx), test)   # same backbone, from scratch
    fewshot(model, train, test, FewshotConfig(fractions=(0.01, 0.1, 1.0)))   # every method, every fraction

Modules: `subsets` (label subsets), `layers` (layer-wise lr decay, freezing), `recipe` (configs and
the ViT / CNN / linear recipes), `views` (training augmentations), `train` (the loop), `supervised`
(the from-scratch baseline), `fewshot` (the few-label table), `files` (model folders), `cli`.
"""

from .fewshot import METHODS, FewshotConfig, dataset_labels, fewshot, matched_supervised_steps, save_fewshot
from .files import Classifier, load_classifier, save_classifier
from .layers import frozen_names, layer_id, num_layers, param_groups, parse_freeze, set_requires_grad
from .recipe import RECIPES, FinetuneConfig, cnn_recipe, linear_protocol, recipe_for, vit_recipe
from .subsets import label_subset, subset_sizes
from .supervised import supervised_info, supervised_recipe, train_supervised
from .train import FinetuneResult, evaluate, finetune, lr_at, with_drop_path

__all__ = [
    "Classifier",
    "FewshotConfig",
    "FinetuneConfig",
    "FinetuneResult",
    "METHODS",
    "RECIPES",
    "cnn_recipe",
    "dataset_labels",
    "evaluate",
    "fewshot",
    "matched_supervised_steps",
    "finetune",
    "frozen_names",
    "label_subset",
    "layer_id",
    "linear_protocol",
    "load_classifier",
    "lr_at",
    "num_layers",
    "param_groups",
    "parse_freeze",
    "recipe_for",
    "save_classifier",
    "save_fewshot",
    "set_requires_grad",
    "subset_sizes",
    "supervised_info",
    "supervised_recipe",
    "train_supervised",
    "vit_recipe",
    "with_drop_path",
]
