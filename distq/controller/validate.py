"""Reject inconsistent precision schedules before training, naming the key."""

from __future__ import annotations

from distq.config.loader import ConfigError
from distq.controller.timeline import duration_epochs
from distq.quant.functional import FULL_PRECISION, VALID_BITS

# Pairs of policies that cannot run together, and why.
INCOMPATIBLE = {
    ("progressive", "cyclic"): "both set the bit-width trajectory",
    ("two_stage", "cyclic"): "cyclic training already alternates full and low precision",
    ("stochastic", "cyclic"): "cyclic training's full-precision phases leave nothing to sample",
}

# The trained network must be exactly the low-precision one, so f must reach 0 while training.
AUX_END_WHY = "the branch is removed only once f reaches 0, so end it earlier, e.g. 0.5dur"


def target_bits(cfg) -> tuple[int, int]:
    """The lowest final (w_bits, a_bits) any trained low-precision model must reach."""
    if cfg.guided is not None:
        return min(s.w_bits for s in cfg.guided.students), min(s.a_bits for s in cfg.guided.students)
    return cfg.quant.w_bits, cfg.quant.a_bits


def _fits(cfg, key: str, value) -> float | None:
    epochs = duration_epochs(value, key, cfg.train.epochs)
    if epochs is not None and epochs > cfg.train.epochs:
        raise ConfigError(f"{key}={value!r} is longer than the run (train.epochs={cfg.train.epochs}): shorten it or train longer")
    return epochs


def _check_sequence(key: str, sequence: list[int], target: int, target_key: str) -> None:
    for bits in sequence:
        if bits not in VALID_BITS:
            raise ConfigError(f"{key} has {bits}, not a valid bit-width: use 1..8, or 32")
    if any(b > a for a, b in zip(sequence, sequence[1:])):
        raise ConfigError(f"{key}={sequence} increases: a progressive sequence must go down, e.g. [32, 8, 4, 2]")
    if sequence and sequence[-1] > target:
        raise ConfigError(f"{key} ends at {sequence[-1]} bits but {target_key}={target}: end the sequence at the target bit-width")


def validate_precision(cfg) -> None:
    p = cfg.precision
    active = [name for name in ("progressive", "two_stage", "stochastic", "aqe", "aux_branch", "cyclic") if getattr(p, name) is not None]
    for (a, b), why in INCOMPATIBLE.items():
        if a in active and b in active:
            raise ConfigError(f"precision.{a} cannot be combined with precision.{b} ({why}): remove one of them")
    w_target, a_target = target_bits(cfg)
    target_key = "guided.students" if cfg.guided is not None else "quant"

    if p.progressive is not None:
        pq = p.progressive
        if not pq.w_bits and not pq.a_bits:
            raise ConfigError("precision.progressive has neither w_bits nor a_bits: give a sequence, e.g. w_bits: [32, 8, 4]")
        _check_sequence("precision.progressive.w_bits", pq.w_bits, w_target, f"{target_key}.w_bits")
        _check_sequence("precision.progressive.a_bits", pq.a_bits, a_target, f"{target_key}.a_bits")
        for key, seq in (("w_bits", pq.w_bits), ("a_bits", pq.a_bits)):
            if seq and len(seq) != len(pq.stages) + 1:
                raise ConfigError(
                    f"precision.progressive.{key} has {len(seq)} entries but precision.progressive.stages has {len(pq.stages)}: "
                    f"give one stage length per entry except the last"
                )
        total = 0.0
        for i, stage in enumerate(pq.stages):
            total += _fits(cfg, f"precision.progressive.stages[{i}]", stage) or 0.0
        if total >= cfg.train.epochs:
            raise ConfigError(
                f"precision.progressive.stages add up to {total:g} epochs, not less than train.epochs={cfg.train.epochs}: "
                f"the last stage would never run"
            )

    if p.two_stage is not None:
        if a_target == FULL_PRECISION:
            raise ConfigError("precision.two_stage needs quantized activations, but the activation target is 32 bits: set a_bits < 32")
        length = _fits(cfg, "precision.two_stage.weights_only", p.two_stage.weights_only)
        if length is not None and length >= cfg.train.epochs:
            raise ConfigError(f"precision.two_stage.weights_only={p.two_stage.weights_only!r} leaves no time for the second stage")

    if p.stochastic is not None:
        if not 0.0 <= p.stochastic.p0 <= 1.0:
            raise ConfigError(f"precision.stochastic.p0={p.stochastic.p0} must be in [0, 1]")
        _fits(cfg, "precision.stochastic.ramp", p.stochastic.ramp)

    if p.aqe is not None:
        if cfg.quant.method != "aqe":
            raise ConfigError(f"precision.aqe schedules AQE's alpha but quant.method={cfg.quant.method!r}: set quant.method=aqe")
        if not 0.0 <= p.aqe.alpha0 <= 1.0:
            raise ConfigError(f"precision.aqe.alpha0={p.aqe.alpha0} must be in [0, 1]")
        _fits(cfg, "precision.aqe.end", p.aqe.end)

    if p.aux_branch is not None:
        aux = p.aux_branch
        start = _fits(cfg, "precision.aux_branch.start", aux.start)
        end = _fits(cfg, "precision.aux_branch.end", aux.end)
        if end is not None and end >= cfg.train.epochs:
            raise ConfigError(f"precision.aux_branch.end={aux.end!r} must come before the end of the run (train.epochs={cfg.train.epochs}): {AUX_END_WHY}")
        if start is not None and end is not None and end <= start:
            raise ConfigError(f"precision.aux_branch.end={aux.end!r} must come after precision.aux_branch.start={aux.start!r}")
        _fits(cfg, "precision.aux_branch.halve_every", aux.halve_every)

    if p.cyclic is not None:
        cy = p.cyclic
        if cy.cycles < 1:
            raise ConfigError(f"precision.cyclic.cycles={cy.cycles}: cyclic training needs at least 1 cycle")
        if cy.start_bits not in VALID_BITS or cy.start_bits == FULL_PRECISION or cy.start_bits < w_target:
            raise ConfigError(f"precision.cyclic.start_bits={cy.start_bits} must be in {w_target}..8 (from 8 bits down to the target {w_target})")
        fp = _fits(cfg, "precision.cyclic.fp_length", cy.fp_length)
        lp = _fits(cfg, "precision.cyclic.lp_length", cy.lp_length)
        if fp is not None and lp is not None:
            total = (cy.start_bits - w_target + 1) * cy.cycles * (fp + lp)
            if total > cfg.train.epochs:
                raise ConfigError(
                    f"precision.cyclic needs {total:g} epochs ({cy.start_bits - w_target + 1} bit depths x {cy.cycles} cycles x "
                    f"(fp_length + lp_length)) but train.epochs={cfg.train.epochs}: fewer cycles, shorter phases or more epochs"
                )
