"""One job owns a run directory: a lock file that works on a cluster file system.

``RUN_DIR/.distq-lock`` holds who owns the directory (host, pid, SLURM job, start time). It is
created by writing a private file and hard-linking it to the lock's name: ``link(2)`` is
atomic on local disks, NFS (the classic NFS-safe lock, unlike ``O_EXCL`` on old clients and
unlike ``flock``, which NFS and Lustre implement differently or not at all) and Lustre. The
owner refreshes the file's modification time while it runs; a lock is abandoned when its
holder's process is gone (same host), when it belongs to an earlier run of the same SLURM job
(a requeue), or when nobody refreshed it for ``run.lock_stale_s``. Taking over an abandoned
lock renames it away first, so of two jobs that find the same dead lock only one gets it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from distq.errors import DistqError

LOCK = ".distq-lock"


class RunDirBusy(DistqError):
    """Another job owns the run directory."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    token: str
    pid_start: str = ""
    """The process's start time (``/proc/PID/stat``), so a reused pid is not taken for the holder."""
    slurm_job: str = ""
    slurm_restart: str = ""

    @classmethod
    def me(cls) -> Holder:
        env = os.environ
        job = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            token=uuid.uuid4().hex,
            pid_start=_process_start(os.getpid()),
            slurm_job=job or env.get("SLURM_JOB_ID", ""),
            slurm_restart=env.get("SLURM_RESTART_COUNT", "0") if env.get("SLURM_JOB_ID") else "",
        )

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host}{job}, started {self.started}"


def _process_start(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(holder: Holder) -> bool:
    """Whether the holder's process still runs (asked on the holder's own host only)."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return not holder.pid_start or _process_start(holder.pid) in ("", holder.pid_start)


class RunLock:
    """``acquire()`` takes the run directory or raises RunDirBusy naming the holder; ``release()``
    gives it back. A thread refreshes the lock every ``stale_s / 10`` seconds while held."""

    def __init__(self, run_dir: str | Path, stale_s: float):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.stale_s = stale_s
        self.me = Holder.me()
        self.notes: list[str] = []
        """One line per lock taken over, for the caller to say."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_to: Holder | None = None

    # --- taking and giving back --------------------------------------------------------------

    def acquire(self) -> None:
        for _ in range(10):  # each pass either takes the lock, refuses, or clears an abandoned one
            if self._link():
                self._start_refreshing()
                return
            holder, age = self._read()
            if holder is not None and holder.token == self.me.token:
                self._start_refreshing()  # NFS: link() reported an error but did create it
                return
            why = self._abandoned(holder, age)
            if why is None:
                who = holder.describe() if holder else "a job whose lock file cannot be read"
                raise RunDirBusy(
                    f"run.dir {self.run_dir} is in use by {who} (lock {self.path}, refreshed {age:.0f} s ago): "
                    f"wait for that job to end or use another run.dir; a lock nobody refreshes for run.lock_stale_s={self.stale_s:g} s "
                    "is taken over"
                )
            if self._clear(holder):
                who = holder.describe() if holder else "an unreadable lock"
                self.notes.append(f"run.dir {self.run_dir}: took over the lock of {who}: {why}")
        raise RunDirBusy(f"run.dir {self.run_dir}: could not take the lock {self.path} (other jobs keep taking it): try again")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder, _ = self._read()
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise if another job took the lock over while this one was paused (it looked abandoned)."""
        if self.lost_to is not None:
            raise RunDirBusy(
                f"run.dir {self.run_dir} was taken over by {self.lost_to.describe()} while this job did not refresh its lock "
                f"(paused for more than run.lock_stale_s={self.stale_s:g} s?): stopping without writing"
            )

    # --- the file ----------------------------------------------------------------------------

    def _link(self) -> bool:
        own = self.run_dir / f"{LOCK}.{self.me.token}"
        text = json.dumps(asdict(self.me), indent=1) + "\n"
        with open(own, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(own, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: O_EXCL, atomic on local disks and NFSv3+
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        finally:
            own.unlink(missing_ok=True)

    def _read(self) -> tuple[Holder | None, float]:
        """The lock's holder (None if the file is unreadable) and seconds since its last refresh."""
        try:
            age = time.time() - self.path.stat().st_mtime
            return Holder(**json.loads(self.path.read_text())), max(age, 0.0)
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError, TypeError):
            try:
                return None, max(time.time() - self.path.stat().st_mtime, 0.0)
            except OSError:
                return None, 0.0

    def _abandoned(self, holder: Holder | None, age: float) -> str | None:
        """Why the lock may be taken over, or None if its holder may still be working."""
        if not self.path.exists():
            return "it is gone"
        if holder is not None:
            if holder.host == self.me.host and holder.pid == self.me.pid:
                return "it is this process's own (an earlier trainer in it)"
            if holder.slurm_job and holder.slurm_job == self.me.slurm_job and holder.slurm_restart != self.me.slurm_restart:
                return f"it is this SLURM job's own, from before its requeue (restart {holder.slurm_restart or 0})"
            if holder.host == self.me.host and not _alive(holder):
                return f"its process {holder.pid} is gone"
        if age > self.stale_s:
            return f"not refreshed for {age:.0f} s (run.lock_stale_s={self.stale_s:g})"
        return None

    def _clear(self, holder: Holder | None) -> bool:
        """Move the abandoned lock away; False if another job moved or replaced it first."""
        grave = self.run_dir / f"{LOCK}.abandoned-{self.me.token}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False
        try:
            moved = Holder(**json.loads(grave.read_text()))
        except (OSError, ValueError, TypeError):
            moved = None
        if holder is not None and (moved is None or moved.token != holder.token):
            # Someone replaced the dead lock with a live one between our read and the rename: put it back.
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        return True

    # --- refreshing --------------------------------------------------------------------------

    def _start_refreshing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh, name="distq-run-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        interval = max(self.stale_s / 10, 0.05)
        while not self._stop.wait(interval):
            holder, _ = self._read()
            if holder is not None and holder.token != self.me.token:
                self.lost_to = holder
                return
            try:
                os.utime(self.path)
            except OSError:
                pass
