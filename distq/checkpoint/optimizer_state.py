"""Optimizer state that does not depend on the engine or the number of processes.

Each rank saves the part of the optimizer state it holds as *fragments*: for every
parameter (by its name in the team module), the flat range ``[start, start + n)`` of the
parameter it covers and the matching slice of every per-element state tensor (SGD's
``momentum_buffer``, AdamW's ``exp_avg``/``exp_avg_sq``), plus the per-parameter scalars
(AdamW's ``step``). One process holds whole parameters (start 0); DeepSpeed ZeRO ranks hold
contiguous slices of flattened parameter groups, possibly splitting a parameter between two
ranks. Loading merges the fragments of all ranks back into whole tensors, so any engine on
any number of processes takes the state it needs from them.
"""

from __future__ import annotations

import torch

from distq.checkpoint.manifest import CheckpointError

Fragments = dict[str, dict]
"""``{param name: {"numel": n, "start": s, "tensors": {key: flat slice}, "scalars": {key: 0-dim tensor}}}``"""


def fragment(numel: int, start: int, tensors: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor]) -> dict:
    return {
        "numel": numel,
        "start": start,
        "tensors": {k: v.detach().reshape(-1).to("cpu", copy=True) for k, v in tensors.items()},
        "scalars": {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else torch.tensor(v) for k, v in scalars.items()},
    }


def split_state(state: dict, param: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A torch optimizer's state of one parameter as (per-element tensors, scalars); None values dropped."""
    tensors, scalars = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.numel() == param.numel() and value.dim() > 0:
            tensors[key] = value
        elif torch.is_tensor(value) and value.dim() == 0 or isinstance(value, (int, float)):
            scalars[key] = value
    return tensors, scalars


def whole_parameter_fragments(optimizer: torch.optim.Optimizer, names: dict[torch.Tensor, str]) -> Fragments:
    """Fragments of an optimizer that holds whole parameters (plain PyTorch, DeepSpeed ZeRO-0)."""
    out: Fragments = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state:
                tensors, scalars = split_state(state, param)
                out[names[param]] = fragment(param.numel(), 0, tensors, scalars)
    return out


def merge(shards: list[Fragments], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """The whole (flat) state tensors and scalars of every parameter, from every rank's fragments.

    CheckpointError if a parameter's fragments do not cover it exactly once."""
    merged: dict[str, dict[str, torch.Tensor]] = {}
    covered: dict[str, list[tuple[int, int]]] = {}
    numels: dict[str, int] = {}
    for shard in shards:
        for name, frag in shard.items():
            numel, start = frag["numel"], frag["start"]
            entry = merged.setdefault(name, {})
            for key, values in frag["tensors"].items():
                if key not in entry:  # (not setdefault: it would allocate on every call)
                    entry[key] = torch.zeros(numel, dtype=values.dtype)
                entry[key][start : start + values.numel()] = values
            if frag["tensors"]:
                covered.setdefault(name, []).append((start, start + next(iter(frag["tensors"].values())).numel()))
                numels[name] = numel
            for key, value in frag["scalars"].items():
                entry.setdefault(key, value)
    for name, ranges in covered.items():
        ends = [0] + [end for _, end in sorted(ranges)]
        if [start for start, _ in sorted(ranges)] != ends[:-1] or ends[-1] != numels[name]:
            raise CheckpointError(f"{source}: the optimizer state of {name} is not covered exactly once by the ranks' shards")
    return merged


def load_whole_parameters(optimizer: torch.optim.Optimizer, names: dict[torch.Tensor, str], merged: dict[str, dict[str, torch.Tensor]]) -> None:
    """Install merged state into an optimizer that holds whole parameters. Per-element
    tensors take the parameter's shape, dtype and device; scalars (AdamW's step) stay on
    the CPU, where PyTorch keeps them."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = merged.get(names[param])
            if entry:
                optimizer.state[param] = {
                    key: value.to(param.device, param.dtype).view_as(param) if value.dim() else value.clone() for key, value in entry.items()
                }
