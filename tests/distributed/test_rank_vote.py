"""RankVote: every rank stops at the same step when any one rank is signalled, one step after."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from distq.distributed.env import DistEnv
from distq.distributed.vote import RankVote

CALLS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _votes(rank: int, world: int, port: int, raised_at: dict, out: str) -> None:
    """Rank ``r`` raises its flag from call ``raised_at[r]`` on; record every call's answer."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        vote = RankVote(DistEnv(rank=rank, world=world, local_rank=rank), timeout_s=60)
        answers = []
        for call in range(CALLS):
            answer = vote(call >= raised_at.get(str(rank), CALLS))
            answers.append(answer)
            if answer:
                break
        answers.append(vote.outcome())  # nothing in flight after a yes: False
        Path(out, f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, raised_at: dict) -> list[list[bool]]:
    mp.spawn(_votes, args=(2, _free_port(), raised_at, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_one_signalled_rank_stops_both_at_the_next_call(tmp_path):
    rank0, rank1 = _run(tmp_path, {"1": 3})
    assert rank0 == rank1 == [False, False, False, False, True, False]


def test_no_signal_never_stops_and_the_last_vote_drains(tmp_path):
    rank0, rank1 = _run(tmp_path, {})
    assert rank0 == rank1 == [False] * CALLS + [False]


def test_one_process_answers_at_once():
    vote = RankVote(DistEnv(rank=0, world=1, local_rank=0), timeout_s=60)
    assert [vote(False), vote(True)] == [False, True] and vote.outcome() is False


def _silent_peer(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 builds its vote and never votes (a frozen rank); rank 0 must not wait forever."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dist.barrier()  # both ranks build the vote group together, well within its short timeout
    vote = RankVote(DistEnv(rank=rank, world=world, local_rank=rank), timeout_s=4)
    if rank == 1:
        time.sleep(16)  # then it exits, which would end rank 0's wait too (after ~16 s)
        return
    start = time.monotonic()
    try:
        vote(False)
        vote(False)  # waits for the first vote, which rank 1 never joins
        error = None
    except RuntimeError as exc:
        error = type(exc).__name__
    Path(out, "rank0.json").write_text(json.dumps({"error": error, "seconds": time.monotonic() - start}))
    # Leave without tearing down a process group whose peer never answered: gloo may abort
    # (SIGABRT) in its destructor then, which is not what this test is about.
    os._exit(0)


def test_a_silent_peer_fails_the_vote_after_the_timeout(tmp_path):
    mp.spawn(_silent_peer, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] is not None and 3.5 <= result["seconds"] < 12, result
