"""Training objectives: plain cross-entropy, and guided mutual distillation (docs/methods.md, "Guided training").

An objective maps every model's logits to that model's own loss. Other models' logits
enter only detached, so each model's parameters receive gradients from its own terms
only, and the total loss can be back-propagated in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distq.quant.functional import act_quant


def distill_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    t = temperature
    return (t * t) * F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    )


class CrossEntropy:
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, logits: dict[str, torch.Tensor], labels: torch.Tensor, features=None) -> dict[str, torch.Tensor]:
        return {name: F.cross_entropy(z, labels, label_smoothing=self.label_smoothing) for name, z in logits.items()}


class MutualDistillation:
    """student j: lambda_s CE(z_j, y) + lambda_sl T^2 KL(p_g || p_j)      (z_g detached)
    guide:     lambda_g CE(z_g, y) + lambda_gl mean_j T^2 KL(p_j || p_g)  (z_j detached)
    plus, optionally, hint_weight * MSE(student feature, Q_a(guide feature)) per student."""

    def __init__(self, cfg, guide: str, student_a_bits: dict[str, int], label_smoothing: float = 0.0):
        self.cfg = cfg
        self.guide = guide
        self.student_a_bits = student_a_bits
        self.label_smoothing = label_smoothing

    def __call__(self, logits: dict[str, torch.Tensor], labels: torch.Tensor, features=None) -> dict[str, torch.Tensor]:
        c = self.cfg
        z_g = logits[self.guide]
        students = [name for name in logits if name != self.guide]
        ce = {name: F.cross_entropy(z, labels, label_smoothing=self.label_smoothing) for name, z in logits.items()}
        losses = {}
        for name in students:
            losses[name] = c.lambda_s * ce[name] + c.lambda_sl * distill_kl(z_g.detach(), logits[name], c.temperature)
            if c.hint is not None and features:
                target = act_quant(features[self.guide].detach(), self.student_a_bits[name])
                losses[name] = losses[name] + c.hint.weight * F.mse_loss(features[name], target)
        mutual = torch.stack([distill_kl(logits[name].detach(), z_g, c.temperature) for name in students]).mean()
        losses[self.guide] = c.lambda_g * ce[self.guide] + c.lambda_gl * mutual
        return losses
