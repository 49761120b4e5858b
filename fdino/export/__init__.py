"""fdino.export: use a trained backbone outside training.

    loaded = load_model("runs/demo")                           # any source: see fdino.weights
    export_safetensors(loaded.backbone, "out/backbone.safetensors", loaded.info)
    export_onnx(loaded.backbone, "out/backbone.onnx", image_size=loaded.image_size)

Optional dependencies (``pip install fdino[export]``): onnx, onnxruntime, onnxscript; they are
imported inside the functions that need them, so this package imports without them. Reading
models (official DINO weights included) and the safetensors format live in `fdino.weights`.
"""

from .onnx_export import OnnxBackbone, OnnxCheck, check_shapes, compare_onnx, export_onnx, onnx_session, quantize_onnx
from .quantize import Int8Report, compare_int8, quantize_torch, time_forward

__all__ = [
    "Int8Report",
    "OnnxBackbone",
    "OnnxCheck",
    "check_shapes",
    "compare_int8",
    "compare_onnx",
    "export_onnx",
    "onnx_session",
    "quantize_onnx",
    "quantize_torch",
    "time_forward",
]
