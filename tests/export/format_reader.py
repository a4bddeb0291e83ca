"""A reader of distq's packed export format, written from docs/format.md alone: numpy, json,
struct and math, no distq and no torch.

    model = PackedModel(open("model.safetensors", "rb").read())
    logits = model(images)      # images: (N, 3, S, S) float32, preprocessed as model.header["preprocess"] says

It runs the ResNets (docs/format.md, section 10); the section numbers below are the document's.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

VERSION = 2
"""The newest format version this reader implements (section 1)."""
DTYPES = {"U8": "u1", "F32": "<f4", "F64": "<f8"}
F32 = np.float32


# --- sections 2-5: the file ---------------------------------------------------------------------


def read(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(distq header, {name: array}) of a file's bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8 : 8 + n])
    start = 8 + n
    tensors = {}
    for name, info in table.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if start + end > len(data):
            raise ValueError(f"tensor {name} lies past the end of the file")
        tensors[name] = np.frombuffer(data[start + begin : start + end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    header = json.loads(table["__metadata__"]["distq"])
    if header.get("format") != "distq.export":
        raise ValueError("not a distq export")
    if not isinstance(header.get("version"), int) or not 1 <= header["version"] <= VERSION:
        raise ValueError(f"format version {header.get('version')!r}: this reader reads 1..{VERSION}")
    return header, tensors


def unpack(planes: np.ndarray, bits: int, shape) -> np.ndarray:
    """Section 5: uint8 planes (bits, ceil(n / 8)) -> int64 codes of ``shape``."""
    n = math.prod(shape)
    if planes.shape != (bits, -(-n // 8)):
        raise ValueError(f"packed weights of shape {planes.shape}, expected {(bits, -(-n // 8))}")
    bit = np.unpackbits(planes, axis=1, bitorder="little")[:, :n].astype(np.int64)  # (plane j, code)
    return (bit << np.arange(bits, dtype=np.int64)[:, None]).sum(axis=0).reshape(shape)


def weight_integers(method: str, bits: int, q: np.ndarray) -> np.ndarray:
    """Section 7: codes -> integers."""
    levels = (1 << bits) - 1
    if method in ("dorefa", "pact"):
        return 2 * q - levels if bits > 1 else 2 * q - 1
    if method == "lsq":
        return np.where(q >= 1 << (bits - 1), q - (1 << bits), q)
    if method == "aqe":
        if bits == 1:
            return 2 * q - 1
        p = max((1 << (bits - 1)) - 2, 0)
        sign, m = q >> (bits - 1), q & ((1 << (bits - 1)) - 1)
        return np.where(m > 0, (1 - 2 * sign) * (np.int64(1) << np.maximum(p + 1 - m, 0)), 0)
    raise ValueError(f"unknown weight quantizer {method!r}")


# --- section 8: activations -----------------------------------------------------------------------


class Coded:
    """A quantized activation: float32 ``values`` == ``ints`` * ``scale``."""

    def __init__(self, values: np.ndarray, ints: np.ndarray, scale: float):
        self.values, self.ints, self.scale = values, ints, scale


def values_of(x):
    return x.values if isinstance(x, Coded) else x


def activation(record: dict, x):
    x = values_of(x)
    bits, method = record["bits"], record["method"]
    if bits == 32:
        return np.maximum(x, F32(0))
    levels = (1 << bits) - 1
    if method == "dorefa":
        a = np.round(np.clip(x, F32(0), F32(1)) * F32(levels))
        return Coded(a / F32(levels), a, 1.0 / levels)
    if method == "lsq":
        s = F32(record["scale"])
        a = np.clip(np.round(x * (F32(1) / s)), F32(0), F32(levels))
        return Coded(a * s, a, float(s))
    if method == "pact":
        alpha = F32(record["alpha"])
        a = np.round(np.minimum(np.maximum(x, F32(0)), alpha) * (F32(levels) / alpha))
        step = alpha / F32(levels)
        return Coded(a * step, a, float(step))
    if method == "aqe":
        p = max((1 << (bits - 1)) - 2, 0)
        if bits == 1:
            a = np.where(x >= 0, F32(1), F32(-1))
        elif bits == 2:
            threshold = F32(0.5) * np.abs(x).mean(axis=tuple(range(1, x.ndim)), keepdims=True, dtype=F32)
            a = np.sign(x) * (np.abs(x) > threshold)
        else:
            mag, out, below = np.minimum(np.abs(x), F32(1)), np.zeros_like(x), 0.0
            for level in [2.0**-i for i in range(p, -1, -1)]:  # the smallest level first
                out = np.where(mag >= F32((below + level) / 2), F32(level), out)
                below = level
            a = np.sign(x) * out * F32(2.0**p)
        return Coded(a * F32(2.0**-p), a, 2.0**-p)
    raise ValueError(f"unknown activation quantizer {method!r}")


# --- section 9: layers ----------------------------------------------------------------------------


def conv2d(x: np.ndarray, weight: np.ndarray, stride, padding) -> np.ndarray:
    """Zero-padded convolution, NCHW, weight (out, in, kh, kw), in the inputs' dtype."""
    n, c, _, _ = x.shape
    out, _, kh, kw = weight.shape
    (sy, sx), (py, px) = stride, padding
    padded = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sy, ::sx]
    oh, ow = windows.shape[2:4]
    rows = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    return (rows @ weight.reshape(out, -1).T).reshape(n, oh, ow, out).transpose(0, 3, 1, 2)


def channels(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast over dimension 1."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


class WeightLayer:
    def __init__(self, record: dict, tensors: dict[str, np.ndarray]):
        names = record["tensors"]
        self.conv = record["op"] == "conv"
        if self.conv:
            self.stride, self.padding = tuple(record["stride"]), tuple(record["padding"])
        self.bits = record["weight_bits"]
        self.out_scale, self.out_shift = tensors[names["out_scale"]], tensors[names["out_shift"]]
        if self.bits == 32:
            self.weight = tensors[names["weight"]]
            return
        shape = tuple(record["shape"])
        self.ints = weight_integers(record["method"], self.bits, unpack(tensors[names["weight_codes"]], self.bits, shape))
        self.weight_scale = tensors[names["weight_scale"]]

    def op(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return conv2d(x, weight, self.stride, self.padding) if self.conv else x @ weight.T

    def __call__(self, x):
        if self.bits != 32 and isinstance(x, Coded):  # the integer path: exact sums, float64 epilogue
            acc = self.op(x.ints.astype(np.float64), self.ints.astype(np.float64))
            scale = x.scale * (self.weight_scale * self.out_scale)
            return (acc * channels(scale, acc.ndim) + channels(self.out_shift, acc.ndim)).astype(F32)
        if self.bits == 32:
            weight = self.weight
        else:  # a quantized layer reading plain values: the dequantized weight in float32
            scale = self.weight_scale.reshape((-1,) + (1,) * (self.ints.ndim - 1))
            weight = (self.ints * scale).astype(F32)
        y = self.op(values_of(x), weight)
        return y * channels(self.out_scale.astype(F32), y.ndim) + channels(self.out_shift.astype(F32), y.ndim)


def max_pool(x, kernel=3, stride=2, padding=1):
    """Max-pool where the padding never wins; a Coded input stays Coded (the max of the integers)."""

    def pool(t):
        low = -np.inf if t.dtype.kind == "f" else np.iinfo(t.dtype).min
        padded = np.pad(t, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=low)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(2, 3))[:, :, ::stride, ::stride]
        return windows.max(axis=(4, 5))

    return Coded(pool(x.values), pool(x.ints), x.scale) if isinstance(x, Coded) else pool(x)


# --- section 10: the graph ------------------------------------------------------------------------


class PackedModel:
    def __init__(self, data: bytes):
        self.header, tensors = read(data)
        model = self.header["model"]
        if not model["arch"].startswith("resnet"):
            raise NotImplementedError(f"this reader runs the ResNets, not {model['arch']}")
        self.small_input = model["small_input"]
        self.modules = {}
        for name, record in self.header["layers"].items():
            if record["op"] in ("conv", "linear"):
                self.modules[name] = WeightLayer(record, tensors)
            elif record["op"] == "act":
                self.modules[name] = lambda x, record=record: activation(record, x)
            elif record["op"] == "batchnorm":
                if record["folded_into"] is None:
                    scale, shift = (tensors[record["tensors"][k]] for k in ("scale", "shift"))
                    self.modules[name] = lambda x, a=scale, b=shift: values_of(x) * channels(a, 4) + channels(b, 4)
                else:
                    self.modules[name] = lambda x: x
            else:
                raise ValueError(f"unknown record op {record['op']!r}")
        self.blocks = []  # block prefixes in forward order: layer1.0, layer1.1, ..., layer4.1
        for name in self.header["layers"]:
            prefix = ".".join(name.split(".")[:2])
            if name.startswith("layer") and prefix not in self.blocks:
                self.blocks.append(prefix)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        m = self.modules
        x = m["relu"](m["bn1"](m["conv1"](images.astype(F32))))
        if not self.small_input:
            x = max_pool(x)
        for b in self.blocks:
            identity = m[f"{b}.downsample.1"](m[f"{b}.downsample.0"](x)) if f"{b}.downsample.0" in m else values_of(x)
            out = m[f"{b}.relu"](m[f"{b}.bn1"](m[f"{b}.conv1"](x)))
            if f"{b}.conv3" in m:  # bottleneck
                out = m[f"{b}.relu"](m[f"{b}.bn2"](m[f"{b}.conv2"](out)))
                out = m[f"{b}.bn3"](m[f"{b}.conv3"](out))
            else:
                out = m[f"{b}.bn2"](m[f"{b}.conv2"](out))
            x = m[f"{b}.act_out"](values_of(out) + values_of(identity))
        pooled = values_of(x).astype(np.float64).mean(axis=(2, 3)).astype(F32)  # average pool, flatten
        return values_of(m["fc"](pooled))
