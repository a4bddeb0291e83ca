"""``train.compile``: every model through ``torch.compile``, in place.

``nn.Module.compile`` keeps the module, its parameters and their names, so the optimizer,
DeepSpeed and checkpoints see the same model. The quantizers are custom operators
(``distq.quant.ops``) that the compiler keeps whole, with their own gradients. The
controller's bit-widths are plain module attributes the compiled code is guarded on: a change
recompiles once (a handful of times per run: progressive, two-stage and cyclic schedules),
which the cache limit below leaves room for (a train and an eval graph per precision state).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

BACKEND_VARIABLE = "DISTQ_COMPILE_BACKEND"
"""For tests: another torch.compile backend (e.g. "eager", to count graphs without code generation)."""
CACHE_LIMIT = 64


def compile_models(models: nn.ModuleDict, device: torch.device, one_process: bool) -> None:
    backend = os.environ.get(BACKEND_VARIABLE, "inductor")
    # CUDA graphs need static shapes and one device per process: the one-process CUDA path.
    mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" and one_process else None
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_LIMIT)
    for model in models.values():
        model.compile(backend=backend, mode=mode)
