"""Train a BN-free quantized CNN for N steps on a fixed global batch sequence; rank 0 saves
the final weights. Run as one process (TorchEngine) or under torchrun (DeepSpeed ZeRO);
``mixed`` runs the GPU defaults on the CPU: bf16 autocast and channels-last models and batches."""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from distq.config.schema import DistConfig, TrainConfig
from distq.data.order import BatchLayout
from distq.distributed import TeamModule, build_engine, close_process_group, detect
from distq.quant import QAct, QConv2d
from distq.quant.calibrate import calibrate
from distq.train.optim import build_optimizer, param_groups

GLOBAL_BATCH, STEPS = 16, 20


def main(out: str, engine_kind: str, zero_stage: int, mixed: bool, method: str = "dorefa") -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        QAct(4, method=method),
        QConv2d(8, 16, 3, padding=1, bits=4, method=method),
        QAct(4, method=method),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    # LSQ's steps from a batch every rank sees whole (the trainer reduces over ranks instead).
    calibrate([model], torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(2)), lambda t: t)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    train = TrainConfig(epochs=1, lr=0.05, momentum=0.9, weight_decay=1e-4)
    env = detect()
    micro = GLOBAL_BATCH // env.world
    optimizer = build_optimizer(param_groups(model, train.lr, train.weight_decay), train)
    engine = build_engine(TeamModule(nn.ModuleDict({"model": model}), nn.ModuleDict()), optimizer, train,
                          DistConfig(engine=engine_kind, zero_stage=zero_stage, bf16=mixed, channels_last=mixed), BatchLayout(micro, 1, env.world), env)
    formats = []
    model[2].register_forward_hook(lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last)))
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=data)
        labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=data)
        mine = slice(env.rank * micro, (env.rank + 1) * micro)
        with engine.autocast():
            logits = engine.forward(images[mine].to(memory_format=engine.memory_format))["model"]
            loss = F.cross_entropy(logits, labels[mine])
        engine.backward(loss)
        engine.step(True)
    if env.is_main:
        final = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        conv = model[2].weight
        torch.save({"initial": initial, "final": final, "logits_dtype": str(logits.dtype), "param_dtype": str(conv.dtype),
                    "channels_last": all(formats)}, out)
    close_process_group()


if __name__ == "__main__":
    flags = sys.argv[4:]
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), "mixed" in flags, next((f for f in flags if f != "mixed"), "dorefa"))
