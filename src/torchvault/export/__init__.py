"""Deployment artifacts that prove they compute what the model computes: ONNX files checked
with onnxruntime, torch.export programs that run without the model's class, and quantized
models with their accuracy cost measured. The optional libraries (onnx, onnxruntime,
onnxscript, torchao) are imported only when these functions run.
"""

from __future__ import annotations

from ._onnx import export_onnx
from ._program import export_program, load_program, program_path
from ._quantize import quantize
from ._quantized_file import load_quantized, save_quantized

__all__ = [
    "export_onnx",
    "export_program",
    "load_program",
    "load_quantized",
    "program_path",
    "quantize",
    "save_quantized",
]
