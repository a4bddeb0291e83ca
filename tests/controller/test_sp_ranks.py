"""Stochastic precision: the quantized subset is a function of (seed, step) only, so two real
data-parallel processes sample the same units without talking to each other; units are
residual blocks by default and single layers as an option."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distq.config import load_config
from distq.controller import Clock, Event, PrecisionController
from distq.controller.policies import quant_units
from distq.models.build import build_model
from distq.models.team import Member, build_team
from distq.quant.layers import QAct, quant_layers

SPE, EPOCHS = 10, 10
STEPS = list(range(0, SPE * EPOCHS, 3))


def sp_config(*overrides: str):
    return load_config(
        None,
        ["seed=7", "model.width=4", "model.small_input=true", "quant.w_bits=2", "quant.a_bits=2",
         f"train.epochs={EPOCHS}", "precision.stochastic={p0: 0.3, ramp: 0.8dur}", *overrides],
    )


def sp_controller(cfg, model_seed: int = 0) -> PrecisionController:
    torch.manual_seed(model_seed)
    model = build_model(cfg.model, cfg.quant, 10)
    return PrecisionController(cfg, Clock(SPE, SPE * EPOCHS), [Member("model", 2, 2, 0.1, model)])


def quantize_flags(ctl: PrecisionController, steps: list[int]) -> torch.Tensor:
    """``[step, layer]`` table of every quantized layer's ``quantize`` flag after BATCH_START."""
    rows = []
    for step in steps:
        ctl.on_event(Event.BATCH_START, step)
        rows.append([layer.quantize for _, layer in quant_layers(ctl.students[0].model)])
    return torch.tensor(rows, dtype=torch.uint8)


# --- units --------------------------------------------------------------------------------------


def test_units_are_residual_blocks_by_default():
    cfg = sp_config()
    model = build_model(cfg.model, cfg.quant, 10)
    names = {id(layer): name for name, layer in quant_layers(model)}
    units = [[names[id(layer)] for layer in unit] for unit in quant_units(model, cfg.precision.stochastic.unit)]
    assert cfg.precision.stochastic.unit == "block"
    # The stem activation (outside any block) and the 8 BasicBlocks of a ResNet-18.
    assert len(units) == 9
    assert units[0] == ["relu"]
    assert units[1] == ["layer1.0.conv1", "layer1.0.relu", "layer1.0.conv2", "layer1.0.act_out"]
    assert units[3] == ["layer2.0.conv1", "layer2.0.relu", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.0.act_out"]
    assert units[8] == ["layer4.1.conv1", "layer4.1.relu", "layer4.1.conv2"]  # its act_out stays full precision
    assert sorted(n for unit in units for n in unit) == sorted(names.values())  # every layer in exactly one unit


def test_units_are_layers_as_an_option():
    cfg = sp_config("precision.stochastic.unit=layer")
    model = build_model(cfg.model, cfg.quant, 10)
    units = quant_units(model, "layer")
    assert len(units) == len(list(quant_layers(model))) == 35
    assert all(len(unit) == 1 for unit in units)


def test_bottleneck_blocks_are_units_too():
    cfg = sp_config("model.arch=resnet50")
    assert len(quant_units(build_model(cfg.model, cfg.quant, 10), "block")) == 1 + 16


def _block_of(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("layer") else name


@pytest.mark.parametrize("unit", ["block", "layer"])
def test_controller_switches_whole_units(unit):
    ctl = sp_controller(sp_config(f"precision.stochastic.unit={unit}"))
    names = [name for name, _ in quant_layers(ctl.students[0].model)]
    flags = quantize_flags(ctl, STEPS[:20])
    blocks = sorted({_block_of(n) for n in names})
    mixed_blocks = 0
    for block in blocks:
        columns = flags[:, [i for i, n in enumerate(names) if _block_of(n) == block]]
        mixed = (columns != columns[:, :1]).any(dim=1)
        if unit == "block":
            assert not mixed.any(), block  # a block is quantized or not as a whole
        mixed_blocks += int(mixed.any())
    if unit == "layer":
        assert mixed_blocks >= len(blocks) - 2  # layers of one block are drawn independently
    # Bits are never touched by the sampling: a layer left in full precision keeps its 2 bits.
    assert {layer.bits for _, layer in quant_layers(ctl.students[0].model)} == {2}


def test_quantized_fraction_follows_p_and_everything_is_quantized_after_the_ramp():
    ctl = sp_controller(sp_config("precision.stochastic.unit=layer"))
    early = quantize_flags(ctl, list(range(0, 10))).float().mean().item()  # p = 0.3 .. 0.33
    late = quantize_flags(ctl, list(range(60, 70))).float().mean().item()  # p = 0.825 .. 0.85
    assert 0.15 < early < 0.5 and 0.7 < late < 0.97
    assert quantize_flags(ctl, [80, 81, 99]).all()  # ramp 0.8dur = 80 steps: p = 1
    assert ctl.scalars()["precision/sp_p"] == 1.0


def test_masks_change_between_steps_and_epoch_end_quantizes_all():
    ctl = sp_controller(sp_config())
    flags = quantize_flags(ctl, STEPS[:10])
    assert len({tuple(row.tolist()) for row in flags}) >= 5
    assert not flags.all() and flags.any()
    ctl.on_event(Event.EPOCH_END, STEPS[9])  # validation sees the fully quantized network
    assert all(layer.quantize for _, layer in quant_layers(ctl.students[0].model))


def test_every_student_follows_the_same_draw():
    cfg = load_config(
        None,
        ["model.width=4", "model.small_input=true", "train.epochs=10", "precision.stochastic={p0: 0.5}",
         "guided.students=[{w_bits: 4, a_bits: 4}, {w_bits: 2, a_bits: 2}]"],
    )
    ctl = PrecisionController(cfg, Clock(SPE, SPE * 10), build_team(cfg, 10))
    students = ctl.students
    for step in range(5):
        ctl.on_event(Event.BATCH_START, step)
        a, b = ([layer.quantize for _, layer in quant_layers(s.model)] for s in students)
        assert a == b
    assert {layer.bits for _, layer in quant_layers(students[0].model) if isinstance(layer, QAct)} == {4}


# --- two processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_flags(rank: int, world: int, port: int, out: str) -> None:
    """One data-parallel rank: its own model copy and controller, a different global RNG
    state from the other rank; all-gathers its quantize flags to rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctl = sp_controller(sp_config(), model_seed=100 + rank)
        torch.manual_seed(1000 + rank)
        torch.rand(17 * (rank + 1))  # the ranks' global RNGs diverge; the draw must not care
        flags = quantize_flags(ctl, STEPS)
        gathered = [torch.empty_like(flags) for _ in range(world)]
        dist.all_gather(gathered, flags)
        if rank == 0:
            torch.save(gathered, Path(out) / "flags.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_sample_the_same_subset(tmp_path):
    mp.spawn(_rank_flags, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "flags.pt")
    assert rank0.shape == (len(STEPS), 35)
    assert torch.equal(rank0, rank1)
    # Both equal what this process draws, and the draw is not trivial.
    assert torch.equal(rank0, quantize_flags(sp_controller(sp_config()), STEPS))
    during_ramp = rank0[: STEPS.index(78) + 1]
    assert not during_ramp.all() and during_ramp.any()
    assert rank0[STEPS.index(81):].all()
