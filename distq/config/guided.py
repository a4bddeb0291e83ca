"""The ``guided`` section: a full-precision guide trained together with low-precision students."""

from __future__ import annotations

from dataclasses import dataclass, field

from distq.config.checks import check_positive
from distq.quant.functional import check_bits
from distq.quant.methods import ACT, WEIGHT, method_class


@dataclass(kw_only=True)
class StudentConfig:
    """One low-precision student of a guided run."""

    w_bits: int | None = None
    """The student's weight bit-width (1..8, or 32); null takes quant.w_bits."""
    a_bits: int | None = None
    """The student's activation bit-width (1..8, or 32); null takes quant.a_bits."""
    method: str | None = None
    """The student's quantizer method (quant.method's choices; its settings are quant.<method>'s);
    null takes quant.method. Students of one team may differ."""
    name: str | None = None
    """Its name in logs, checkpoints and results; null: student_w{w_bits}a{a_bits}, with the method
    when it is given (student_lsq_w4a4)."""

    def __post_init__(self):
        if self.w_bits is not None:
            check_bits(self.w_bits, "guided.students[].w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "guided.students[].a_bits")
        if self.method is not None:
            method = method_class(self.method)
            for key, role in (("w_bits", WEIGHT), ("a_bits", ACT)):
                bits = getattr(self, key)
                refusal = None if bits is None else method.bits_refusal(role, bits)
                if refusal:
                    raise ValueError(f"guided.students[].{key}={bits}: {refusal}")
        if self.name is None and self.w_bits is not None and self.a_bits is not None:
            tag = f"{self.method}_" if self.method is not None else ""
            self.name = f"student_{tag}w{self.w_bits}a{self.a_bits}"

    def take_default_bits(self, w_bits: int, a_bits: int) -> None:
        """Fill the bits left out with quant's (the students' default), then the name."""
        self.w_bits = w_bits if self.w_bits is None else self.w_bits
        self.a_bits = a_bits if self.a_bits is None else self.a_bits
        self.__post_init__()


@dataclass(kw_only=True)
class HintConfig:
    """Hint loss: each student's features at one layer are pulled towards the guide's (quantized to
    the student's activation bits)."""

    layer: str
    """Module name whose output features are matched (e.g. layer3)."""
    weight: float = 1.0
    """Weight of the hint (mean squared error) term in each student's loss."""


@dataclass(kw_only=True)
class GuidedConfig:
    """Guided training: a full-precision guide and low-precision students, mutual KD."""

    students: list[StudentConfig] = field(default_factory=list)
    """The low-precision students, e.g. [{w_bits: 4, a_bits: 4}, {w_bits: 2, a_bits: 2}]; bits left out
    take quant.w_bits / quant.a_bits."""
    temperature: float = 1.0
    """Softmax temperature T of the distillation terms (each scaled by T^2)."""
    lambda_s: float = 1.0
    """Student cross-entropy weight."""
    lambda_sl: float = 0.5
    """Student KL(guide || student) weight."""
    lambda_g: float = 1.0
    """Guide cross-entropy weight."""
    lambda_gl: float = 0.5
    """Guide KL(student || guide) weight, averaged over students."""
    guide_lr: float | None = None
    """Guide learning rate; null uses train.lr."""
    student_lr: float | None = None
    """Students' learning rate; null uses train.lr."""
    guide_pretrained: str | None = None
    """Full-precision weights for the guide: a state_dict file or a distq run directory."""
    students_from_guide: bool = True
    """Initialise every student with the guide's weights."""
    hint: HintConfig | None = None

    def __post_init__(self):
        if not self.students:
            raise ValueError("guided.students is empty: a guided config needs at least one student, e.g. [{w_bits: 4, a_bits: 4}]")
        check_positive("guided.temperature", self.temperature)
        self.check_names()

    def check_names(self) -> None:
        names = [s.name for s in self.students]
        if None not in names and len(set(names)) != len(names):
            raise ValueError(f"guided.students has duplicate names {names}: give each a distinct name")
