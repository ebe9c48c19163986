"""Files that survive crashes and second writers: durable writes, atomic folders, checksums, the run lock.

- Every file is fsynced after it is written and every folder after a rename into it, so a power cut cannot
  leave a renamed but empty checkpoint; files follow the umask (safetensors alone would write 0600).
- A folder is built under a temporary name and renamed into place (:func:`atomic_directory`).
- A checksum manifest (sha256 of every file) is written last inside such a folder and checked on load.
- A run folder is written by one process at a time (:class:`RunFolderLock`, ``fcntl.flock`` on a lock
  file: the operating system releases it when the process dies, however it dies).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

MANIFEST_FILE = "checksums.json"
LOCK_FILE = ".lock"


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock."""


# durable single files


def _umask() -> int:
    try:  # Linux >= 4.7 shows the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_file(path: Path) -> None:
    """After a library wrote ``path``: permissions from the umask (as ``open`` gives), then fsync."""
    os.chmod(path, 0o666 & ~_umask())
    fsync_file(path)


def write_text(path: Path, text: str) -> None:
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def replace_file(path: Path, text: str) -> None:
    """Rewrite a file atomically: the new text goes to a sibling, which is fsynced and renamed over it.

    A failed write (a full disk) removes the sibling and raises an OSError that names ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_text(tmp, text)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"could not rewrite {path}: {error.strerror}") from None
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line to a text file; a failed write (a full disk) raises an OSError that names ``path``."""
    try:
        with path.open("a") as handle:
            handle.write(line + "\n")
    except OSError as error:
        raise OSError(error.errno, f"could not append to {path}: {error.strerror}") from None


# checksums


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, names: Iterable[str] | None = None) -> None:
    """Record the sha256 of every file in ``folder``, or of the files ``names`` (written last, once the files are
    complete)."""
    paths = sorted(folder.iterdir()) if names is None else [folder / name for name in sorted(names)]
    sums = {p.name: sha256_of(p) for p in paths if p.is_file() and p.name != MANIFEST_FILE}
    write_text(folder / MANIFEST_FILE, json.dumps({"sha256": sums}, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict[str, str] | None:
    """The recorded checksums of ``folder``'s files; None for a folder written before checksums existed."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())["sha256"]
        if isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values()):
            return sums
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        pass
    return {}  # a damaged manifest vouches for nothing: every file then fails its check


# atomic folders


def atomic_directory(final: Path, fill: Callable[[Path], Any], *, manifest: bool = False) -> None:
    """Build a folder with ``fill(tmp)`` next to ``final``, then move it into place in one rename.

    With ``manifest``, a checksum of every file is recorded inside the folder before the rename.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if manifest:
            write_manifest(tmp)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)  # re-saving a step: the new folder replaces it, never a half-written one
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def discard_directory(folder: Path) -> None:
    """Delete a folder by first renaming it out of sight (``.tmp-discarded-NAME-PID``), so that a reader sees
    it whole or not at all: a file missing from a folder that is still there is damage, never a deletion in
    progress. A kill before the deletion ends leaves a ``.tmp-`` folder, cleared at the next start."""
    hidden = folder.parent / f".tmp-discarded-{folder.name}-{os.getpid()}"
    try:
        folder.rename(hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def remove_leftovers(folder: Path) -> list[str]:
    """Clear what a killed writer left in ``folder`` (call it holding the folder's lock); returns the names.

    ``.tmp-NAME-PID`` folders are unfinished writes. ``.old-NAME-PID`` is the previous ``NAME`` when the
    writer died between its two renames: put back when ``NAME`` is missing, else removed.
    """
    cleared = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".old-") and path.is_dir():
            original = folder / name[len(".old-"):].rsplit("-", 1)[0]
            if not original.exists():
                path.rename(original)
                cleared.append(f"{name} (restored as {original.name})")
                continue
        elif not (name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp"))):
            continue  # not a left-over: checkpoints, metrics, the lock file
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:  # a file, or a link (removed itself, never what it points to)
            path.unlink(missing_ok=True)
        if os.path.lexists(path):
            warnings.warn(f"{path}: left over from an interrupted run, and could not be removed", stacklevel=2)
            continue
        cleared.append(name)
    if cleared:
        fsync_dir(folder)
    return cleared


# the run folder: created if needed, and written by one process at a time


def prepare_folder(path: Path, what: str = "out_dir") -> Path:
    """Create ``path`` (and parents), or raise a ValueError that says why it cannot hold a run."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{what} {path} is a file, not a folder") from None
    except NotADirectoryError:
        raise ValueError(f"{what} {path} lies under a file, not a folder") from None
    except OSError as error:
        raise ValueError(f"{what} {path} cannot be created: {error.strerror}") from None
    if not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} is not writable")
    return path


class RunFolderLock:
    """An exclusive ``flock`` on ``folder/.lock`` holding the owner's PID. Use :func:`lock_run_folder`."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise ValueError(f"cannot create the lock file {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderBusy(
                    f"{folder} is in use by another training process (PID {holder}); wait for it to end, "
                    "or choose another out_dir"
                ) from None
            raise ValueError(f"cannot lock {self.path}: {error.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        # closing the descriptor releases the lock: on release(), on garbage collection, or at process death
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        self._finalizer()


# one lock per folder and process: Trainers of one process share it (the lock keeps out other processes)
_HELD: "weakref.WeakValueDictionary[str, RunFolderLock]" = weakref.WeakValueDictionary()


def lock_run_folder(folder: Path) -> RunFolderLock:
    """This process's lock on ``folder`` (taken now, or shared with an earlier holder in this process).

    The lock is released when no holder references it any more, or when the process ends.
    """
    key = os.path.realpath(folder)
    lock = _HELD.get(key)
    if lock is None:
        lock = RunFolderLock(folder)
        _HELD[key] = lock
    return lock
