"""distq: distributed training of low-bitwidth (quantized) CNNs."""

__version__ = "0.1.0"
