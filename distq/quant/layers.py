"""Quantized layers: ``QConv2d``, ``QLinear`` and the quantized activation ``QAct``.

Each holds its precision as runtime state (plain Python attributes, so reading them
never syncs with the GPU) that the precision controller may change between steps
without rebuilding the model or the optimizer:

- ``bits``: 1..8, or 32 for full precision;
- ``quantizer``: the quantizer method (``distq.quant.methods``: DoReFa, AQE, LSQ, PACT), which
  computes the fake quantization and owns any learnable parameter it registered on the layer
  (LSQ's steps, PACT's clipping level); ``method`` is its registry key;
- ``alpha``: the AQE mixing factor (ignored by the other methods);
- ``quantize``: False runs this layer in full precision for now (stochastic precision)
  without forgetting its bit-width.

That state travels in ``state_dict()`` as each module's ``_extra_state`` entry (the method by
its key), so a checkpoint restores it; the parameter names and shapes are those of
``nn.Conv2d`` / ``nn.Linear`` plus the method's own parameters.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from distq.quant.functional import FULL_PRECISION, check_bits
from distq.quant.methods import ACT, WEIGHT, QuantMethod, build_method, method_keys

METHODS = method_keys()


def as_method(method: str | QuantMethod) -> QuantMethod:
    return method if isinstance(method, QuantMethod) else build_method(method)


class QuantState:
    """Mixin: the runtime precision state shared by every quantized layer.

    It must come before ``nn.Module`` in a layer's bases, or ``nn.Module``'s own
    ``get_extra_state``/``set_extra_state`` shadow these and the state never reaches
    ``state_dict()``.
    """

    bits: int
    quantizer: QuantMethod
    alpha: float
    quantize: bool
    role: str
    kernels: str = "auto"
    """quant.kernels: which implementation of the quantizer runs (not a precision: not saved)."""

    def _init_quant_state(self, bits: int = FULL_PRECISION, method: str | QuantMethod = "dorefa", alpha: float = 0.5) -> None:
        self.bits = check_bits(bits)
        self.quantizer = as_method(method)
        self.alpha = float(alpha)
        self.quantize = True
        if self.bits != FULL_PRECISION:  # a layer built at full precision is never quantized
            self.quantizer.check_bits(self.bits, f"{self.role} bits", self.role)
            self.quantizer.attach(self, self.role)

    @property
    def method(self) -> str:
        """The quantizer method's registry key."""
        return self.quantizer.key

    @property
    def effective_bits(self) -> int:
        return self.bits if self.quantize else FULL_PRECISION

    def set_bits(self, bits: int) -> None:
        self.bits = check_bits(bits)

    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "method": self.method, "alpha": self.alpha}

    def set_extra_state(self, state: dict) -> None:
        if state["method"] != self.method:
            raise ValueError(
                f"the saved layer uses quantizer method {state['method']!r}, this model {self.method!r}: "
                "build the model with the saved run's quant.method"
            )
        self.bits = check_bits(int(state["bits"]))
        self.alpha = float(state["alpha"])

    def _quant_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}"


class _QWeightMixin(QuantState):
    per_channel: bool
    role = WEIGHT
    _fixed_weight: torch.Tensor | None = None  # set only inside ``fixed_quantized_weights``

    @classmethod
    def from_float(cls, module: nn.Module, bits: int = FULL_PRECISION, method: str | QuantMethod = "dorefa", per_channel: bool = False):
        """Turn a float ``nn.Conv2d``/``nn.Linear`` into its quantized class, sharing (not
        copying) its parameters, so names, shapes and initialisation stay torchvision's."""
        q = cls.__new__(cls)
        q.__dict__.update(module.__dict__)
        q._parameters = dict(module._parameters)  # the method may add its own: not into the float module
        q.per_channel = per_channel
        q._init_quant_state(bits, method)
        return q

    def quantized_weight(self) -> torch.Tensor:
        if self._fixed_weight is not None and not torch.is_grad_enabled():
            return self._fixed_weight
        bits = self.effective_bits
        if bits == FULL_PRECISION:
            return self.weight
        return self.quantizer.weight(self, self.weight, bits)


class QConv2d(_QWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is quantized on the fly."""

    def __init__(self, *args, bits: int = FULL_PRECISION, method: str | QuantMethod = "dorefa", per_channel: bool = False, **kw):
        super().__init__(*args, **kw)
        self.per_channel = per_channel
        self._init_quant_state(bits, method)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


class QLinear(_QWeightMixin, nn.Linear):
    """``nn.Linear`` whose weight is quantized on the fly."""

    def __init__(self, *args, bits: int = FULL_PRECISION, method: str | QuantMethod = "dorefa", per_channel: bool = False, **kw):
        super().__init__(*args, **kw)
        self.per_channel = per_channel
        self._init_quant_state(bits, method)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


class QAct(QuantState, nn.Module):
    """The activation of a quantized network, in place of ``nn.ReLU``.

    At 32 bits it is a ReLU, so a full-precision model computes exactly what
    torchvision's does. At k bits the quantizer method replaces the ReLU: DoReFa clamps to
    [0, 1] and quantizes to k bits, LSQ and PACT clip at a learned level, AQE runs its
    estimator (ternary thresholds computed per sample).
    """

    role = ACT

    def __init__(self, bits: int = FULL_PRECISION, method: str | QuantMethod = "dorefa"):
        super().__init__()
        self._init_quant_state(bits, method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.effective_bits
        if bits == FULL_PRECISION:
            return F.relu(x)
        return self.quantizer.act(self, x, bits)

    def extra_repr(self) -> str:
        return self._quant_repr()


@contextlib.contextmanager
def fixed_quantized_weights(model: nn.Module):
    """Quantize every weight of ``model`` once for the whole block instead of at each forward.

    For evaluation, where nothing changes the weights or the precision state between
    batches (no optimizer step, no loading, no controller event: the block must not contain
    any). The stored weights are only used while gradients are disabled, so a forward that
    needs gradients still quantizes on the fly; on exit every layer does again.
    """
    layers = [m for m in model.modules() if isinstance(m, _QWeightMixin)]
    try:
        with torch.no_grad():
            for layer in layers:
                # detach(): at full precision quantized_weight() is the weight Parameter itself,
                # which nn.Module.__setattr__ would try to register as a new parameter.
                layer._fixed_weight = layer.quantized_weight().detach()
        yield model
    finally:
        for layer in layers:
            layer._fixed_weight = None


def quant_layers(model: nn.Module):
    """Yield ``(name, layer)`` for every quantized layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantState):
            yield name, module
