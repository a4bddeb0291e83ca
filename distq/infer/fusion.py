"""Fuse a conv with what follows it up to the next DoReFa activation: the native conv then
writes the activation's integers and values directly, and its float output never exists.

Two patterns, in a ResNet's blocks:

    conv1 -> bn1 (folded) -> relu                       the conv quantizes its output
    conv2 -> bn2 (folded) -> (+ identity) -> act_out    the conv adds the residual, then quantizes

Where that is safe is read from the network's dataflow, not assumed from its architecture:
torch.fx traces the engine's network once (engine layers as leaves), and a pair is fused
only when every value between conv and activation has a single use, the folded batch-norms
are ``nn.Identity``, both modules are called at exactly one place, and the residual is
computed before the conv. The second pattern rewrites the graph (the ``+`` moves into the
conv's call), so the engine then runs the traced ``GraphModule``, which holds the very same
layer objects. A network fx cannot trace is left as it is.

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

ENGINE_LEAVES = (BitConv2d, BitLinear, IntAct, FloatLayer, CodedMaxPool2d, ChannelAffine)


class _EngineTracer(fx.Tracer):
    """Treats the engine's layers as opaque calls: their forwards branch on their input's type."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ENGINE_LEAVES) or super().is_leaf_module(m, qualname)


def fuse_conv_activations(net: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fuse every safe (native BitConv2d, DoReFa IntAct) pair of ``net``; returns the network
    to run (``net``, or a GraphModule of it where a residual moved) and the fused pairs."""
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

    def native_conv_feeding(node):
        """The native conv whose output reaches ``node`` through single-use folded batch-norms."""
        while called_once(node, nn.Identity) and len(node.users) == 1:
            node = node.args[0]
        ok = called_once(node, BitConv2d) and len(node.users) == 1 and len(node.args) == 1 and not node.kwargs
        return node if ok and modules[node.target].native is not None else None

    pairs, moved_residual = [], False
    for act in list(graph.nodes):
        if not called_once(act, IntAct) or modules[act.target].method != "dorefa":
            continue
        source = act.args[0]
        conv = native_conv_feeding(source)
        if conv is None and _is_add(source) and len(source.users) == 1:
            for i in (0, 1):
                conv, residual = native_conv_feeding(source.args[i]), source.args[1 - i]
                if conv is not None and isinstance(residual, fx.Node) and position[residual] < position[conv]:
                    conv.args = (conv.args[0], residual)
                    modules[conv.target].takes_residual = True
                    source.replace_all_uses_with(source.args[i])
                    graph.erase_node(source)
                    moved_residual = True
                    break
                conv = None
        if conv is not None:
            modules[conv.target].fused_act_bits = modules[act.target].bits
            modules[act.target].computed_by = conv.target
            pairs.append((conv.target, act.target))
    if not moved_residual:
        return net, pairs
    graph.lint()
    return fx.GraphModule(net, graph, class_name=type(net).__name__), pairs


def _is_add(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in (operator.add, torch.add)
        and len(node.args) == 2
        and not node.kwargs
    )
