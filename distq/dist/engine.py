"""Everything about processes and devices, in one place.

The trainer talks to an ``Engine``: forward the team, back-propagate, step, reduce
metrics, save and load the optimizer side of checkpoints. ``TorchEngine`` runs one
process; ``DeepSpeedEngine`` runs the guide and students as one DeepSpeed engine over
all data-parallel ranks (ZeRO 0/1/2 sharding their optimizer state and gradients). The
rest of the code never asks whether it is distributed.
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from distq.config.schema import DistConfig, TrainConfig
from distq.dist.env import DistEnv, detect
from distq.errors import DistqError

DEEPSPEED_DIR = "deepspeed"


class TeamModule(nn.Module):
    """All models of a run (and the aux branches) as one module: one engine, one optimizer."""

    def __init__(self, models: nn.ModuleDict, extra: nn.ModuleDict):
        super().__init__()
        self.models = models
        self.extra = extra  # parameters trained alongside the models (aux branches)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: model(images) for name, model in self.models.items()}


def close_process_group() -> None:
    """Leave the job's process groups (DeepSpeed's and the vote's too) before the process exits.

    Left to the interpreter's shutdown, gloo's threads can be destroyed while still joinable
    ("terminate called without an active exception"): the process then aborts with SIGABRT
    after a finished run, and the launcher (or SLURM's requeue) sees a failure."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def use_device(env: DistEnv) -> torch.device:
    """This rank's GPU (by local rank), made the current device, when there is one; else the
    CPU. On a GPU, cuDNN picks the fastest convolution algorithms for the (fixed) training
    shapes, as NVIDIA's and timm's trainers do."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # Before the process group exists: NCCL then binds this rank to its own GPU, not to one
    # guessed from the global rank (wrong on every node but the first).
    torch.cuda.set_device(env.local_rank)
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", env.local_rank)


class Engine:
    """The interface the trainer uses; see the two implementations below."""

    env: DistEnv
    device: torch.device
    memory_format: torch.memory_format
    """Of the training batches. Channels-last batches make every convolution run channels-last
    (PyTorch picks the format from the input or the weight). The weights stay contiguous:
    DeepSpeed broadcasts and flattens parameters through views that need a unit last stride."""
    optimizer: torch.optim.Optimizer
    team: TeamModule

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.team(images)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.env.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.env.distributed:
            dist.barrier()

    def broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does.

        Each rank updates them from its own shard; the checkpoint holds rank 0's, so the
        models evaluated on every rank must be rank 0's too: otherwise the reported accuracy
        is not the saved model's, and a run resumed mid-epoch (all ranks restart from rank 0's
        buffers) would report different numbers than the uninterrupted run.
        """
        if self.env.distributed:
            for buffer in self.team.buffers():
                dist.broadcast(buffer.data, src=0)

    def _place(self, env: DistEnv, cfg: DistConfig) -> None:
        """This rank's device, and the GPU defaults of ``dist.bf16`` and ``dist.channels_last``
        (null: on with CUDA, off on the CPU)."""
        self.env, self.cfg = env, cfg
        self.device = use_device(env)
        on_cuda = self.device.type == "cuda"
        self.bf16 = on_cuda if cfg.bf16 is None else cfg.bf16
        channels_last = on_cuda if cfg.channels_last is None else cfg.channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def autocast(self):
        """Mixed precision for the forward pass and the loss: bf16 autocast where ``dist.bf16``
        (default: on with CUDA). Parameters, gradients and optimizer state stay fp32, and
        BatchNorm and the losses run in fp32 under autocast, in both engines."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


class TorchEngine(Engine):
    """One process, plain PyTorch: the reference the distributed engine must match."""

    def __init__(self, team: TeamModule, optimizer: torch.optim.Optimizer, train: TrainConfig, cfg: DistConfig, env: DistEnv):
        self._place(env, cfg)
        self.train_cfg = train
        self.team = team.to(self.device)
        self.optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self, boundary: bool) -> None:
        """Called after every micro-batch; steps at the end of an accumulation window."""
        if not boundary:
            return
        if self.train_cfg.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.train_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict, run_dir: Path) -> None:
        self.optimizer.load_state_dict(state)

    def save_sharded(self, run_dir: Path, tag: str, keep: int) -> None:
        """Nothing beyond the checkpoint file: one process holds the whole optimizer state."""


class DeepSpeedEngine(Engine):
    """Guide + students in one DeepSpeed engine over all ranks."""

    def __init__(self, team: TeamModule, optimizer: torch.optim.Optimizer, train: TrainConfig, cfg: DistConfig, env: DistEnv, micro_batch: int):
        import deepspeed

        self._place(env, cfg)
        # bf16 is the trainer's autocast (Engine.autocast), not DeepSpeed's "bf16" mode: that
        # mode casts the parameters but not the buffers, so BatchNorm would get bf16 weights
        # and fp32 running statistics (an error), and it would keep BatchNorm in bf16.
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": micro_batch * cfg.grad_accum * env.world,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if train.grad_clip is not None:
            ds_config["gradient_clipping"] = train.grad_clip
        if not dist.is_initialized():
            deepspeed.init_distributed(
                dist_backend=cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                timeout=datetime.timedelta(seconds=cfg.timeout_s),
            )
        _give_deepspeed_the_timeout(cfg.timeout_s)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=team.to(self.device), optimizer=optimizer, config=ds_config)
        self.team = self.engine.module

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.engine(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, boundary: bool) -> None:
        self.engine.step()  # DeepSpeed counts micro-batches itself and steps on the boundary

    def optimizer_state(self) -> None:
        return None  # sharded: saved by save_sharded

    def save_sharded(self, run_dir: Path, tag: str, keep: int) -> None:
        """Every rank writes its optimizer shard; DeepSpeed updates ``latest`` last."""
        folder = Path(run_dir) / "checkpoints" / DEEPSPEED_DIR
        self.engine.save_checkpoint(str(folder), tag=tag)
        self.barrier()
        if self.env.is_main:
            tags = sorted(p for p in folder.iterdir() if p.is_dir())
            for old in tags[: -max(1, keep)]:
                import shutil

                shutil.rmtree(old, ignore_errors=True)

    def load_optimizer_state(self, state, run_dir: Path) -> None:
        folder = Path(run_dir) / "checkpoints" / DEEPSPEED_DIR
        if not (folder / "latest").is_file():
            raise DistqError(f"{folder} has no DeepSpeed checkpoint to resume the optimizer from: start a fresh run.dir")
        self.engine.load_checkpoint(str(folder), load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False)


def _give_deepspeed_the_timeout(timeout_s: float) -> None:
    """DeepSpeed runs ZeRO's gradient collectives on its own clone of the world group, which
    it makes with torch's default timeout (30 min on gloo, 10 min on NCCL), not the one given
    to ``init_distributed`` (huggingface/transformers#32036): a frozen rank would hang the job
    for that long. Make the clone here, with ``dist.timeout_s``; DeepSpeed then reuses it.
    tests/distributed/test_dead_rank.py checks that a frozen rank fails the job within the timeout."""
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", None) is None:
        timeout = datetime.timedelta(seconds=timeout_s)
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


def build_engine(team: TeamModule, optimizer: torch.optim.Optimizer, train: TrainConfig, cfg: DistConfig, micro_batch: int, env: DistEnv | None = None) -> Engine:
    env = env or detect()
    use_deepspeed = cfg.engine == "deepspeed" or (cfg.engine == "auto" and env.distributed)
    if use_deepspeed:
        return DeepSpeedEngine(team, optimizer, train, cfg, env, micro_batch)
    if env.distributed:
        raise DistqError(f"dist.engine=torch runs a single process but {env.world} were launched: use dist.engine=deepspeed (or auto)")
    return TorchEngine(team, optimizer, train, cfg, env)
