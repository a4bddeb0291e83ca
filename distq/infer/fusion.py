"""Fuse a conv with what follows it up to the next activation of the form
round(clamp(x, 0, 1) * L) / L (one whose method has ``unit_levels``, DoReFa's): the native
conv then writes the activation's integers and values directly, and its float output never
exists. Other activations (AQE, LSQ, PACT) run as their own ``IntAct``.

Two patterns; in a ResNet:

    conv1 -> bn1 (folded) -> relu                       the conv quantizes its output
    conv2 -> bn2 (folded) -> (+ identity) -> act_out    the conv adds the residual, then quantizes
    stem conv (float) -> bn1 -> relu [-> maxpool]       the float conv's affine quantizes (and pools)

Where that is safe is read from the network's dataflow, not assumed from its architecture:
torch.fx traces the engine's network once (engine layers as leaves), the conv -> batch-norm
pairing is ``distq.models.dataflow``'s (the one the exporters use; folded batch-norms are
``nn.Identity`` here), and a pair is fused only when every value between conv and activation
has a single use, both modules are called at exactly one place, and the residual is computed
before the conv. The second pattern rewrites the graph (the ``+`` moves into the
conv's call), so the engine then runs the traced ``GraphModule``, which holds the very same
layer objects, calls no container modules and no folded batch-norms (``nn.Identity``): at
batch 1 those calls cost more than the small layers' arithmetic. In a chain of three, the
activation between conv and pool is not called either (its output would be the pool's).
A network fx cannot trace is left as it is.

The fused result is exactly the unfused one: the native epilogue rounds the affine to the
engine's dtype, adds the residual in that dtype (IEEE addition commutes, so the operand
order of the ``+`` does not matter) and quantizes with IntAct's expression; tests compare
both, layer by layer.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

from distq.infer.layers import BitConv2d, BitLinear, ChannelAffine, CodedMaxPool2d, FloatLayer, IntAct
from distq.models import dataflow

ENGINE_LEAVES = (BitConv2d, BitLinear, IntAct, FloatLayer, CodedMaxPool2d, ChannelAffine)


class _EngineTracer(fx.Tracer):
    """Treats the engine's layers as opaque calls: their forwards branch on their input's type."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ENGINE_LEAVES) or super().is_leaf_module(m, qualname)


def fuse_conv_activations(net: nn.Module) -> tuple[nn.Module, list[tuple[str, ...]]]:
    """Fuse every safe (native conv, unit-level IntAct[, max-pool]) chain of ``net``; returns the
    network to run (a GraphModule of it, or ``net`` itself where fx cannot trace it) and the
    fused chains of module names, the last one being the module whose output the fused call gives."""
    try:
        graph = _EngineTracer().trace(net)
    except Exception:  # any construct fx cannot follow: no fusion, never a wrong one
        return net, []
    modules = dict(net.named_modules())
    call_sites = Counter(node.target for node in graph.nodes if node.op == "call_module")
    position = {node: i for i, node in enumerate(graph.nodes)}

    def called_once(node, kind) -> bool:
        return (
            isinstance(node, fx.Node)
            and node.op == "call_module"
            and isinstance(modules[node.target], kind)
            and call_sites[node.target] == 1
        )

    # Which folded batch-norm (an nn.Identity here) belongs to which conv: the exporter's and the
    # ONNX builder's pairing (distq.models.dataflow), on the engine's network.
    paired = dataflow.chains(graph, modules, (BitConv2d, FloatLayer), (nn.Identity,), ())
    conv_of = {c.norm: c.conv for c in paired if c.norm is not None}
    nodes = {node.target: node for node in graph.nodes if node.op == "call_module"}

    def native_conv_feeding(node, kinds=(BitConv2d, FloatLayer)):
        """The native conv whose output reaches ``node`` directly or through its folded batch-norm."""
        if isinstance(node, fx.Node) and node.op == "call_module" and node.target in conv_of:
            if len(node.users) != 1:
                return None
            node = nodes[conv_of[node.target]]
        elif not (called_once(node, kinds) and len(node.users) == 1):
            return None
        if not (called_once(node, kinds) and len(node.args) == 1 and not node.kwargs):
            return None
        module = modules[node.target]
        native = module.native is not None if isinstance(module, BitConv2d) else module.native and module.conv
        return node if native else None

    chains = []
    for act in list(graph.nodes):
        if not called_once(act, IntAct) or modules[act.target].unit_levels is None:
            continue
        source = act.args[0]
        conv = native_conv_feeding(source)
        if conv is None and _is_add(source) and len(source.users) == 1:
            for i in (0, 1):
                conv, residual = native_conv_feeding(source.args[i], BitConv2d), source.args[1 - i]
                if conv is not None and isinstance(residual, fx.Node) and position[residual] < position[conv]:
                    conv.args = (conv.args[0], residual)
                    modules[conv.target].takes_residual = True
                    source.replace_all_uses_with(source.args[i])
                    graph.erase_node(source)
                    break
                conv = None
        if conv is None:
            continue
        chain, pool = (conv.target, act.target), None
        after = next(iter(act.users)) if len(act.users) == 1 else None
        if isinstance(modules[conv.target], FloatLayer) and called_once(after, CodedMaxPool2d) and modules[after.target].native:
            pool = modules[after.target].native_geometry()
            if pool is not None:  # the float stem: the full-size activation need not exist either
                modules[after.target].computed_by = conv.target
                chain += (after.target,)
                # Not called at all: it would return the pooled activation under its own name.
                act.replace_all_uses_with(act.args[0])
                graph.erase_node(act)
        if pool is not None:
            modules[conv.target].fuse_activation(modules[act.target], pool)
        else:
            modules[conv.target].fuse_activation(modules[act.target])
        modules[act.target].computed_by = conv.target
        chains.append(chain)
    for node in list(graph.nodes):  # folded batch-norms: no call at all
        if called_once(node, nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(net, graph, class_name=type(net).__name__), chains


def _is_add(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in (operator.add, torch.add)
        and len(node.args) == 2
        and not node.kwargs
    )
