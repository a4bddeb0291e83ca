"""Guided training (docs/methods.md, "Guided training"): the mutual-distillation losses equal a hand computation,
and every model's parameters receive gradients from its own loss terms only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distq.config import load_config
from distq.config.schema import GuidedConfig, HintConfig, StudentConfig
from distq.distill.losses import CrossEntropy, MutualDistillation
from distq.models.team import GUIDE, build_team
from distq.quant.layers import QAct, quant_layers
from distq.train.team import FeatureTap, build_objective

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
S4, S2 = "student_w4a4", "student_w2a2"


# --- hand computation ---------------------------------------------------------------------


def hand_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = z.double()
    log_p = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    return -log_p[torch.arange(len(y)), y].mean()


def hand_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(softmax(p/T) || softmax(q/T)), summed over classes, averaged over the batch."""
    p = torch.softmax(p_logits.double() / t, dim=1)
    q = torch.softmax(q_logits.double() / t, dim=1)
    return t * t * (p * (p.log() - q.log())).sum(dim=1).mean()


def hand_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    return torch.round(levels * x.double().clamp(0, 1)) / levels


def guided_cfg(**kw) -> GuidedConfig:
    students = [StudentConfig(w_bits=4, a_bits=4), StudentConfig(w_bits=2, a_bits=2)]
    return GuidedConfig(students=students, **kw)


def random_logits(seed: int = 0, batch: int = 6, classes: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = {name: (2 * torch.randn(batch, classes, generator=g)).requires_grad_() for name in (GUIDE, S4, S2)}
    labels = torch.randint(0, classes, (batch,), generator=g)
    return logits, labels


def test_defaults_are_the_methods_defaults():
    cfg = guided_cfg()
    assert (cfg.temperature, cfg.lambda_s, cfg.lambda_g, cfg.lambda_sl, cfg.lambda_gl) == (1.0, 1.0, 1.0, 0.5, 0.5)
    assert cfg.hint is None and cfg.students_from_guide
    assert [s.name for s in cfg.students] == [S4, S2]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_losses_match_the_formulas(temperature):
    cfg = guided_cfg(temperature=temperature, lambda_s=0.7, lambda_sl=0.3, lambda_g=1.1, lambda_gl=0.9)
    logits, y = random_logits()
    losses = MutualDistillation(cfg, GUIDE, {S4: 4, S2: 2})(logits, y)
    zg, z4, z2 = logits[GUIDE], logits[S4], logits[S2]
    t = temperature
    want = {
        S4: 0.7 * hand_ce(z4, y) + 0.3 * hand_kl(zg, z4, t),
        S2: 0.7 * hand_ce(z2, y) + 0.3 * hand_kl(zg, z2, t),
        GUIDE: 1.1 * hand_ce(zg, y) + 0.9 * (hand_kl(z4, zg, t) + hand_kl(z2, zg, t)) / 2,
    }
    assert set(losses) == set(want)
    for name in want:
        assert losses[name].item() == pytest.approx(want[name].item(), rel=1e-5, abs=1e-6), name
    # The KL terms are not trivially zero here, and KL is not symmetric: the direction matters.
    assert hand_kl(zg, z4, t).item() > 0.05
    assert abs(hand_kl(zg, z4, t).item() - hand_kl(z4, zg, t).item()) > 1e-3


def test_one_student_guide_term_is_not_averaged_away():
    cfg = GuidedConfig(students=[StudentConfig(w_bits=4, a_bits=4)])
    logits, y = random_logits(1)
    del logits[S2]
    losses = MutualDistillation(cfg, GUIDE, {S4: 4})(logits, y)
    assert losses[GUIDE].item() == pytest.approx((hand_ce(logits[GUIDE], y) + 0.5 * hand_kl(logits[S4], logits[GUIDE], 1.0)).item(), rel=1e-5)
    assert losses[S4].item() == pytest.approx((hand_ce(logits[S4], y) + 0.5 * hand_kl(logits[GUIDE], logits[S4], 1.0)).item(), rel=1e-5)


def test_label_smoothing_reaches_the_cross_entropy():
    logits, y = random_logits(2)
    plain = MutualDistillation(guided_cfg(lambda_sl=0.0, lambda_gl=0.0), GUIDE, {S4: 4, S2: 2})(logits, y)
    smooth = MutualDistillation(guided_cfg(lambda_sl=0.0, lambda_gl=0.0), GUIDE, {S4: 4, S2: 2}, label_smoothing=0.1)(logits, y)
    for name, z in logits.items():
        assert plain[name].item() == pytest.approx(hand_ce(z, y).item(), rel=1e-5)
        log_p = torch.log_softmax(z.double(), dim=1)
        want = 0.9 * hand_ce(z, y) - 0.1 * log_p.mean(dim=1).mean()
        assert smooth[name].item() == pytest.approx(want.item(), rel=1e-5)


def test_hint_loss_matches_l2_to_the_quantized_guide_feature():
    cfg = guided_cfg(hint=HintConfig(layer="layer3", weight=0.4))
    logits, y = random_logits(3)
    g = torch.Generator().manual_seed(4)
    features = {name: (1.6 * torch.randn(6, 5, 3, 3, generator=g) + 0.4).requires_grad_() for name in (GUIDE, S4, S2)}
    with_hint = MutualDistillation(cfg, GUIDE, {S4: 4, S2: 2})(logits, y, features)
    without = MutualDistillation(guided_cfg(), GUIDE, {S4: 4, S2: 2})(logits, y, features)
    for name, bits in ((S4, 4), (S2, 2)):
        target = hand_quant(features[GUIDE].detach(), bits)
        assert target.unique().numel() <= 2**bits and target.min() == 0 and target.max() == 1
        hint = ((features[name].double() - target) ** 2).mean()
        assert (with_hint[name] - without[name]).item() == pytest.approx(0.4 * hint.item(), rel=1e-5)
    assert with_hint[GUIDE].item() == without[GUIDE].item()  # the guide gets no hint term
    # Gradients: a student's hint reaches its own feature only, never the guide's.
    with_hint[S2].backward()
    assert features[GUIDE].grad is None and features[S4].grad is None
    assert features[S2].grad.abs().sum() > 0


def test_each_loss_reaches_its_own_logits_only():
    logits, y = random_logits(5)
    objective = MutualDistillation(guided_cfg(), GUIDE, {S4: 4, S2: 2})
    for name in logits:
        for z in logits.values():
            z.grad = None
        objective(logits, y)[name].backward()
        assert logits[name].grad.abs().sum() > 0
        assert all(logits[other].grad is None for other in logits if other != name), name


def test_cross_entropy_objective():
    logits, y = random_logits(6)
    losses = CrossEntropy()({"model": logits[S4]}, y)
    assert losses["model"].item() == pytest.approx(hand_ce(logits[S4], y).item(), rel=1e-6)


# --- real models: the team of a guided config --------------------------------------------------


def team_cfg(*overrides: str):
    return load_config(
        CONFIGS / "digits_resnet18_w4a4_guided.yaml",
        ["model.width=4", "guided.students=[{w_bits: 4, a_bits: 4}, {w_bits: 2, a_bits: 2}]", *overrides],
    )


def build(cfg):
    torch.manual_seed(0)
    team = build_team(cfg, 10)
    tap = FeatureTap(team, cfg.guided.hint.layer) if cfg.guided.hint else None
    return team, build_objective(cfg, team), tap


def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def compute_losses(team, objective, tap):
    images, labels = batch()
    logits = {m.name: m.model(images) for m in team}
    return objective(logits, labels, tap.features if tap else None)


def grads(model) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def zero(team) -> None:
    for m in team:
        m.model.zero_grad(set_to_none=True)


def test_team_is_a_guide_and_students_from_its_weights():
    team, _, _ = build(team_cfg())
    assert [m.name for m in team] == [GUIDE, S4, S2]
    assert {layer.bits for _, layer in quant_layers(team[0].model)} == {32}
    for member, bits in zip(team[1:], (4, 2)):
        assert {layer.bits for _, layer in quant_layers(member.model) if isinstance(layer, QAct)} == {bits}
        for (name, a), b in zip(team[0].model.named_parameters(), member.model.parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


@pytest.mark.parametrize("hint", [False, True])
def test_every_model_gets_gradients_from_its_own_loss_only(hint):
    cfg = team_cfg(*(["guided.hint={layer: layer3, weight: 0.5}"] if hint else []))
    team, objective, tap = build(cfg)
    own = {}
    for member in team:
        zero(team)
        compute_losses(team, objective, tap)[member.name].backward()
        for other in team:
            g = grads(other.model)
            if other is member:
                assert all(x is not None for x in g), member.name
                assert sum(x.abs().sum().item() for x in g) > 0
                own[member.name] = g
            else:
                assert all(x is None for x in g), (member.name, other.name)

    # What the trainer does: one backward of the sum. Each model's gradient is exactly that
    # of its own loss alone.
    zero(team)
    losses = compute_losses(team, objective, tap)
    torch.stack(list(losses.values())).sum().backward()
    for member in team:
        for a, b in zip(grads(member.model), own[member.name]):
            assert torch.equal(a, b), member.name


def test_hint_changes_the_students_gradient_but_not_the_guides():
    with_hint, plain = {}, {}
    for store, overrides in ((with_hint, ["guided.hint={layer: layer3, weight: 0.5}"]), (plain, [])):
        team, objective, tap = build(team_cfg(*overrides))
        losses = compute_losses(team, objective, tap)
        torch.stack(list(losses.values())).sum().backward()
        store.update({m.name: grads(m.model) for m in team})
        store["losses"] = {k: v.item() for k, v in losses.items()}
        if tap is not None:
            features = tap.features
            assert set(features) == {GUIDE, S4, S2} and features[GUIDE].shape == features[S2].shape
    for a, b in zip(with_hint[GUIDE], plain[GUIDE]):
        assert torch.equal(a, b)
    for name in (S4, S2):
        assert any(not torch.equal(a, b) for a, b in zip(with_hint[name], plain[name])), name
        assert with_hint["losses"][name] > plain["losses"][name]
    assert with_hint["losses"][GUIDE] == plain["losses"][GUIDE]
