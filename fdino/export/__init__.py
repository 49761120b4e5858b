"""fdino.export: use a trained backbone outside training.

    loaded = load_source("runs/demo")                          # or official DINO weights, arch=...
    export_safetensors(loaded.model.backbone, "out/backbone.safetensors", loaded.info)
    export_onnx(loaded.model.backbone, "out/backbone.onnx", image_size=loaded.info.image_size)
    backbone, arch = load_official_backbone("dino_deitsmall16_pretrain.pth")   # -> timm vit_small_patch16_224

Optional dependencies (``pip install fdino[export]``): onnx, onnxruntime, onnxscript; they are
imported inside the functions that need them, so this package imports without them.
"""

from .official import (
    OFFICIAL_ARCHS,
    guess_timm_arch,
    is_official_checkpoint,
    load_official_backbone,
    load_official_for_eval,
    official_to_timm,
    timm_to_official,
    torch_load_official,
)
from .onnx_export import OnnxBackbone, OnnxCheck, check_shapes, compare_onnx, export_onnx, onnx_session, quantize_onnx
from .quantize import Int8Report, compare_int8, quantize_torch, time_forward
from .sources import LoadedModel, load_source
from .weights import ExportInfo, export_safetensors, load_exported, read_export_info

__all__ = [
    "ExportInfo", "Int8Report", "LoadedModel", "OFFICIAL_ARCHS", "OnnxBackbone", "OnnxCheck", "check_shapes",
    "compare_int8", "compare_onnx", "export_onnx", "export_safetensors", "guess_timm_arch", "is_official_checkpoint",
    "load_exported", "load_official_backbone", "load_official_for_eval", "load_source", "official_to_timm",
    "onnx_session", "quantize_onnx", "quantize_torch", "read_export_info", "time_forward", "timm_to_official",
    "torch_load_official",
]
