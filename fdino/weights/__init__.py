"""fdino.weights: every way into a model, below eval, export and serve.

    loaded = load_model("runs/demo")                                   # an fdino run: the teacher
    loaded = load_model("dino_deitsmall16_pretrain.pth")              # official: vit_small_patch16_224
    loaded = load_model("weights.safetensors", arch="resnet50")        # any timm backbone
    loaded.backbone, loaded.image_size, loaded.mean, loaded.std, loaded.info, loaded.kind
    export_safetensors(loaded.backbone, "out/backbone.safetensors", loaded.info)   # load_model reads it back
    state = start_from_weights(init_state(cfg), "runs/demo")            # fdino train --init-weights runs/demo

One safe reader (`torch_load_safe`: weights only), one unwrapper (`unwrap_state_dict`), one
builder (`build_timm_backbone`), one loader (`load_model`); `fdino.weights.cli_args` gives every
command the same model flags and the same list of sources (`MODEL_SOURCES_HELP`).
"""

from .build import build_timm_backbone
from .export_file import ExportInfo, export_safetensors, read_export_info
from .files import strip_prefixes, torch_load_safe, unwrap_state_dict
from .load import MODEL_SOURCES_HELP, SOURCE_KINDS, LoadedModel, load_model
from .official import OFFICIAL_ARCHS, guess_timm_arch, timm_to_official
from .start import start_from_weights

__all__ = [
    "ExportInfo",
    "LoadedModel",
    "MODEL_SOURCES_HELP",
    "OFFICIAL_ARCHS",
    "SOURCE_KINDS",
    "build_timm_backbone",
    "export_safetensors",
    "guess_timm_arch",
    "load_model",
    "read_export_info",
    "start_from_weights",
    "strip_prefixes",
    "timm_to_official",
    "torch_load_safe",
    "unwrap_state_dict",
]
