"""File helpers shared by every stage: atomic writes, folder swaps, output-path checks, checksums.

Every write goes through a temp name beside its target (`.NAME.PID[.XXXXXXXX].tmp`, PID the
writer's process id) and is renamed over the target only when complete, so a crash, a kill or a
full disk leaves the previous target whole; a replaced folder waits as `.NAME.PID.XXXXXXXX.old`
until it is removed. The next write of the same target removes what a killed writer left under
those names (`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from shipkit.errors import InputError, IntegrityError

HASH_CHUNK_BYTES = 8 << 20
TEMP_SUFFIX = ".tmp"  # a file or folder being written
RETIRED_SUFFIX = ".old"  # a replaced folder between the swap and its removal
# What follows `.NAME` in our temp names: the writer's pid, mkstemp's random part, the kind.
TEMP_NAME_TAIL = r"\.(\d+)(?:\.[a-z0-9_]+)?\.(?:tmp|old)"
# errnos of a full disk or an exhausted quota: reported as one line, not as an OSError
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600 and mkdtemp folders 0700; a finished one gets the mode open() or
# mkdir() would have given it.
NEW_FILE_MODE = 0o666 & ~_current_umask()
NEW_FOLDER_MODE = 0o777 & ~_current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, size: int | None = None
                 ) -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on clean exit fsync it and rename it over `path`.

    A crash or exception leaves any previous `path` intact and no partial file under its name.
    `size` (the bytes about to be written, where the caller knows them) goes into the one-line
    IntegrityError a full disk gives. Raises InputError when `path` is a folder or lies under a
    file.
    """
    path = Path(path)
    check_file_target(path)
    with reporting_full_disk(path.parent, path.name, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            os.fchmod(fd, NEW_FILE_MODE)
            with os.fdopen(fd, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def replaced_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on clean exit swap it in for `target`.

    The swap renames the old `target` aside (`.NAME.PID.XXXXXXXX.old`), renames the staging
    folder to `target` and then removes the old one. Only between those two renames (two
    syscalls) is there no `target`: a crash there leaves both complete folders under their temp
    names, and the next write of `target` first renames the `.old` one back. An error or a kill
    before the swap leaves `target` as it was. A `target` that is a symbolic link is swapped
    where it points, so the link keeps working.
    """
    target = Path(target)
    check_folder_target(target)
    if target.is_symlink():
        target = target.resolve()
    with reporting_full_disk(target.parent, f"{target.name}/"):
        target.parent.mkdir(parents=True, exist_ok=True)
        _restore_retired(target)
        remove_stale_temps(target)
        staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent))
        try:
            os.chmod(staging, NEW_FOLDER_MODE)
            yield staging
            _fsync_dir(staging)
            _swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _swap_in(staging: Path, target: Path) -> None:
    retired = staging.with_name(staging.name.removesuffix(TEMP_SUFFIX) + RETIRED_SUFFIX)
    had_old = os.path.lexists(target)
    if had_old:
        os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        if had_old:
            os.rename(retired, target)
        raise
    _fsync_dir(target.parent)
    if had_old:
        shutil.rmtree(retired)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def temp_path(target: Path) -> Path:
    """`.NAME.PID.tmp` beside `target`: the temp name of a writer that opens its own file
    (the GGUF writer); one per process and target."""
    return target.with_name(f".{target.name}.{os.getpid()}{TEMP_SUFFIX}")


def remove_stale_temps(target: Path) -> None:
    """Remove what killed writers of `target` left beside it.

    Only names of our own pattern for this target (`.NAME.PID[.XXXXXXXX].tmp`,
    `.NAME.PID.XXXXXXXX.old`) whose PID is no running process on this machine are touched: a live
    writer's temp file, other targets' temp files and every other file are left alone.
    """
    for path in _stale_temps(target):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _stale_temps(target: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(target.name)}{TEMP_NAME_TAIL}")
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    matches = (pattern.fullmatch(name) for name in sorted(names))
    return [target.parent / match[0] for match in matches if match and not _process_alive(int(match[1]))]


def _restore_retired(target: Path) -> None:
    """A crash between the swap's two renames left no `target`, only its complete old version
    under `.NAME.PID.XXXXXXXX.old`: put it back before anything is cleaned or written."""
    if os.path.lexists(target):
        return
    retired = [path for path in _stale_temps(target) if path.name.endswith(RETIRED_SUFFIX)]
    if retired:
        os.rename(retired[0], target)


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of our temp names (of any target)."""
    return re.fullmatch(rf"\..+{TEMP_NAME_TAIL}", name) is not None


def _process_alive(pid: int) -> bool:
    """Whether a process with this pid runs here (then its temp files may be in use)."""
    if pid == os.getpid():
        return True  # this process: another of its writes may be in progress
    if pid < 1:
        return False  # no writer has that pid (and kill(0) would signal our own group)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:
        return True  # it exists but is not ours to signal
    return True


def check_file_target(path: Path, field: str | None = None) -> None:
    """Refuse (InputError) a file to write that is an existing folder or lies under a file; the
    message begins with `field` (the parameter, or the command line's flag, that gave `path`)."""
    label = f"{field} {path}" if field else str(path)
    if path.is_dir():
        raise InputError(f"{label}: is a folder; give a file path")
    _check_parents(path, label)


def check_folder_target(path: Path, field: str | None = None) -> None:
    """Refuse (InputError) a folder to write that is an existing file or lies under a file; the
    message begins with `field` as in `check_file_target`."""
    label = f"{field} {path}" if field else str(path)
    if os.path.lexists(path) and not path.is_dir():
        raise InputError(f"{label}: is a file; give a folder")
    _check_parents(path, label)


def _check_parents(path: Path, label: str) -> None:
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise InputError(f"{label}: {parent} is not a folder")
            return


@contextlib.contextmanager
def reporting_full_disk(directory: Path, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk or quota (ENOSPC, EDQUOT) raised inside into one IntegrityError line:
    `no space left on DIR: needed N bytes for WHAT` (or `writing WHAT` when N is unknown)."""
    try:
        yield
    except OSError as error:
        if error.errno not in NO_SPACE_ERRNOS:
            raise
        wanted = f"needed {needed:,} bytes for {what}" if needed is not None else f"writing {what}"
        raise IntegrityError(f"no space left on {directory}: {wanted} ({error.strerror}); "
                             "free some space or write elsewhere") from error


def fsync_file(path: Path) -> None:
    """Flush a file written by another library's handle to the disk (before it is renamed in)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Atomically write `data` as indented, key-sorted JSON with a trailing newline."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    encoded = text.encode("utf-8")
    with atomic_write(path, "wb", size=len(encoded)) as handle:
        handle.write(encoded)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_format_json(path: Path, expected_format: str, what: str, missing_hint: str) -> dict[str, Any]:
    """Read a JSON file whose `format` field must equal `expected_format`.

    Raises InputError (naming `missing_hint`) when it is missing, IntegrityError when it is
    unreadable or of another format."""
    if path.exists() and not path.is_file():  # a FIFO or device would block the read
        raise IntegrityError(f"{path}: not a regular file, so not a {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InputError(f"{path}: {missing_hint}") from error
    except (OSError, ValueError) as error:
        raise IntegrityError(f"{path}: unreadable {what}: {error}") from error
    except RecursionError:
        raise IntegrityError(f"{path}: unreadable {what}: JSON nested too deep") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else None
        raise IntegrityError(f"{path}: format {found!r}, expected {expected_format!r}")
    return data


def manifest_field(data: dict, dotted: str, kind: type, path: Path, fix: str, *, minimum: int | None = None) -> Any:
    """The field at `dotted` ("splits.train.shards.0.file") of a manifest, which must be a `kind`
    (a bool is no int) of at least `minimum`: IntegrityError naming the file, the field and `fix`."""
    value: Any = data
    for part in dotted.split("."):
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, TypeError, ValueError):
            raise IntegrityError(f"{path}: field {dotted} is missing; {fix}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise IntegrityError(f"{path}: field {dotted} is a {type(value).__name__}, expected {kind.__name__}; {fix}")
    if minimum is not None and value < minimum:
        raise IntegrityError(f"{path}: field {dotted} is {value}, expected at least {minimum}; {fix}")
    return value


def confined_name(name: str, where: str) -> str:
    """`name` if it is a plain file name, so the path a manifest lists stays inside its folder."""
    if name in ("", ".", "..") or any(character in name for character in "/\\\0"):
        raise IntegrityError(f"{where}: {name!r} is not a file name inside the folder "
                             "(no '..', separator or absolute path)")
    return name


def make_out_dir(out_dir: Path, field: str = "out_dir") -> None:
    """Create the `out_dir` folder, or say in one line, beginning with `field`, why it cannot be
    one (a file, a path under a file, no permission)."""
    check_folder_target(out_dir, field)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{field} {out_dir}: cannot create the folder ({error.strerror})") from None


def write_gguf_atomically(writer: Any, path: Path, write_body: Callable[[], None], what: str,
                          needed: int | None = None) -> None:
    """Write a gguf-py `GGUFWriter` through `.NAME.PID.tmp` beside `path`: its header, then
    `write_body()` (the KV data, tensor info and tensors, in the writer's order), then fsync and
    rename over `path`. A failed or killed write leaves any previous `path` whole, and the next
    write of `path` removes a killed writer's temp file; a full disk is one IntegrityError line
    naming `what`."""
    temporary = temp_path(path)
    with reporting_full_disk(path.parent, what, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        try:
            writer.write_header_to_file(path=temporary)
            write_body()
            writer.close()
            fsync_file(temporary)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                writer.close()
            temporary.unlink(missing_ok=True)
            raise
