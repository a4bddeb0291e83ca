"""The loader pair of a run, by ``data.loader``."""

from __future__ import annotations

from distq.config.schema import DataConfig
from distq.data.bundle import DataBundle
from distq.data.order import BatchLayout


def build_loaders(cfg: DataConfig, seed: int, layout: BatchLayout | None = None, rank: int = 0) -> DataBundle:
    """Train and val loaders of this rank; ``layout`` defaults to one process at ``data.batch_size``."""
    layout = layout or BatchLayout(cfg.batch_size)
    if cfg.loader == "dali":
        from distq.data.dali import build_dali_loaders

        return build_dali_loaders(cfg, seed, layout, rank)
    from distq.data.torchvision_loader import build_torchvision_loaders

    return build_torchvision_loaders(cfg, seed, layout, rank)
