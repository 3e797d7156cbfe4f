"""One job per run directory, and no rank outliving its launcher.

A run directory is written by one job at a time: rank 0 holds `<run.dir>/.lock` for the life of the
job (an flock on the open file, which the kernel drops when the process dies, so a lock left by a
crashed or killed job is stale by construction and simply taken over) with the holder's host, pid and
start time in it. A second job on the same directory is refused with one line naming the holder.
Where the file system has no flock (some network mounts), the file is created exclusively instead
and a holder on this host that no longer runs is detected as stale.

torchrun starts every rank in a session of its own, so killing the launcher with SIGKILL leaves its
ranks running and writing into the run directory. `die_with_launcher()` asks Linux to send the rank
SIGTERM when its parent dies: the rank then stops like a preempted one (checkpoint, exit 75).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import time

from blade.errors import ConfigError

LOCK = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # file systems without flock
_held: dict[str, int] = {}  # real path of a run directory -> the fd this process locks it with
_excl: set[str] = set()     # ... of those, the ones held by an exclusively created .lock.excl


def acquire(run_dir: str) -> None:
    """Take the run directory's lock for this process (again: a no-op). ConfigError if another
    live job holds it."""
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"run.dir {run_dir} is in use by {_holder(path)}: stop that job first, or "
                              "use another run.dir") from None
        if e.errno not in _NO_FLOCK:
            raise
        fd = _acquire_without_flock(path, run_dir)
        _excl.add(key)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
    _held[key] = fd


def release(run_dir: str) -> None:
    key = os.path.realpath(run_dir)
    fd = _held.pop(key, None)
    if fd is not None:
        os.close(fd)  # drops the flock; the file stays (its content is history, not a lock)
    if key in _excl:
        _excl.discard(key)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(key, LOCK + ".excl"))


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release(key)


def _acquire_without_flock(path: str, run_dir: str) -> int:
    """O_EXCL creation; a file left by a process of this host that no longer runs is stale."""
    try:
        return os.open(path + ".excl", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        held = _read(path + ".excl")
        if held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
            os.remove(path + ".excl")
            return os.open(path + ".excl", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        raise ConfigError(f"run.dir {run_dir} is in use by {_holder(path + '.excl')}: stop that job first, "
                          f"or use another run.dir (a stale lock: delete {path}.excl)") from None


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _holder(path: str) -> str:
    held = _read(path)
    if not held:
        return "another job"
    return f"pid {held.get('pid')} on {held.get('host')} (since {held.get('started')})"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError) as e:
        return isinstance(e, PermissionError)
    return True


def die_with_launcher() -> None:
    """Under torchrun, get SIGTERM when the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not os.path.exists("/proc/self"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
