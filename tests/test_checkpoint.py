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
