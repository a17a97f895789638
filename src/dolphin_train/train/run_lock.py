"""One run per output directory. Two runs started into the same `output_dir` (two launchers that did not join
one process group) would both train and overwrite each other's checkpoints and final model; the second is
refused, naming the first's host and process id.

The lock is the file `output_dir/.dolphin-train.lock`: JSON with the holder's host, process id, start time
and a random token. It is made complete under a unique name first and then hard-linked into place: link(2)
fails when the name exists, atomically on local disks and on NFS (the method open(2)'s manual gives for
NFS; O_EXCL is the fallback where hard links are refused). flock/fcntl locks are not used: over NFS they
depend on the lock daemon, and some cluster filesystems refuse them.

Only the main process of a run (global rank 0, or the only process) takes it, so the ranks of one run
(torchrun, accelerate, DeepSpeed, Ray workers) never refuse each other: they start from one launch and
share rank 0's lock. A run stopped normally, by an error, Ctrl-C or SIGTERM removes it; one killed
outright (SIGKILL, a lost node) leaves it behind, and the next run takes it over with a warning when:
- it was held on this host, and its process is no longer running (or has this process's id: a restarted
  container, whose processes reuse the same small ids);
- it was held on another host, whose processes cannot be checked from here, and has not been refreshed
  for STALE_AFTER_S: the holder refreshes the file's modification time every HEARTBEAT_S, so a lock ten
  heartbeats old belongs to a run that stopped (ten minutes also leaves room for clocks minutes apart).
  A job requeued onto another node thus starts on its own, at most ten minutes after the first stopped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from dolphin_train.errors import DolphinError, EnvironmentProblem
from dolphin_train.process_group import is_main_process, process_alive

log = logging.getLogger(__name__)

LOCK_NAME = ".dolphin-train.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class OutputDirInUse(DolphinError):
    """Another run is training into this output_dir."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the main process of one run."""

    host: str
    pid: int
    started: str  # UTC, as people read it
    token: str  # tells this run's lock from any other (process ids are reused)

    @classmethod
    def this_process(cls) -> Holder:
        started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return cls(socket.gethostname(), os.getpid(), started, secrets.token_hex(8))

    def described(self) -> str:
        return f"host {self.host}, process {self.pid}, started {self.started}"


def _read(path: Path) -> tuple[Holder | None, float] | None:
    """The lock's holder (None when the file is not a lock this code wrote) and the seconds since it was last
    refreshed; None when there is no lock."""
    try:
        text, age = path.read_text(encoding="utf-8"), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return None, 0.0
    try:
        fields = json.loads(text)
        return Holder(str(fields["host"]), int(fields["pid"]), str(fields["started"]), str(fields["token"])), age
    except (ValueError, TypeError, KeyError):
        return None, age


def _why_stale(holder: Holder | None, age: float) -> str | None:
    """Why the lock belongs to no running run (then it is taken over), or None: it is held."""
    if holder is None:
        return "the lock file is not one dolphin-train wrote"
    if holder.host == socket.gethostname():
        if holder.pid == os.getpid():
            return f"it was left by an earlier run with this process id ({holder.described()})"
        if not process_alive(holder.pid):
            return f"its run is no longer running ({holder.described()})"
        return None
    if age > STALE_AFTER_S:
        return f"its run has not refreshed it for {age / 60:.0f} minutes ({holder.described()})"
    return None


def _refusal(output_dir: Path, lock: Path, holder: Holder, age: float) -> OutputDirInUse:
    if holder.host == socket.gethostname():
        advice = "wait for it to finish, stop it, or train into another output_dir"
    else:
        advice = (f"wait for it to finish, or train into another output_dir. If that run has stopped, the lock is "
                  f"taken over {STALE_AFTER_S / 60:.0f} minutes after its last refresh ({age:.0f} s ago), or "
                  f"delete {lock}")  # fmt: skip
    return OutputDirInUse(f"output_dir {output_dir} is in use by another training run ({holder.described()}): "
                          f"{advice}")  # fmt: skip


def _link_into_place(made: Path, lock: Path) -> bool:
    """True when `made` (complete) became `lock`; False when a lock is there already."""
    try:
        os.link(made, lock)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):  # no hard links here
            return _create_exclusively(lock, made.read_bytes())
        with contextlib.suppress(OSError):
            if os.stat(made).st_nlink == 2:  # NFS: the link was made and its reply lost
                return True
        raise


def _create_exclusively(lock: Path, content: bytes) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return True


def _remove_if_still(lock: Path, stale: Holder | None) -> None:
    """Remove the stale lock, unless another run replaced it since it was read: it is moved aside first (an
    atomic rename that only one run can make), then checked, and put back if it is no longer the stale one."""
    aside = lock.with_name(f"{LOCK_NAME}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:  # another run removed it first
        return
    found = _read(aside)
    if found is not None and found[0] != stale:
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


class RunLock:
    """The lock this run holds, refreshed in the background until released."""

    def __init__(self, lock: Path, holder: Holder) -> None:
        self.path, self.holder = lock, holder
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._refresh, name="output_dir lock", daemon=True)
        self._heartbeat.start()

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        self._heartbeat.join()
        found = _read(self.path)
        if found is not None and found[0] == self.holder:  # never another run's
            self.path.unlink(missing_ok=True)


def take_output_dir(output_dir: str | Path) -> RunLock:
    """The lock of `output_dir` for this run, or OutputDirInUse naming the run that holds it."""
    output_dir = Path(output_dir)
    lock, me = output_dir / LOCK_NAME, Holder.this_process()
    made = output_dir / f"{LOCK_NAME}.{me.token}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        made.write_text(json.dumps(asdict(me)), encoding="utf-8")
        for _ in range(5):  # a lock removed or replaced between two looks: look again
            if _link_into_place(made, lock):
                return RunLock(lock, me)
            found = _read(lock)
            if found is None:
                continue
            holder, age = found
            stale = _why_stale(holder, age)
            if stale is None and holder is not None:
                raise _refusal(output_dir, lock, holder, age)
            log.warning("Taking over the lock of output_dir %s: %s", output_dir, stale)
            _remove_if_still(lock, holder)
    except OSError as exc:
        raise EnvironmentProblem(f"output_dir {output_dir}: cannot write there ({exc.strerror or exc})") from None
    finally:
        made.unlink(missing_ok=True)
    raise OutputDirInUse(f"output_dir {output_dir}: other runs keep taking its lock ({lock}); start one at a time")


def running_into(output_dir: str | Path) -> Holder | None:
    """The run training into `output_dir` now, if any (a stale lock is no run)."""
    found = _read(Path(output_dir) / LOCK_NAME)
    if found is None or found[0] is None or _why_stale(*found) is not None:
        return None
    return found[0]


@contextlib.contextmanager
def holding_output_dir(output_dir: str | Path) -> Iterator[None]:
    """For the length of a run: its main process holds the lock; the other ranks of the run do nothing."""
    if not is_main_process():
        yield
        return
    lock = take_output_dir(output_dir)
    try:
        yield
    finally:
        lock.release()
