"""The config: one small dataclass per component, validated on construction.

Every field has its default here (or in the section's own file: ``precision.py``, ``guided.py``)
and nowhere else. ``DistqConfig`` is the whole file; ``distq train --help-config`` prints every
key with its default and meaning.

A section checks its own values. Checks that need another layer of distq happen where that
layer builds from the config: the model registry rejects an unknown ``model.arch``, and each
precision policy checks its schedule against the run (``distq.controller.policies``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distq.config.checks import check_positive
from distq.config.guided import GuidedConfig, HintConfig, StudentConfig
from distq.config.precision import PrecisionConfig
from distq.quant.functional import FULL_PRECISION, check_bits
from distq.quant.methods import ACT, WEIGHT, LsqConfig, PactConfig, build_method, method_class, method_keys

__all__ = [
    "DataConfig", "DistConfig", "DistqConfig", "GuidedConfig", "HintConfig", "LogConfig", "ModelConfig",
    "PrecisionConfig", "QuantConfig", "RunConfig", "StudentConfig", "TrainConfig",
]


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory: checkpoints, TensorBoard events, config.yaml and results.json go here."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep (the newest); older ones are deleted once a newer one is
    committed. 2 or more leaves one to fall back to if the newest is damaged."""
    save_every_steps: int | None = None
    """Also checkpoint every this many optimizer steps inside an epoch (long epochs); null: at the end
    of each epoch only (and on SIGUSR1 or SIGTERM)."""
    lock_stale_s: int = 600
    """A run directory's lock (RUN_DIR/.distq-lock, refreshed every lock_stale_s / 10 seconds by the
    job that owns the directory) left unrefreshed this long counts as abandoned and is taken over
    with one line; a holder on this host whose process is gone is taken over at once."""

    def __post_init__(self):
        if not self.dir:
            raise ValueError("run.dir must be a directory path, e.g. run.dir=runs/my_run")
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints} must be >= 1 (the checkpoint to resume from)")
        if self.save_every_steps is not None:
            check_positive("run.save_every_steps", self.save_every_steps)
        check_positive("run.lock_stale_s", self.lock_stale_s)


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "resnet18"
    """Registered architecture: resnet18, resnet34, resnet50 or alexnet (checked by the model registry)."""
    width: int = 64
    """Base width of a ResNet (torchvision: 64)."""
    small_input: bool = False
    """3x3 stride-1 stem without max-pool, for 32x32 images."""
    num_classes: int | None = None
    """Number of classes; null takes it from the dataset."""
    pretrained: str | None = None
    """Full-precision weights to start from: a state_dict file (e.g. torchvision's) or a distq run
    directory (its latest checkpoint); the bits and quantizer stay this config's."""

    def __post_init__(self):
        if not self.arch:
            raise ValueError("model.arch is empty: name an architecture, e.g. resnet18")
        check_positive("model.width", self.width)
        if self.num_classes is not None:
            check_positive("model.num_classes", self.num_classes)


@dataclass(kw_only=True)
class QuantConfig:
    w_bits: int = 32
    """Weight bit-width of quantized layers: 1..8, or 32 for full precision. Guided runs: the students'
    default (guided.students[].w_bits)."""
    a_bits: int = 32
    """Activation bit-width of quantized layers: 1..8, or 32 for full precision. Guided runs: the
    students' default (guided.students[].a_bits)."""
    method: Literal[method_keys()] = "dorefa"
    """The quantizer method (docs/methods.md): dorefa (DoReFa, straight-through), aqe (the
    asymptotic-quantized estimator), lsq (learned step size; 2..8 bits), pact (learned activation
    clipping with DoReFa weights)."""
    per_channel: bool = False
    """Weight scale per output channel instead of per layer."""
    keep_first_fp: bool = True
    """Keep the first conv full precision."""
    keep_last_fp: bool = True
    """Keep the last linear layer full precision."""
    keep_final_act_fp: bool = True
    """Keep the activation feeding the final pooling full precision."""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """Quantizer implementation: triton (fused Triton kernels: on CUDA, or on the CPU under
    TRITON_INTERPRET=1 for tests), torch (PyTorch operations; on the CPU distq's native loops
    for fp32 where they are compiled, DISTQ_NATIVE=0 turns them off), auto (Triton for CUDA
    tensors, torch elsewhere). All give the same outputs to the bit: each Triton kernel and native
    loop is checked against the PyTorch kernel at its first use in a process, and one that fails or
    disagrees is replaced by the PyTorch kernel for the run with a one-line warning (auto, torch),
    or stops the run with one error line (triton). Applies to the dorefa and aqe methods; lsq and
    pact always run PyTorch operations (custom operators under train.compile)."""

    lsq: LsqConfig = field(default_factory=LsqConfig)
    """LSQ's settings (used when quant.method=lsq)."""
    pact: PactConfig = field(default_factory=PactConfig)
    """PACT's settings (used when quant.method=pact)."""

    def __post_init__(self):
        check_bits(self.w_bits, "quant.w_bits")
        check_bits(self.a_bits, "quant.a_bits")
        method = method_class(self.method)
        for key, role in (("w_bits", WEIGHT), ("a_bits", ACT)):
            refusal = method.bits_refusal(role, getattr(self, key))
            if refusal:
                raise ValueError(f"quant.{key}={getattr(self, key)}: {refusal}; raise quant.{key} or pick another quant.method")

    def build_method(self, key: str | None = None):
        """The quantizer method object ``key`` (default: quant.method) with its settings quant.<key>."""
        key = key or self.method
        return build_method(key, getattr(self, key, None))


@dataclass(kw_only=True)
class DataConfig:
    root: str | None = None
    """ImageNet-layout folder (ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG), or with
    data.format=shards a folder written by distq data pack; null uses the embedded digits dataset."""
    format: Literal["folders", "shards"] = "folders"
    """folders: image files in class folders (data.root as above); shards: webdataset tar shards with
    DALI index files and index.json (distq data pack ROOT --out SHARDS), read by offset, each epoch
    shard after shard in a random order from (seed, epoch): a cluster file system serves a few large
    files instead of a million small ones."""
    loader: Literal["torchvision", "dali"] = "torchvision"
    """torchvision: ImageFolder + DataLoader; dali: NVIDIA DALI pipelines (GPU decoding when CUDA is present)."""
    image_size: int = 224
    """Training crop and validation centre-crop size."""
    batch_size: int = 256
    """Batch size per process and forward pass (the micro-batch); with train.global_batch, the largest one."""
    workers: int = 4
    """Data-loading worker processes per training process."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Area range of RandomResizedCrop."""
    hflip: bool = True
    """Random horizontal flips in training."""
    val_crop_ratio: float = 0.875
    """Validation resizes the shorter side to image_size / val_crop_ratio, then centre-crops."""
    max_image_pixels: int = 178_956_970
    """Largest image (width x height) that training, evaluation and distq predict decode; a larger one
    is an error naming the file (the default is Pillow's decompression-bomb limit)."""

    def __post_init__(self):
        if self.format == "shards" and self.root is None:
            raise ValueError("data.format=shards needs data.root: a folder written by 'distq data pack ROOT --out SHARDS'")
        check_positive("data.image_size", self.image_size)
        check_positive("data.batch_size", self.batch_size)
        if self.workers < 0:
            raise ValueError(f"data.workers={self.workers} must be >= 0")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale={self.crop_scale} must be [low, high] with 0 < low <= high <= 1")
        if not 0 < self.val_crop_ratio <= 1:
            raise ValueError(f"data.val_crop_ratio={self.val_crop_ratio} must be in (0, 1]")
        check_positive("data.max_image_pixels", self.max_image_pixels)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 90
    """Training epochs."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """sgd: SGD with momentum (Nesterov unless nesterov=false); adamw: AdamW with betas (momentum, 0.999)."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (AdamW: beta1)."""
    nesterov: bool = True
    """Nesterov momentum for SGD (ignored by AdamW, and when momentum is 0)."""
    weight_decay: float = 1e-4
    """Weight decay of conv and linear weights; biases and batch-norm parameters are never decayed."""
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    """Learning-rate schedule over the whole run."""
    milestones: list[int] = field(default_factory=list)
    """Epochs at which multistep multiplies the learning rate by gamma."""
    gamma: float = 0.1
    """Factor multistep applies to the learning rate at each milestone."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0 over this many epochs."""
    label_smoothing: float = 0.0
    """Label smoothing of every cross-entropy term (0: none)."""
    global_batch: int | None = None
    """Images per optimizer step over all processes, whatever their number: distq picks the
    gradient-accumulation steps (and, if it must, a micro-batch below data.batch_size) to reach it.
    null: data.batch_size x dist.grad_accum x processes. A resumed run keeps its global batch."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; null disables."""
    compile: bool = False
    """torch.compile every model (in place: parameter names unchanged), under DeepSpeed too; on CUDA
    with one process in "reduce-overhead" mode (CUDA graphs). The quantizers are custom operators the
    compiler keeps whole; a bit-width change recompiles once. Not with precision.stochastic,
    precision.aqe or precision.aux_branch, which change the network every step."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is NaN or infinite: stop (one line naming the step and the
    quantity, exit status 4, no checkpoint written from then on) or skip (no update, as a grad scaler
    does; counted as train/skipped_steps in TensorBoard; the run stops after train.max_skipped_steps
    skipped in a row)."""
    max_skipped_steps: int = 10
    """With train.on_nonfinite=skip: stop after this many non-finite steps in a row."""

    def __post_init__(self):
        check_positive("train.epochs", self.epochs)
        check_positive("train.max_skipped_steps", self.max_skipped_steps)
        check_positive("train.lr", self.lr)
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
            check_positive("train.grad_clip", self.grad_clip)
        if self.global_batch is not None:
            check_positive("train.global_batch", self.global_batch)


@dataclass(kw_only=True)
class DistConfig:
    """How the run uses its processes; launchers (torchrun, accelerate, srun) set the ranks."""

    engine: Literal["auto", "torch", "deepspeed"] = "auto"
    """auto: DeepSpeed when there is more than one process, plain PyTorch otherwise."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0, 1 or 2: shard optimizer state (1) and gradients (2) over ranks."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = data.batch_size x processes x grad_accum);
    leave it at 1 when train.global_batch is set, which chooses it."""
    bf16: bool | None = None
    """bf16 autocast for forward and loss (weights, gradients and optimizer state stay fp32); null: on with CUDA, off on CPU."""
    channels_last: bool | None = None
    """Training batches in channels-last memory format, so convolutions run channels-last (faster on tensor cores); null: on with CUDA."""
    backend: Literal["nccl", "gloo"] | None = None
    """Process-group backend; null: nccl with CUDA, gloo otherwise."""
    timeout_s: int = 300
    """Collective timeout: a dead or hung rank makes the job fail after this long instead of hanging."""
    sync_bn: bool = False
    """Synchronised batch-norm: every BatchNorm of guide and students normalises with the statistics of
    the global batch (all ranks' micro-batches), so N processes train the network one process would
    with the same global batch, and every rank has the same running statistics. Costs two small
    all-reduces per BatchNorm layer per step; no effect on one process."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"dist.zero_stage={self.zero_stage} must be 0, 1 or 2")
        check_positive("dist.grad_accum", self.grad_accum)
        check_positive("dist.timeout_s", self.timeout_s)


@dataclass(kw_only=True)
class LogConfig:
    every_steps: int = 50
    """Write train/loss and lr to TensorBoard every this many steps (and, without a terminal, a progress line)."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tb."""
    progress: bool = True
    """Show progress: a bar on a terminal; otherwise (a log file, SLURM) one plain line every log.every_steps steps."""
    samples: bool = False
    """Debugging: log the index of every training sample each rank uses, per step, to RUN_DIR/samples/
    (shows that resumes and changes of the process count use each sample once per epoch)."""

    def __post_init__(self):
        check_positive("log.every_steps", self.every_steps)


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
    dist: DistConfig = field(default_factory=DistConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    guided: GuidedConfig | None = None

    def __post_init__(self):
        if self.train.compile:
            per_step = [name for name in ("stochastic", "aqe", "aux_branch") if getattr(self.precision, name) is not None]
            if per_step:
                raise ValueError(
                    f"train.compile cannot be combined with precision.{per_step[0]}: it changes the network every step, "
                    "and torch.compile would compile it again each time; set train.compile=false"
                )
        if self.train.global_batch is not None and self.dist.grad_accum != 1:
            raise ValueError(
                f"train.global_batch={self.train.global_batch} chooses the accumulation steps itself: "
                f"remove dist.grad_accum={self.dist.grad_accum} (or train.global_batch)"
            )
        if self.guided is not None:
            self._give_students_their_bits()

    def _give_students_their_bits(self) -> None:
        """In a guided run quant's bit-widths are the students' default; one that no student
        trains at would be ignored, so it is refused instead."""
        students = self.guided.students
        for student in students:
            student.take_default_bits(self.quant.w_bits, self.quant.a_bits)
            method = method_class(student.method or self.quant.method)
            for bits, role in ((student.w_bits, WEIGHT), (student.a_bits, ACT)):
                refusal = method.bits_refusal(role, bits)
                if refusal:
                    raise ValueError(
                        f"guided student {student.name!r} trains at {bits} bits, but {refusal}: "
                        "give it more bits or another method (guided.students[].method)"
                    )
        self.guided.check_names()
        for kind in ("w_bits", "a_bits"):
            value = getattr(self.quant, kind)
            used = sorted({getattr(s, kind) for s in students})
            if value != FULL_PRECISION and value not in used:
                raise ValueError(
                    f"quant.{kind}={value} applies to no student: every entry of guided.students sets its own {kind} "
                    f"({', '.join(map(str, used))}); set the students' bits in guided.students "
                    f"(e.g. guided.students=[{{w_bits: {self.quant.w_bits}, a_bits: {self.quant.a_bits}}}]) "
                    f"or leave {kind} out of them to use quant.{kind}"
                )
