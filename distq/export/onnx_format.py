"""The facts of distq's ONNX exports that writer, reader and command line share (no torch here,
so that building the CLI parser stays light)."""

OPSET = 13
"""ONNX opset of every export: per-axis QuantizeLinear/DequantizeLinear and int8 Clip exist
since 13, and 13 is what TensorRT's explicit quantization and every recent onnxruntime read."""
INPUT = "images"
OUTPUT = "logits"
FORMATS = ("safetensors", "onnx", "onnx-int", "qonnx")
ONNX_FORMATS = ("onnx", "onnx-int", "qonnx")
INT_FORMAT = "onnx-int"
"""Quantized convs and linears as integer matrix products (``distq.export.onnx_int``)."""
DEPLOY_HINT = "pip install 'distq[deploy]'"
