"""fdino.export: use a trained backbone outside training.

    loaded = load_model("runs/demo")                           # any source: see fdino.weights
    export_safetensors(loaded.backbone, "out/backbone.safetensors", loaded.info)
    export_onnx(loaded.backbone, "out/backbone.onnx", image_size=loaded.image_size)

Optional dependencies (``pip install fdino[export]``): onnx, onnxruntime, onnxscript; they are
imported inside the functions that need them, so this package imports without them. Reading
models (official DINO weights included) and the safetensors format live in `fdino.weights`.
"""

from .onnx_export import OnnxBackbone, OnnxCheck, check_shapes, compare_onnx, export_onnx, onnx_session, quantize_onnx
from .prune import PruneStats, prune_backbone, weight_sparsity
from .quantize import ModelComparison, compare_int8, compare_models, quantize_torch, time_forward

__all__ = [
    "ModelComparison",
    "OnnxBackbone",
    "OnnxCheck",
    "PruneStats",
    "check_shapes",
    "compare_int8",
    "compare_models",
    "compare_onnx",
    "export_onnx",
    "onnx_session",
    "prune_backbone",
    "quantize_onnx",
    "quantize_torch",
    "time_forward",
    "weight_sparsity",
]
