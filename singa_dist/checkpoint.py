"""Checkpoints that survive a crash: a job restarted by `singa-launch --max-restarts` resumes from the last one.

`save_checkpoint` writes to a temporary file beside the target, flushes it to disk and renames it over the
target, so a reader sees the old checkpoint or the new one, never half of one; a write that fails leaves
the old file as it was. `load_checkpoint` loads with `weights_only=True` (tensors, numbers, strings and
containers only: nothing from the file can run code) and names the file when it cannot be read.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be loaded (truncated, corrupt, or holding unsafe objects)."""


def save_checkpoint(path: str | os.PathLike, state) -> None:
    """Write `state` (a dict of tensors, numbers, state_dicts, ...) to `path` atomically.

    In a distributed job, call it on one rank only (e.g. `if sd.rank() == 0`), with a path all ranks can read.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
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

    Raises FileNotFoundError when there is no file, and CheckpointError naming the file when it is
    truncated, corrupt, or holds objects that weights-only loading refuses.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path):
            # torch.save writes zip archives; anything else is damaged or not a checkpoint at all.
            raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint") from exc
        detail = next((line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line), "")
        raise CheckpointError(
            f"checkpoint {path} holds objects that weights_only loading refuses (save tensors, numbers, "
            f"strings and containers of them) {detail}".rstrip()) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {str(exc).splitlines()[0]}") from exc
