"""A distq model -> an ONNX graph, node by node from the model's own data flow.

The model is traced with ``torch.fx`` (quantized layers as leaves), so the wiring (residual
adds, pooling, flatten) is the architecture's forward itself, and each traced call becomes
standard ONNX: Conv, Gemm, BatchNormalization, Relu, MaxPool, AveragePool /
GlobalAveragePool, Add, Flatten. Dropout and Identity vanish (inference). How quantized
weights and activations are written is the writer's business (``distq.export.onnx_qcdq``:
QuantizeLinear / Clip / DequantizeLinear; ``distq.export.qonnx``: QONNX ``Quant`` /
``BipolarQuant``); this module hands it integers and scales (``distq.export.onnx_quant``).

A batch-norm whose input is a conv that feeds nothing else is folded into that conv (its
scale into the weight's scale, its shift into the bias) unless ``fold_bn`` is off, or its
negative factors cannot go into the weight's integers (``onnx_quant.fold_batchnorm``); the
full-precision first conv and last linear keep float32 weights. The batch dimension is
dynamic unless ``batch`` fixes it (``distq export --batch N``: tools such as qonnx's
``cleanup_model`` need every shape static); the image size is the one the model was trained at.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.utils import _pair

from distq.export.format import ExportError
from distq.export.onnx_format import INPUT, OUTPUT
from distq.export.onnx_quant import (
    ActQuant,
    WeightQuant,
    activation_quant,
    batchnorm_affine,
    float_tensor,
    fold_batchnorm,
    quantized_weight,
    weight_bits,
)
from distq.models.dataflow import single_reader
from distq.quant.functional import FULL_PRECISION
from distq.quant.layers import QAct, QuantState

_PASS_THROUGH = (nn.Dropout, nn.Identity)


class QuantWriter(Protocol):
    """Writes quantized weights and activations in one ONNX dialect."""

    domains: dict[str, int]
    """Extra operator domains the writer's nodes use, with their versions."""

    def weight(self, graph: Graph, name: str, quant: WeightQuant) -> str: ...

    def activation(self, graph: Graph, name: str, x: str, quant: ActQuant) -> str: ...


@dataclass
class Graph:
    """The nodes and initializers of the graph being built, with unique tensor names."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    names: set[str] = field(default_factory=set)

    def unique(self, hint: str) -> str:
        name, n = hint, 1
        while name in self.names:
            n += 1
            name = f"{hint}_{n}"
        self.names.add(name)
        return name

    def constant(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(hint)
        # np.array, not np.ascontiguousarray, which turns a scalar into a 1-element vector.
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def add(self, op: str, inputs: list[str], hint: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self.unique(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain or None, **attrs))
        return out


def build_graph(
    model: nn.Module, image_size: int, num_classes: int, writer: QuantWriter, fold_bn: bool = True, batch: int | None = None
):
    """The ONNX ``GraphProto`` of ``model`` (eval mode), input ``images`` (N, 3, S, S) float32,
    output ``logits`` (N, classes); N is ``batch``, or dynamic (the symbol "batch") when None."""
    from onnx import TensorProto, helper

    model = model.eval()
    traced = _trace(model, image_size)
    walk = _Walk(dict(model.named_modules()), writer, Graph(names={INPUT}), fold_bn)
    with torch.no_grad():
        result = walk.run(traced)
    _rename_output(walk.graph, result, OUTPUT)
    n = "batch" if batch is None else int(batch)
    return helper.make_graph(
        walk.graph.nodes,
        "distq",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [n, 3, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [n, num_classes])],
        walk.graph.initializers,
    )


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, QuantState) or super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module, image_size: int) -> fx.GraphModule:
    """The model's forward as an fx graph, every node annotated with its output shape."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        traced = fx.GraphModule(model, _Tracer().trace(model))
        with torch.no_grad():
            ShapeProp(traced).propagate(torch.zeros(1, 3, image_size, image_size))
    except Exception as exc:  # fx raises many types for a forward it cannot follow
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: torch.fx cannot trace its forward ({reason})") from None
    return traced


def _rename_output(graph: Graph, tensor: str, name: str) -> None:
    for node in graph.nodes:
        if tensor in node.output:
            node.output[list(node.output).index(tensor)] = name
            return
    raise ExportError(f"cannot export: the model's output {tensor!r} is not computed by any layer")


class _Walk:
    """One pass over the traced nodes, emitting ONNX nodes."""

    def __init__(self, modules: dict[str, nn.Module], writer: QuantWriter, graph: Graph, fold_bn: bool):
        self.modules, self.writer, self.graph, self.fold_bn = modules, writer, graph, fold_bn
        self.values: dict[fx.Node, str] = {}
        self.folded: set[fx.Node] = set()

    def run(self, traced: fx.GraphModule) -> str:
        self.sites = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                self.values[node] = INPUT
            elif node.op == "output":
                return self.values[node.args[0]]
            elif node.op == "call_module":
                self.values[node] = self.module(node, self.modules[node.target])
            elif node.op == "call_function":
                self.values[node] = self.function(node)
            else:
                raise ExportError(f"cannot export {node.op} {node.target!r} of the model to ONNX: no equivalent")
        raise ExportError("cannot export: the traced model has no output")

    # --- modules ------------------------------------------------------------------------

    def module(self, node: fx.Node, module: nn.Module) -> str:
        name, x = node.target, self.values[node.args[0]]
        if isinstance(module, nn.Conv2d):
            return self.conv(node, name, module, x)
        if isinstance(module, nn.Linear):
            return self.weighted(name, module, None, lambda inputs: self.graph.add("Gemm", [x, *inputs], name, transB=1))
        if isinstance(module, nn.BatchNorm2d):
            return x if node in self.folded else self.batchnorm(name, module, x)
        if isinstance(module, QAct):
            quant = activation_quant(name, module)
            return self.graph.add("Relu", [x], name) if quant is None else self.writer.activation(self.graph, name, x, quant)
        if isinstance(module, nn.ReLU):
            return self.graph.add("Relu", [x], name)
        if isinstance(module, nn.MaxPool2d):
            return self.max_pool(name, module, x)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return self.adaptive_avg_pool(node, name, module, x)
        if isinstance(module, nn.AvgPool2d):
            return self.avg_pool(name, _pair(module.kernel_size), _pair(module.stride or module.kernel_size), module, x)
        if isinstance(module, nn.Flatten) and module.end_dim == -1:
            return self.graph.add("Flatten", [x], name, axis=module.start_dim)
        if isinstance(module, _PASS_THROUGH):
            return x
        raise ExportError(f"cannot export layer {name!r} of type {type(module).__name__} to ONNX: it has no equivalent here")

    def conv(self, node: fx.Node, name: str, conv: nn.Conv2d, x: str) -> str:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ExportError(f"cannot export conv {name!r} with padding={conv.padding!r}, padding_mode={conv.padding_mode!r}: use numeric zero padding")
        ph, pw = conv.padding
        attrs = dict(kernel_shape=list(conv.kernel_size), strides=list(conv.stride), pads=[ph, pw, ph, pw], dilations=list(conv.dilation))
        bn = self.foldable_batchnorm(node)
        return self.weighted(name, conv, bn, lambda inputs: self.graph.add("Conv", [x, *inputs], name, group=conv.groups, **attrs))

    def weighted(self, name: str, module: nn.Module, bn: nn.BatchNorm2d | None, op) -> str:
        """A conv or linear with ``bn`` folded in: ``op([weight, bias])`` for a float layer;
        for a quantized one ``op([weight])`` and the bias as an Add after it.

        Why: onnxruntime fuses DequantizeLinear -> Conv/Gemm (with bias) -> QuantizeLinear into
        one integer kernel that rounds the float bias to the accumulator's unit (activation
        scale x weight scale). That moves pre-activations by up to half a unit, enough to flip
        quantization levels; a separate float Add keeps the runtime computing the trained model.
        """
        weight, bias = self.weight_and_bias(name, module, bn)
        if weight_bits(module) == FULL_PRECISION:
            return op([weight, self.graph.constant(f"{name}.bias", float_tensor(bias))])
        y = op([weight])
        shape = (-1,) + (1,) * (module.weight.dim() - 2) if isinstance(module, nn.Conv2d) else (-1,)
        return self.graph.add("Add", [y, self.graph.constant(f"{name}.bias", float_tensor(bias).reshape(shape))], f"{name}.add_bias")

    def foldable_batchnorm(self, conv_node: fx.Node) -> nn.BatchNorm2d | None:
        """The batch-norm that reads this conv's output and is its only reader, if folding is on
        (``distq.models.dataflow``: the pairing the packed exporter and the integer engine use)."""
        user = single_reader(conv_node, (nn.BatchNorm2d,), self.modules, self.sites) if self.fold_bn else None
        if user is None:
            return None
        self.folded.add(user)
        return self.modules[user.target]

    def weight_and_bias(self, name: str, module: nn.Module, bn: nn.BatchNorm2d | None) -> tuple[str, np.ndarray]:
        """The weight tensor (float, or the writer's quantized form) and the bias (float64),
        with ``bn`` folded into both."""
        channels = module.weight.shape[0]
        g, h = batchnorm_affine(bn) if bn is not None else (np.ones(channels), np.zeros(channels))
        bias = module.bias.detach().double().numpy() if module.bias is not None else np.zeros(channels)
        if weight_bits(module) == FULL_PRECISION:
            weight = module.weight.detach().double().numpy() * g.reshape((-1,) + (1,) * (module.weight.dim() - 1))
            return self.graph.constant(f"{name}.weight", float_tensor(weight)), bias * g + h
        quant = quantized_weight(name, module)
        if bn is not None:
            folded = fold_batchnorm(quant, g)
            if folded is None:  # a sign would leave the weight's range: the batch-norm stays a node
                self.folded = {n for n in self.folded if self.modules[n.target] is not bn}
                return self.writer.weight(self.graph, name, quant), bias
            quant = folded
        return self.writer.weight(self.graph, name, quant), bias * g + h

    def batchnorm(self, name: str, bn: nn.BatchNorm2d, x: str) -> str:
        if bn.running_mean is None:
            raise ExportError(f"cannot export batch-norm {name!r}: it keeps no running statistics (track_running_stats=False)")
        channels = bn.num_features
        params = [
            bn.weight if bn.weight is not None else torch.ones(channels),
            bn.bias if bn.bias is not None else torch.zeros(channels),
            bn.running_mean,
            bn.running_var,
        ]
        inputs = [self.graph.constant(f"{name}.{k}", float_tensor(t)) for k, t in zip(("scale", "shift", "mean", "var"), params)]
        return self.graph.add("BatchNormalization", [x, *inputs], name, epsilon=float(bn.eps))

    def max_pool(self, name: str, pool: nn.MaxPool2d, x: str) -> str:
        ph, pw = _pair(pool.padding)
        return self.graph.add(
            "MaxPool",
            [x],
            name,
            kernel_shape=list(_pair(pool.kernel_size)),
            strides=list(_pair(pool.stride or pool.kernel_size)),
            pads=[ph, pw, ph, pw],
            dilations=list(_pair(pool.dilation)),
            ceil_mode=int(pool.ceil_mode),
        )

    def avg_pool(self, name: str, kernel, stride, pool: nn.Module | None, x: str) -> str:
        ph, pw = _pair(getattr(pool, "padding", 0))
        if getattr(pool, "divisor_override", None) is not None:
            raise ExportError(f"cannot export average pool {name!r} with divisor_override: ONNX's AveragePool has none")
        return self.graph.add(
            "AveragePool",
            [x],
            name,
            kernel_shape=list(kernel),
            strides=list(stride),
            pads=[ph, pw, ph, pw],
            ceil_mode=int(getattr(pool, "ceil_mode", False)),
            count_include_pad=int(getattr(pool, "count_include_pad", True)),
        )

    def adaptive_avg_pool(self, node: fx.Node, name: str, pool: nn.AdaptiveAvgPool2d, x: str) -> str:
        """GlobalAveragePool for a 1x1 output; an AveragePool where the adaptive windows are
        all one size at a fixed stride (in % out == 0, or windows of in - out + 1 at stride 1)."""
        in_size = tuple(node.args[0].meta["tensor_meta"].shape[-2:])
        out_size = tuple(i if o is None else o for i, o in zip(in_size, _pair(pool.output_size)))
        if out_size == (1, 1):
            return self.graph.add("GlobalAveragePool", [x], name)
        windows = [_uniform_windows(i, o) for i, o in zip(in_size, out_size)]
        if None in windows:
            raise ExportError(
                f"cannot export adaptive pool {name!r} from {in_size} to {out_size}: its windows differ in size, "
                "which ONNX's AveragePool cannot express; train at an image size whose features divide evenly"
            )
        return self.avg_pool(name, [w[0] for w in windows], [w[1] for w in windows], None, x)

    # --- functions ----------------------------------------------------------------------

    def function(self, node: fx.Node) -> str:
        args = [self.values[a] if isinstance(a, fx.Node) else a for a in node.args]
        if node.target in (operator.add, torch.add, operator.iadd) and len(args) == 2 and not node.kwargs:
            return self.graph.add("Add", args, "add")
        if node.target is torch.flatten:
            start, end = (list(args[1:]) + [node.kwargs.get("start_dim", 0), node.kwargs.get("end_dim", -1)][len(args) - 1 :])[:2]
            if end == -1:
                return self.graph.add("Flatten", [args[0]], "flatten", axis=start)
        if node.target in (torch.relu, torch.nn.functional.relu):
            return self.graph.add("Relu", [args[0]], "relu")
        raise ExportError(f"cannot export the call {getattr(node.target, '__name__', node.target)!r} in the model's forward to ONNX")


def _uniform_windows(size: int, out: int) -> tuple[int, int] | None:
    """(kernel, stride) of adaptive average pooling ``size`` -> ``out`` when every window has
    one size and they start at a fixed stride; None otherwise."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    kernels = {e - s for s, e in zip(starts, ends)}
    strides = {b - a for a, b in zip(starts, starts[1:])} or {1}
    if len(kernels) == 1 and len(strides) == 1:
        return kernels.pop(), strides.pop()
    return None
