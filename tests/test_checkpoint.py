"""Checkpoints: round trip, clear errors for damaged files, and atomic replacement."""
import os

import pytest
import torch

import singa_dist as sd


def _state():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7, "name": "digits"}


def test_round_trip(tmp_path):
    state = _state()
    path = tmp_path / "ckpt.pt"
    sd.save_checkpoint(path, state)
    loaded = sd.load_checkpoint(path)
    assert loaded["epoch"] == 7 and loaded["name"] == "digits"
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    buf = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], buf)
    # No temporary file is left beside the checkpoint.
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    sd.save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(sd.CheckpointError, match=r"ckpt\.pt is truncated or corrupt"):
        sd.load_checkpoint(path)
    path.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(sd.CheckpointError, match=r"ckpt\.pt is corrupt"):
        sd.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        sd.load_checkpoint(tmp_path / "missing.pt")


class _Unsafe:
    pass


def test_weights_only_refuses_objects(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"obj": _Unsafe()}, path)
    with pytest.raises(sd.CheckpointError, match=r"unsafe\.pt holds objects that weights_only loading refuses"):
        sd.load_checkpoint(path)


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("disk full while writing")


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    sd.save_checkpoint(path, {"step": 1, "w": torch.arange(4.0)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        sd.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000), "bad": _FailsToPickle()})
    assert path.read_bytes() == before
    assert sd.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def test_every_damaged_file_is_a_checkpoint_error(tmp_path):
    """Thousands of random, truncated and bit-flipped files: each raises CheckpointError, or loads exactly what
    was saved (a flip in bytes nothing reads). A flip in a saved checkpoint's tensors is caught by the records'
    checksums, never loaded as other values."""
    import io
    import random
    import warnings

    state = _state()
    good = tmp_path / "good.pt"
    sd.save_checkpoint(good, state)
    data = good.read_bytes()
    legacy = io.BytesIO()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    rng = random.Random(0)
    cases = [b"", b"\0", b"PK"] + [rng.randbytes(rng.randint(1, 3000)) for _ in range(400)]
    cases += [legacy.getvalue()[:rng.randrange(len(legacy.getvalue()))] for _ in range(300)]
    cases += [data[:rng.randrange(len(data))] for _ in range(600)]
    for _ in range(1200):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(flipped))
            flipped[i] ^= 1 << rng.randrange(8)
        cases.append(bytes(flipped))
    path = tmp_path / "damaged.pt"
    loaded = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the odd pickle protocols random bytes claim
        for case in cases:
            path.write_bytes(case)
            try:
                result = sd.load_checkpoint(path)
            except sd.CheckpointError as exc:
                assert "damaged.pt" in str(exc)
                continue
            assert _same(result, state), "a damaged checkpoint loaded other values"
            loaded += 1
    assert len(cases) > 2500 and loaded < len(cases) // 10


def test_unreadable_files_and_folders(tmp_path):
    with pytest.raises(sd.CheckpointError, match=r"empty\.pt is empty"):
        (tmp_path / "empty.pt").write_bytes(b"")
        sd.load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(sd.CheckpointError, match="is a directory"):
        sd.load_checkpoint(tmp_path / "folder.pt")


def test_a_killed_save_leaves_no_temporary_file_for_long(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "ckpt.pt"
    sd.save_checkpoint(path, {"step": 1})
    # A writer killed part-way: its temporary file, named after its (now gone) process.
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ckpt.pt.{proc.stdout.strip()}.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / f".ckpt.pt.{os.getpid()}.live0000.tmp"  # a save in progress in a live process stays
    mine.write_bytes(b"being written")
    assert sd.load_checkpoint(path)["step"] == 1
    assert not stale.exists() and mine.exists()
    stale.write_bytes(b"half a checkpoint")
    sd.save_checkpoint(path, {"step": 2})
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", mine.name])
