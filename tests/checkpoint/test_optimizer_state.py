"""Engine-independent optimizer state: fragments of any split merge back into whole tensors."""

from __future__ import annotations

import pytest
import torch

from distq.checkpoint import CheckpointError
from distq.checkpoint.optimizer_state import fragment, load_whole_parameters, merge, whole_parameter_fragments


def split_like_zero(values: dict[str, torch.Tensor], world: int) -> list[dict]:
    """Flatten the parameters into one buffer, cut it into ``world`` equal partitions (the last
    padded), and give each rank the overlap of each parameter with its partition."""
    total = sum(v.numel() for v in values.values())
    size = -(-total // world)
    shards = [{} for _ in range(world)]
    offset = 0
    for name, value in values.items():
        flat = value.reshape(-1)
        for rank in range(world):
            lo, hi = max(offset, rank * size), min(offset + flat.numel(), (rank + 1) * size)
            if lo < hi:
                shards[rank][name] = fragment(flat.numel(), lo - offset, {"momentum_buffer": flat[lo - offset : hi - offset]}, {"step": torch.tensor(3.0)})
        offset += flat.numel()
    return shards


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_any_split_merges_back_exactly(world):
    generator = torch.Generator().manual_seed(0)
    values = {"a.weight": torch.randn(5, 3, generator=generator), "a.bias": torch.randn(5, generator=generator), "b.weight": torch.randn(11, generator=generator)}
    merged = merge(split_like_zero(values, world), "test")
    assert merged.keys() == values.keys()
    for name, value in values.items():
        assert torch.equal(merged[name]["momentum_buffer"], value.reshape(-1))
        assert merged[name]["step"].item() == 3.0


def test_a_gap_or_an_overlap_is_an_error():
    shard = {"w": fragment(10, 0, {"exp_avg": torch.ones(6)}, {})}
    with pytest.raises(CheckpointError, match="the optimizer state of w is not covered exactly once"):
        merge([shard], "ckpt")
    with pytest.raises(CheckpointError, match="not covered exactly once"):
        merge([shard, {"w": fragment(10, 4, {"exp_avg": torch.ones(6)}, {})}], "ckpt")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_torch_optimizer_round_trips(optimizer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if optimizer == "sgd" else (lambda p: torch.optim.AdamW(p, lr=0.01))
    first = make(model.parameters())
    for _ in range(3):
        model(torch.randn(8, 4)).square().mean().backward()
        first.step()
    names = {p: n for n, p in model.named_parameters()}
    second = make(model.parameters())
    load_whole_parameters(second, names, merge([whole_parameter_fragments(first, names)], "test"))
    for param in model.parameters():
        a, b = first.state[param], second.state[param]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
            assert torch.as_tensor(a[key]).device == torch.as_tensor(b[key]).device
