"""What every quantizer method is: its fake quantization, its learnable parameters, what a
bit-width change does to them, and its integer form for export (docs/methods.md, "Quantizers").

A method is one object per model (``quant.method`` picks it, ``quant.<method>`` configures it).
Quantized layers hold it and ask it for everything that differs between methods, so no code
outside ``distq.quant.methods`` needs to know which method a layer uses: the exporters, the
integer engine and the precision policies talk to the object. Adding a method is one module
here that subclasses ``QuantMethod`` and calls ``register``, its config dataclass, and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

WEIGHT, ACT = "weight", "act"
"""The two roles a method plays: a conv/linear's weight quantizer, or an activation (QAct)."""


class Unsupported(ValueError):
    """What a method cannot do (an export form, a bit-width), in words for the user; the
    caller adds which layer it is and what to do instead."""


@dataclass(frozen=True)
class WeightCodes:
    """A quantized weight as integers: ``value = integers * scale`` (scale per output channel,
    or one value for the tensor), and the k-bit codes a packed file stores for them."""

    codes: torch.Tensor
    """uint8 k-bit codes, the weight's shape: what a packed file stores (``integers(codes, bits)``
    gives the integers back)."""
    integers: torch.Tensor
    """int64, the weight's shape."""
    scale: torch.Tensor
    """float64, shape (1,) or (out_channels,)."""
    low: int
    high: int
    """The range the integers live in (the method's, not only the values present)."""
    offset_bits: int | None
    """k: the integers are 2q - (2^k - 1) of k-bit codes q (packed as q); None: two's complement."""


@dataclass(frozen=True)
class ActCodes:
    """A uniform activation quantizer: ``integer = clamp(round(x / scale), 0, high)``, value
    ``integer * scale``, as ONNX's QuantizeLinear computes it (zero point 0)."""

    bits: int
    scale: float
    high: int


@dataclass(frozen=True)
class IntActivation:
    """An activation as the integer engine carries it: ``values == ints * scale``; ``planes``
    says how the integers split into bit planes: ("unsigned", k), ("twos", k) or ("sign", 1)."""

    values: torch.Tensor
    ints: torch.Tensor
    planes: tuple[str, int]
    scale: float


class QuantMethod:
    """A quantizer method. Subclasses set ``key`` and ``config_class`` and override what differs.

    Training: ``attach`` gives a layer the method's learnable parameters (registered on the
    layer, so optimizers, ZeRO, checkpoints and resumes handle them like any weight);
    ``weight``/``act`` are the fake quantizers (forward and backward); ``calibrate`` sets the
    parameters' first values from the first training batch; ``weight_decay`` places them in an
    optimizer group; ``after_step`` edits the latent weights after an update (AQE's clip).

    Export: ``weight_codes``, ``act_codes`` and ``int_activation`` give the integer form; what a
    method cannot express raises ``Unsupported``. Every quantized weight is written as unsigned
    k-bit codes, each standing for an exact integer (its *integer form*, ``integers``) times a
    scale, so that the dot product of a quantized activation and a quantized weight is an
    integer dot product times one float. The codes come from the training quantizers' own
    outputs, never from a re-implementation, so an export holds exactly what the fake-quantized
    model computes with. The packed exporter (``distq.export.exporter``), the ONNX writers
    (``distq.export.onnx_quant``) and the integer engine (``distq.infer``) use only these hooks.
    """

    key: ClassVar[str]
    config_class: ClassVar[type | None] = None
    min_bits: ClassVar[dict[str, int]] = {WEIGHT: 1, ACT: 1}
    """The lowest bit-width the method defines, for weights and for activations."""
    edits_weights: ClassVar[bool] = False
    """Whether ``after_step`` changes latent weights (the engine then refreshes its copies)."""
    mixes_alpha: ClassVar[bool] = False
    """Whether the forward mixes alpha h(x) + (1 - alpha) x (``precision.aqe`` schedules alpha)."""
    learnable: ClassVar[tuple[str, ...]] = ()
    """Names of the parameters ``attach`` registers, for messages and pretrained loading."""
    export_version: ClassVar[int] = 1
    """The packed-file format version that introduced this method (older readers must refuse its files)."""
    calibrated: ClassVar[bool] = False
    """Whether the learnable parameters start from the first training batch (``calibrate``)."""

    def __init__(self, cfg=None):
        self.cfg = cfg if cfg is not None or self.config_class is None else self.config_class()

    def __repr__(self) -> str:
        return self.key

    @classmethod
    def bits_refusal(cls, role: str, bits: int) -> str | None:
        """Why ``bits`` is not a bit-width this method defines for ``role``, or None."""
        low = cls.min_bits[role]
        if bits >= low:
            return None
        return f"method {cls.key} defines {'weights' if role == WEIGHT else 'activations'} of {low}..8 bits (or 32)"

    def check_bits(self, bits: int, what: str, role: str) -> None:
        """Refuse a bit-width the method does not define, naming the key that asked for it."""
        refusal = self.bits_refusal(role, bits)
        if refusal:
            raise Unsupported(f"{what}={bits}: {refusal}")

    # --- training -------------------------------------------------------------------------------

    def attach(self, layer: nn.Module, role: str) -> None:
        """Register this method's learnable parameters on ``layer`` (none by default)."""

    def weight(self, layer: nn.Module, w: torch.Tensor, bits: int) -> torch.Tensor:
        raise NotImplementedError

    def act(self, layer: nn.Module, x: torch.Tensor, bits: int) -> torch.Tensor:
        raise NotImplementedError

    def calibrate(self, layer: nn.Module, role: str, inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Statistics for the first values of the learnable parameters: ``inputs`` is the
        activation a QAct received on the first training batch (None for a weight). The
        caller sums them over ranks (each value a sum, with ``count``) and hands them to
        ``initialise``."""
        return {}

    def initialise(self, layer: nn.Module, role: str, stats: dict[str, torch.Tensor]) -> None:
        """Set the learnable parameters from the rank-summed ``calibrate`` statistics."""

    def weight_decay(self, name: str, default: float) -> float | None:
        """The weight decay of this method's parameter ``name`` (the attribute name on the
        layer), or None when it is not one of the method's own."""
        return None

    def after_step(self, layer: nn.Module) -> None:
        """After each optimizer update (``edits_weights`` methods only)."""

    # --- export ---------------------------------------------------------------------------------

    def weight_codes(self, layer: nn.Module) -> WeightCodes:
        """The integers inference computes with (and the k-bit codes a packed file stores)."""
        raise NotImplementedError

    def integers(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """The integer form (int64) of a packed file's k-bit weight codes."""
        raise NotImplementedError

    def offset_bits(self, bits: int) -> int | None:
        """How the integer engine packs ``bits``-bit weights (``WeightCodes.offset_bits``): k when
        the integers are 2q - (2^k - 1) of k-bit codes q (offset binary: the engine packs q and
        adds the constant), None when it packs the integers as two's complement."""
        return None

    def export_warning(self, layer: nn.Module) -> str | None:
        """Why ``layer``'s export computes other than training did, or None. Said once per kind
        after the number of such layers ("warning: 35 <this>"), so phrased to follow a count."""
        return None

    def onnx_refusal(self, layer: nn.Module) -> str | None:
        """Why ``layer``'s weight has no exact ONNX form, or None."""
        return None

    def act_codes(self, layer: nn.Module) -> ActCodes:
        """The activation as ONNX's uniform quantizer, or ``Unsupported``."""
        raise NotImplementedError

    def act_record(self, layer: nn.Module) -> dict:
        """What the integer engine needs to rebuild this activation (header entries)."""
        return {}

    def int_activation(self, x: torch.Tensor, bits: int, record: dict) -> IntActivation:
        """The integer engine's activation of ``x`` from its header ``record``: the same values
        the fake quantizer computes, with the integers behind them."""
        raise NotImplementedError

    def int_values(self, ints: torch.Tensor, bits: int, record: dict, dtype: torch.dtype) -> torch.Tensor:
        """The values of activation integers, computed as ``int_activation`` computes them."""
        raise NotImplementedError

    def unit_levels(self, bits: int) -> int | None:
        """L when the activation is round(clamp(x, 0, 1) * L) / L, which the engine's native
        kernels fuse into the conv before it; None otherwise."""
        return None

    def max_engine_bits(self) -> int:
        """The widest bit-width the integer engine runs for this method."""
        return 8


_REGISTRY: dict[str, type[QuantMethod]] = {}


def register(cls: type[QuantMethod]) -> type[QuantMethod]:
    if cls.key in _REGISTRY:
        raise ValueError(f"quantizer method {cls.key!r} is registered twice")
    _REGISTRY[cls.key] = cls
    return cls


def method_keys() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def learnable_names() -> frozenset[str]:
    """The parameter names any method registers on a layer (LSQ's steps, PACT's clipping levels)."""
    return frozenset(name for cls in _REGISTRY.values() for name in cls.learnable)


def method_class(key: str) -> type[QuantMethod]:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ValueError(f"quant.method={key!r} is unknown: use one of {', '.join(_REGISTRY)}") from None


def build_method(key: str, cfg=None) -> QuantMethod:
    """The method ``key`` with its config section (None: its defaults)."""
    return method_class(key)(cfg)
