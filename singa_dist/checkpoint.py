"""Checkpoints that survive a crash: a job restarted by `singa-launch --max-restarts` resumes from the last one.

`save_checkpoint` writes to a temporary file beside the target, flushes it to disk and renames it over the
target, so a reader sees the old checkpoint or the new one, never half of one; a write that fails leaves
the old file as it was. The temporary file's name carries the writer's process id: one left behind by a
writer that was killed part-way is removed by the next save or load of that checkpoint.

`load_checkpoint` loads with `weights_only=True` (tensors, numbers, strings and containers only: nothing from
the file can run code). Every file it cannot read raises `CheckpointError` naming the file and why (empty,
truncated, corrupt, not a checkpoint, unsafe objects, unreadable); only a missing file raises
FileNotFoundError. A zip checkpoint (what torch.save writes) has its records' CRC-32 checked first, so a
flipped bit in the tensors' bytes is found rather than loaded as wrong values.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be loaded (truncated, corrupt, or holding unsafe objects)."""


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _remove_stale_temps(path: str) -> None:
    """Remove the temporary files of saves of `path` whose writer (a process of this host) is gone."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"(\d+)\.[^.]+\.tmp$")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        found = pattern.match(name)
        if found is None:
            continue
        pid = int(found.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_checkpoint(path: str | os.PathLike, state) -> None:
    """Write `state` (a dict of tensors, numbers, state_dicts, ...) to `path` atomically.

    In a distributed job, call it on one rank only (e.g. `if sd.rank() == 0`), with a path all ranks can read.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """Load a checkpoint written by `save_checkpoint` (or `torch.save`), with `weights_only=True`.

    Raises FileNotFoundError when there is no file, and CheckpointError naming the file for every other
    file that cannot be loaded.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    _remove_stale_temps(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror}") from exc
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a save that never finished writing?)")
    is_zip = _is_zip(path)
    if is_zip:
        _check_records(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if is_zip:
            detail = next((line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line), "")
            if detail:
                raise CheckpointError(
                    f"checkpoint {path} holds objects that weights_only loading refuses (save tensors, numbers, "
                    f"strings and containers of them) {detail}".rstrip()) from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint: {_first_line(exc)}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # a damaged file fails in many ways inside torch.load; every one is the file's fault
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {_first_line(exc)}") from exc


def _is_zip(path: str) -> bool:
    """Whether the file is a zip archive (torch.save's format); one whose end record is damaged counts."""
    try:
        return zipfile.is_zipfile(path)
    except Exception:
        return True


def _check_records(path: str) -> None:
    """The CRC-32 of every record of a zip checkpoint, so that corrupt bytes are an error, not wrong values."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {_first_line(exc)}") from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} does not match its checksum")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
