"""The lock a training run holds while it writes RUN_DIR, and the atomic copy it writes with.
The files' names: `shipkit.layout.RunDir`; layout: docs/training.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from shipkit.errors import InputError
from shipkit.fsutil import atomic_write
from shipkit.layout import RunDir


def copy_atomic(source: Path, destination: Path) -> None:
    """Copy `source` so that `destination` is never seen half written."""
    with open(source, "rb") as reader, atomic_write(destination, "wb") as writer:
        shutil.copyfileobj(reader, writer, 16 << 20)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR's writer lock (creating RUN_DIR if need be): an exclusive flock on
    RUN_DIR/.train.lock holding our pid. The kernel drops it when the process ends however it
    ends, kill -9 included, so no stale lock is left; the file itself stays (removing it would
    let two writers lock two different files). Raises InputError at once if another process
    holds it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(RunDir(run_dir).lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise InputError(f"{run_dir}: cannot create the run folder's lock ({error.strerror})") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise InputError(f"{run_dir} is being written by another shipkit train (pid {holder}); "
                             "wait for it to end or choose another run folder") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)


def writer_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """`run_dir_lock` in the process that writes RUN_DIR (rank 0 under torchrun); the other
    ranks write nothing there and take no lock."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return run_dir_lock(run_dir)
