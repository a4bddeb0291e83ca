"""What a rank says when the others are gone: one line instead of a collective's traceback."""

from __future__ import annotations

import re

import torch.distributed as dist

LOST_PEER_SIGNS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""Texts of the errors gloo raises when a peer died (connection gone) or hangs (timeout)."""


def lost_peer_message(exc: BaseException) -> str | None:
    """A one-line explanation if ``exc`` is a collective failing because another rank died or
    hung (``dist.timeout_s``); None for any other error."""
    if not (dist.is_available() and dist.is_initialized()) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).strip()
    if not any(sign in text for sign in LOST_PEER_SIGNS):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])  # drop gloo's "[file.cc:78]" prefix
    return (
        f"rank {dist.get_rank()} of {dist.get_world_size()} lost the other ranks ({first}): another rank died "
        "or hung, see its log; the last checkpoint is intact: fix the cause and resume with --resume auto"
    )
