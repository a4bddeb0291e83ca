"""The config: one small dataclass per component, validated on construction.

Every field has its default here and nowhere else. ``DistqConfig`` is the whole file;
``distq train --help-config`` prints every key with its default and meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from distq.quant.functional import VALID_BITS


def _check_bits(key: str, value: int) -> None:
    if value not in VALID_BITS:
        raise ValueError(f"{key}={value} is not a valid bit-width: use 1..8, or 32 for full precision")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{key}={value} must be > 0")


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory: checkpoints, TensorBoard events, config.yaml and results.json go here."""
    keep_checkpoints: int = 1
    """How many per-epoch checkpoints to keep besides last.pt (0 keeps only last.pt)."""

    def __post_init__(self):
        if not self.dir:
            raise ValueError("run.dir must be a directory path, e.g. run.dir=runs/my_run")
        if self.keep_checkpoints < 0:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints} must be >= 0")


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "resnet18"
    """Registered architecture: resnet18, resnet34, resnet50 or alexnet."""
    width: int = 64
    """Base width of a ResNet (torchvision: 64)."""
    small_input: bool = False
    """3x3 stride-1 stem without max-pool, for 32x32 images."""
    num_classes: Optional[int] = None
    """Number of classes; null takes it from the dataset."""
    pretrained: Optional[str] = None
    """Path of a full-precision state_dict file (e.g. torchvision's) to start from."""

    def __post_init__(self):
        from distq.models import model_names

        if self.arch not in model_names():
            raise ValueError(f"model.arch={self.arch!r} is unknown: use one of {', '.join(model_names())}")
        _check_positive("model.width", self.width)
        if self.num_classes is not None:
            _check_positive("model.num_classes", self.num_classes)


@dataclass(kw_only=True)
class QuantConfig:
    w_bits: int = 32
    """Weight bit-width of quantized layers: 1..8, or 32 for full precision."""
    a_bits: int = 32
    """Activation bit-width of quantized layers: 1..8, or 32 for full precision."""
    method: Literal["dorefa", "aqe"] = "dorefa"
    """dorefa: DoReFa quantizers with STE; aqe: the asymptotic-quantized estimator."""
    per_channel: bool = False
    """Weight scale per output channel instead of per layer."""
    keep_first_fp: bool = True
    """Keep the first conv full precision."""
    keep_last_fp: bool = True
    """Keep the last linear layer full precision."""
    keep_final_act_fp: bool = True
    """Keep the activation feeding the final pooling full precision."""

    def __post_init__(self):
        _check_bits("quant.w_bits", self.w_bits)
        _check_bits("quant.a_bits", self.a_bits)


@dataclass(kw_only=True)
class DataConfig:
    root: Optional[str] = None
    """ImageNet-layout folder (ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG);
    null uses the embedded digits dataset."""
    loader: Literal["torchvision", "dali"] = "torchvision"
    """torchvision: ImageFolder + DataLoader; dali: NVIDIA DALI pipelines (GPU decoding when CUDA is present)."""
    image_size: int = 224
    """Training crop and validation centre-crop size."""
    batch_size: int = 256
    """Batch size per process."""
    workers: int = 4
    """Data-loading worker processes per training process."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Area range of RandomResizedCrop."""
    hflip: bool = True
    """Random horizontal flips in training."""
    val_crop_ratio: float = 0.875
    """Validation resizes the shorter side to image_size / val_crop_ratio, then centre-crops."""

    def __post_init__(self):
        _check_positive("data.image_size", self.image_size)
        _check_positive("data.batch_size", self.batch_size)
        if self.workers < 0:
            raise ValueError(f"data.workers={self.workers} must be >= 0")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale={self.crop_scale} must be [low, high] with 0 < low <= high <= 1")
        if not 0 < self.val_crop_ratio <= 1:
            raise ValueError(f"data.val_crop_ratio={self.val_crop_ratio} must be in (0, 1]")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 90
    """Training epochs."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (AdamW: beta1)."""
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    """Learning-rate schedule over the whole run."""
    milestones: list[int] = field(default_factory=list)
    """Epochs at which multistep multiplies the learning rate by gamma."""
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    """Linear warm-up from 0 over this many epochs."""
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value; null disables."""

    def __post_init__(self):
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.lr", self.lr)
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("train.milestones is empty but train.schedule=multistep: give epochs, e.g. [30, 60]")
        bad = [m for m in self.milestones if not 0 < m < self.epochs]
        if bad:
            raise ValueError(f"train.milestones={self.milestones} has epochs outside (0, train.epochs={self.epochs})")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"train.warmup_epochs={self.warmup_epochs} must be in [0, train.epochs)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"train.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.grad_clip is not None:
            _check_positive("train.grad_clip", self.grad_clip)


@dataclass(kw_only=True)
class LogConfig:
    every_steps: int = 50
    """Write train/loss and lr to TensorBoard every this many steps."""
    tensorboard: bool = True
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        _check_positive("log.every_steps", self.every_steps)


@dataclass(kw_only=True)
class DistqConfig:
    seed: int = 0
    """Seeds weights, data order, augmentation and every sampled schedule."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
