"""Which batch-norm follows which conv, and which activation follows that: read once from a
network's dataflow (a torch.fx trace), and used by the packed exporter, the ONNX builder and the
integer engine's fusion alike.

A conv and a batch-norm pair up when the batch-norm is the conv's only reader and is called at
exactly one place; the activation joins when it is the batch-norm's only reader, called at one
place. That is what makes folding the batch-norm into the conv exact, whatever the modules are
named. The kinds of module that count as conv, norm and activation are the caller's: the trained
network's (``nn.Conv2d``, ``nn.BatchNorm2d``, ``QAct``) or the integer engine's (its bit convs,
``nn.Identity`` for a folded batch-norm, ``IntAct``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn


@dataclass(frozen=True)
class Chain:
    conv: str
    norm: str | None
    act: str | None


class LeafTracer(fx.Tracer):
    """An fx tracer that treats the given module types as opaque calls."""

    def __init__(self, leaves: tuple[type, ...] = ()):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaves) or super().is_leaf_module(module, qualified_name)


def single_reader(node: fx.Node, kinds: tuple[type, ...], modules: dict[str, nn.Module], sites: Counter) -> fx.Node | None:
    """The module call of one of ``kinds`` that is ``node``'s only reader and is called nowhere else."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op != "call_module" or not isinstance(modules[user.target], kinds) or sites[user.target] != 1:
        return None
    return user


def chains(graph: fx.Graph, modules: dict[str, nn.Module], conv: tuple[type, ...], norm: tuple[type, ...], act: tuple[type, ...]) -> list[Chain]:
    """Every (conv, its batch-norm, the activation that reads it) of ``graph``, in graph order (a conv
    without a batch-norm may still have its activation); a conv called at more than one place has no
    chain (folding into it would change its other calls)."""
    sites = Counter(node.target for node in graph.nodes if node.op == "call_module")
    found = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], conv) or sites[node.target] != 1:
            continue
        bn = single_reader(node, norm, modules, sites)
        activation = single_reader(bn if bn is not None else node, act, modules, sites) if act else None
        found.append(Chain(node.target, bn.target if bn is not None else None, activation.target if activation is not None else None))
    return found


def trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> fx.Graph:
    return LeafTracer(leaves).trace(model)


def conv_bn_pairs(model: nn.Module, leaves: tuple[type, ...] = ()) -> dict[str, str]:
    """{batch-norm name: conv name} of a trained network: every BatchNorm2d that is the only reader
    of a conv's output (quantized layers are leaves, as ``leaves`` are)."""
    from distq.quant.layers import QuantState

    graph = trace(model, (QuantState, *leaves))
    modules = dict(model.named_modules())
    return {c.norm: c.conv for c in chains(graph, modules, (nn.Conv2d,), (nn.BatchNorm2d,), ()) if c.norm is not None}
