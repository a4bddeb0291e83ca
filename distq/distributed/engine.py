"""Everything about processes and devices, in one place.

The trainer talks to an ``Engine``: forward the team, back-propagate, step, set the
learning rate, freeze parameter groups, reduce metrics, agree on stopping, and save and
load its optimizer's share of a checkpoint. ``TorchEngine`` runs one process;
``DeepSpeedEngine`` runs the guide and students as one DeepSpeed engine over all
data-parallel ranks (ZeRO 0/1/2 sharding their optimizer state and gradients). Both write
the optimizer state in one engine-independent form (``distq.checkpoint.optimizer_state``),
so a checkpoint of either engine resumes on the other, on any number of processes. The
rest of the code never asks whether it is distributed, nor which engine it has.
"""

from __future__ import annotations

import contextlib
import datetime
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from distq.checkpoint import FileRecord, Found, load_tensors, optimizer_file, save_tensors
from distq.checkpoint.optimizer_state import (
    Fragments,
    fragment,
    load_whole_parameters,
    merge,
    split_state,
    whole_parameter_fragments,
)
from distq.config.schema import DistConfig, TrainConfig
from distq.data.order import BatchLayout
from distq.distributed.deepspeed_contract import check_groups_module, check_zero_optimizer
from distq.distributed.env import DistEnv, detect
from distq.distributed.sync_bn import convert_sync_batchnorm
from distq.distributed.vote import RankVote
from distq.errors import DistqError

FROZEN = "frozen"
"""Key of a parameter group that no longer trains (set by ``freeze_groups``)."""


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
    layout: BatchLayout

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.team(images)

    # --- the optimizer ----------------------------------------------------------------------

    def set_lr(self, factor: float) -> None:
        """Every training parameter group at ``factor`` x its base learning rate."""
        for group in self.optimizer.param_groups:
            if not group.get(FROZEN):
                group["lr"] = group["base_lr"] * factor

    def freeze_groups(self, prefix: str) -> None:
        """The parameter groups whose ``model`` starts with ``prefix`` stop training (the
        auxiliary branches once they are removed): no update and no weight decay from now on."""
        for group in self.optimizer.param_groups:
            if str(group["model"]).startswith(prefix):
                group.update({FROZEN: True, "lr": 0.0, "weight_decay": 0.0})

    def parameter_names(self) -> dict[torch.Tensor, str]:
        return {param: name for name, param in self.team.named_parameters()}

    def optimizer_fragments(self) -> Fragments:
        """This rank's share of the optimizer state (see distq.checkpoint.optimizer_state)."""
        return whole_parameter_fragments(self.optimizer, self.parameter_names())

    def install_optimizer_state(self, merged: dict) -> None:
        load_whole_parameters(self.optimizer, self.parameter_names(), merged)

    def weights_changed(self) -> None:
        """The module's weights were changed in place (a resume, AQE's clipping): refresh any copy of them."""

    # --- checkpoints ------------------------------------------------------------------------

    def save_optimizer(self, folder: Path) -> dict[str, FileRecord]:
        """Write this rank's optimizer shard into the checkpoint folder; returns its record."""
        name = optimizer_file(self.env.rank, self.env.world)
        return {name: save_tensors(self.optimizer_fragments(), folder / name)}

    def load_optimizer(self, found: Found) -> None:
        """The optimizer state of a checkpoint written on any number of processes by either engine."""
        shards = [load_tensors(path) for path in found.optimizer_paths()]
        self.install_optimizer_state(merge(shards, str(found.folder)))

    # --- collectives --------------------------------------------------------------------------

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (a blocking all-reduce of one number)."""
        if not self.env.distributed:
            return flag
        ballot = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(ballot, op=dist.ReduceOp.MAX)
        return bool(ballot.item())

    def should_stop(self, flag: bool) -> bool:
        """True on every rank at the same step once ``flag`` was raised on any rank (one step late)."""
        return self.vote(flag)

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        return gather_objects(obj, self.env)

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

    def __init__(self, team: TeamModule, optimizer: torch.optim.Optimizer, train: TrainConfig, cfg: DistConfig, env: DistEnv, layout: BatchLayout):
        self._place(env, cfg)
        self.train_cfg, self.layout = train, layout
        if cfg.sync_bn:
            convert_sync_batchnorm(team, self.device)  # one process: the same arithmetic as on many
        self.team = team.to(self.device)
        self.optimizer = optimizer
        self.vote = RankVote(env, cfg.timeout_s)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.layout.grad_accum).backward()

    def step(self, boundary: bool) -> float | None:
        """Called after every micro-batch; steps at the end of an accumulation window and returns
        the gradient norm (None between boundaries). A non-finite gradient is never applied."""
        if not boundary:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.train_cfg.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(params, self.train_cfg.grad_clip)
        else:
            norm = gradient_norm(params)
        norm = float(norm)
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def freeze_groups(self, prefix: str) -> None:
        """One process can do better than freezing: the groups and their state leave the optimizer."""
        optimizer = self.optimizer
        for group in optimizer.param_groups:
            if str(group["model"]).startswith(prefix):
                for param in group["params"]:
                    optimizer.state.pop(param, None)
        optimizer.param_groups = [g for g in optimizer.param_groups if not str(g["model"]).startswith(prefix)]


class DeepSpeedEngine(Engine):
    """Guide + students in one DeepSpeed engine over all ranks."""

    def __init__(self, team: TeamModule, optimizer: torch.optim.Optimizer, train: TrainConfig, cfg: DistConfig, env: DistEnv, layout: BatchLayout):
        import deepspeed

        self._place(env, cfg)
        # bf16 is the trainer's autocast (Engine.autocast), not DeepSpeed's "bf16" mode: that
        # mode casts the parameters but not the buffers, so BatchNorm would get bf16 weights
        # and fp32 running statistics (an error), and it would keep BatchNorm in bf16.
        ds_config = {
            "train_micro_batch_size_per_gpu": layout.micro_batch,
            "gradient_accumulation_steps": layout.grad_accum,
            "train_batch_size": layout.global_batch,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
            # Always explicit: DeepSpeed 0.19 clips at a norm of 1.0 unless told otherwise, which
            # made every multi-process run train differently from the one-process run.
            "gradient_clipping": train.grad_clip or 0.0,
        }
        join_process_group(cfg, env)
        _give_deepspeed_the_timeout(cfg.timeout_s)
        if cfg.sync_bn:
            convert_sync_batchnorm(team, self.device)  # keeps the Parameter objects the optimizer holds
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=team.to(self.device), optimizer=optimizer, config=ds_config)
        self.team = self.engine.module
        self.layout = layout
        self.zero = cfg.zero_stage in (1, 2)  # ZeRO 1/2: flat fp32 partitions of the optimizer's weights
        if self.zero:
            check_zero_optimizer(self.optimizer)
        self.vote = RankVote(env, cfg.timeout_s)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.engine(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, boundary: bool) -> float | None:
        """DeepSpeed counts micro-batches itself and steps on the boundary; returns the gradient
        norm there (None between boundaries). A non-finite gradient is never applied: ZeRO 1/2
        skip such a step themselves (an fp32 partition whose norm is not finite), ZeRO-0 has its
        gradients (all-reduced at the boundary) dropped here, so its optimizer leaves every
        parameter and its state alone."""
        if not boundary:
            self.engine.step()
            return None
        if self.zero:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float("inf") if not self.engine.was_step_applied() else (None if norm is None else float(norm))
        params = [p for p in self.team.parameters() if p.grad is not None]
        norm = float(gradient_norm(params))
        if not math.isfinite(norm):
            for param in params:
                param.grad = None
        self.engine.step()
        return norm

    def weights_changed(self) -> None:
        """ZeRO keeps an fp32 copy of this rank's partition of the weights, which its step updates and
        copies back to the module: after the module's weights change any other way (a checkpoint
        loaded, AQE's clipping) the copy is refreshed from the module, or the next step undoes it."""
        if self.zero:
            self.optimizer.refresh_fp32_params()

    def optimizer_fragments(self) -> Fragments:
        """ZeRO 1/2: for each parameter that overlaps this rank's flat partition, the overlap
        (DeepSpeed's ``_hp_mapping``: where it starts in the parameter and in the partition).
        ZeRO-0 holds whole parameters, replicated: rank 0 writes them, the others nothing."""
        if not self.zero:
            return super().optimizer_fragments() if self.env.is_main else {}
        names, out = self.parameter_names(), {}
        for params, partition in self._partitions():
            state = self.optimizer.optimizer.state.get(partition, {})
            tensors, scalars = split_state(state, partition)
            for param in params:
                frag = param._hp_mapping
                if frag is None:
                    continue
                here = frag.hp_fragment_address
                slices = {key: value.narrow(0, here.start, here.numel) for key, value in tensors.items()}
                out[names[param]] = fragment(param.numel(), frag.lp_fragment_address.start, slices, scalars)
        return out

    def install_optimizer_state(self, merged: dict) -> None:
        """ZeRO 1/2: rebuild this rank's flat partition state from the whole tensors; DeepSpeed
        re-links its per-parameter views to it at the next step."""
        if not self.zero:
            return super().install_optimizer_state(merged)
        names = self.parameter_names()
        for params, partition in self._partitions():
            state: dict[str, torch.Tensor] = {}
            for param in params:
                frag, entry = param._hp_mapping, merged.get(names[param])
                if frag is None or not entry:
                    continue
                here, there = frag.hp_fragment_address, frag.lp_fragment_address
                for key, value in entry.items():
                    if value.dim():
                        if key not in state:
                            state[key] = torch.zeros_like(partition)
                        flat = state[key]
                        flat.narrow(0, here.start, here.numel).copy_(value.narrow(0, there.start, there.numel))
                    else:
                        state.setdefault(key, value.clone())
            if state:
                self.optimizer.optimizer.state[partition] = state
        self.optimizer._hp_optimizer_states_linked = False

    def _partitions(self):
        """(parameters of the group, this rank's flat fp32 partition of it), per parameter group."""
        return zip(self.optimizer.bit16_groups, self.optimizer.single_partition_of_fp32_groups)


def join_process_group(cfg: DistConfig, env: DistEnv) -> None:
    """Every rank of a multi-process job: join the job's process group (DeepSpeed's way, which
    the DeepSpeed engine then uses), if not already in it. One process: nothing."""
    if not env.distributed or dist.is_initialized():
        return
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo"),
        timeout=datetime.timedelta(seconds=cfg.timeout_s),
    )


def gather_objects(obj, env: DistEnv) -> list:
    """``obj`` of every rank, in rank order (on every rank); the process group must be joined."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def gradient_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the parameters' gradients together (0 when there are none)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def _give_deepspeed_the_timeout(timeout_s: float) -> None:
    """DeepSpeed runs ZeRO's gradient collectives on its own clone of the world group, which
    it makes with torch's default timeout (30 min on gloo, 10 min on NCCL), not the one given
    to ``init_distributed`` (huggingface/transformers#32036): a frozen rank would hang the job
    for that long. Make the clone here, with ``dist.timeout_s``; DeepSpeed then reuses it.
    tests/distributed/test_dead_rank.py checks that a frozen rank fails the job within the timeout."""
    from deepspeed.utils import groups

    check_groups_module(groups)
    if groups._WORLD_GROUP is None:
        timeout = datetime.timedelta(seconds=timeout_s)
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


def build_engine(team: TeamModule, optimizer: torch.optim.Optimizer, train: TrainConfig, cfg: DistConfig, layout: BatchLayout, env: DistEnv | None = None) -> Engine:
    env = env or detect()
    use_deepspeed = cfg.engine == "deepspeed" or (cfg.engine == "auto" and env.distributed)
    if use_deepspeed:
        return DeepSpeedEngine(team, optimizer, train, cfg, env, layout)
    if env.distributed:
        raise DistqError(f"dist.engine=torch runs a single process but {env.world} were launched: use dist.engine=deepspeed (or auto)")
    return TorchEngine(team, optimizer, train, cfg, env, layout)
