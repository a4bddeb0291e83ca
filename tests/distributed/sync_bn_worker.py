"""One rank of the synchronised batch-norm check: its half of a fixed batch through
SyncBatchNorm2d, forward and backward; rank 0 saves what it computed and all ranks' sums."""

import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from distq.distributed.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm

BATCH, CHANNELS = 24, 5


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, 6, 7, generator=generator) * 3 + 1
    dy = torch.randn(BATCH, CHANNELS, 6, 7, generator=generator)
    net = nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 1), nn.BatchNorm2d(CHANNELS))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5, generator=generator)
        net[1].bias.normal_(generator=generator)
    weight_before = net[1].weight
    convert_sync_batchnorm(net, torch.device("cpu"))
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    xs = x[mine].clone().requires_grad_()
    y = net(xs)
    (y * dy[mine]).sum().backward()
    grads = torch.cat([net[1].weight.grad, net[1].bias.grad, net[0].weight.grad.flatten()])
    dist.all_reduce(grads)  # summed over ranks: what one process computes over the whole batch
    parts = [None] * world
    dist.all_gather_object(parts, (y.detach(), xs.grad))
    if rank == 0:
        torch.save({"y": torch.cat([p[0] for p in parts]), "x_grad": torch.cat([p[1] for p in parts]), "grads": grads,
                    "running_mean": net[1].running_mean, "running_var": net[1].running_var,
                    "synced": isinstance(net[1], SyncBatchNorm2d), "same_parameter": net[1].weight is weight_before}, out)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
