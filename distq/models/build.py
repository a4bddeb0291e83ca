"""Build the model a config describes: registry -> quantized layers -> optional weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from distq.checkpoint import CheckpointError, load_state, load_weights
from distq.config.loader import ConfigError
from distq.config.schema import ModelConfig, QuantConfig
from distq.models.convert import quantize_model
from distq.models.registry import build_float_model, model_names
from distq.quant.layers import quant_layers
from distq.quant.methods import learnable_names


def check_arch(arch: str) -> None:
    if arch not in model_names():
        raise ConfigError(f"model.arch={arch!r} is unknown: use one of {', '.join(model_names())}")


def build_model(
    model_cfg: ModelConfig, quant_cfg: QuantConfig, num_classes: int, w_bits: int | None = None, a_bits: int | None = None, method: str | None = None
) -> nn.Module:
    """The quantized model of the config; ``w_bits``/``a_bits``/``method`` override the config's
    (a full-precision guide is the same network at 32 bits; a guided student may pick its method)."""
    check_arch(model_cfg.arch)
    try:
        model = build_float_model(model_cfg.arch, model_cfg.num_classes or num_classes, model_cfg.width, model_cfg.small_input)
    except ValueError as exc:  # an option this architecture does not support, e.g. model.width for alexnet
        raise ConfigError(str(exc)) from None
    quantize_model(
        model,
        quant_cfg.w_bits if w_bits is None else w_bits,
        quant_cfg.a_bits if a_bits is None else a_bits,
        method=quant_cfg.build_method(method),
        per_channel=quant_cfg.per_channel,
        keep_first_fp=quant_cfg.keep_first_fp,
        keep_last_fp=quant_cfg.keep_last_fp,
        keep_final_act_fp=quant_cfg.keep_final_act_fp,
        kernels=quant_cfg.kernels,
    )
    if model_cfg.pretrained:
        load_float_weights(model, model_cfg.pretrained)
    return model


def load_float_weights(model: nn.Module, path: str) -> None:
    """Load full-precision weights into a (quantized) model: a state_dict file (torchvision's
    format), or a distq run directory or checkpoint (its first model, e.g. a full-precision run
    to fine-tune from). Only weights and batch-norm statistics are taken: the precision state
    (``_extra_state``: bits, quantizer method) stays the one the config gave the model, so a
    W2A2 model started from a full-precision checkpoint still trains at W2A2 with its own
    quantizer."""
    if Path(path).is_dir():
        state = load_state(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"model.pretrained file {path!r} not found: give the path of a saved state_dict or a distq run directory") from None
        except Exception as exc:  # torch raises many types for a bad file
            raise CheckpointError(f"model.pretrained file {path!r} is not a readable state_dict ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and "models" in state:  # a distq checkpoint: take its first model
        state = next(iter(state["models"].values()))
    # A quantizer method's own parameters (LSQ's steps, PACT's clipping levels) belong to the
    # method of the run they come from: this run's start its own way (at its first step).
    learned = frozenset(f"{name}.{p}" for name, layer in quant_layers(model) for p in layer.quantizer.learnable if hasattr(layer, p))
    weights = {k: v for k, v in state.items() if not k.endswith("_extra_state") and k.rsplit(".", 1)[-1] not in learnable_names()}
    load_weights(model, weights, f"model.pretrained file {path!r}", allow_missing_quant_state=True, optional=learned)
