"""Fuse a conv with the DoReFa activation that follows it: the native conv then writes the
activation's integers and values directly, and its float output never exists.

Where that is safe is read from the network's dataflow, not assumed from its architecture:
torch.fx traces the engine's network once (engine layers as leaves), and a pair is fused
only when the conv's single use, through folded batch-norms (``nn.Identity``) that have a
single use each, is the activation, and both modules are called at exactly one place. In
a ResNet that is every block's conv1 -> bn1 -> relu (conv2 meets the residual add first);
a network fx cannot trace is simply left unfused.

The fused result is exactly the unfused one: the native epilogue rounds the affine to the
engine's dtype and quantizes that value with IntAct's expression (tests compare both).
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx
import torch.nn as nn

from distq.infer.layers import BitConv2d, BitLinear, ChannelAffine, CodedMaxPool2d, FloatLayer, IntAct

ENGINE_LEAVES = (BitConv2d, BitLinear, IntAct, FloatLayer, CodedMaxPool2d, ChannelAffine)


class _EngineTracer(fx.Tracer):
    """Treats the engine's layers as opaque calls: their forwards branch on their input's type."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ENGINE_LEAVES) or super().is_leaf_module(m, qualname)


def fusable_pairs(net: nn.Module) -> list[tuple[str, str]]:
    """(conv, activation) module names that can be fused, in graph order."""
    try:
        graph = _EngineTracer().trace(net)
    except Exception:  # any construct fx cannot follow: no fusion, never a wrong one
        return []
    modules = dict(net.named_modules())
    call_sites = Counter(node.target for node in graph.nodes if node.op == "call_module")

    def module_call(node, kind):
        return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules[node.target], kind)

    pairs = []
    for node in graph.nodes:
        if not module_call(node, IntAct) or modules[node.target].method != "dorefa" or call_sites[node.target] != 1:
            continue
        source = node.args[0]
        while module_call(source, nn.Identity) and len(source.users) == 1:
            source = source.args[0]
        if module_call(source, BitConv2d) and len(source.users) == 1 and call_sites[source.target] == 1:
            pairs.append((source.target, node.target))
    return pairs


def fuse_conv_activations(net: nn.Module) -> list[tuple[str, str]]:
    """Fuse every safe (native BitConv2d, DoReFa IntAct) pair of ``net`` in place; returns them."""
    modules = dict(net.named_modules())
    pairs = [(c, a) for c, a in fusable_pairs(net) if modules[c].native is not None]
    for conv, act in pairs:
        modules[conv].fused_act_bits = modules[act].bits
        modules[act].computed_by = conv
    return pairs
