"""The model zoo's readers on small files written in the datasets' exact formats (headers, byte order, label
layout), their errors on wrong or truncated files, and their use with DistributedSampler and DataLoader workers."""
import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from examples import datasets as ds


def _write_idx(path, array: np.ndarray, type_code: int, gz: bool = False, cut: int = 0):
    """An IDX file as the format defines it: 0x0000, type code, dimensions, big-endian sizes, big-endian data."""
    big = array.astype(array.dtype.newbyteorder(">"))
    raw = struct.pack(">HBB", 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    raw = raw[:len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _mnist_files(root, n_train=12, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08, gz)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_mnist_idx_files_read_back(tmp_path, gz):
    written = _mnist_files(tmp_path, gz=gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        data = ds.mnist(tmp_path, train)
        images, labels = written[prefix]
        assert len(data) == len(images) and data.classes == 10
        assert data.images.shape == (len(images), 1, 28, 28) and data.images.dtype == torch.uint8
        assert torch.equal(data.images[:, 0], torch.from_numpy(images))
        assert [data[i][1] for i in range(len(data))] == labels.tolist()


@pytest.mark.parametrize("dtype,code", [(np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E),
                                        (np.int8, 0x09)])
def test_idx_multibyte_types_are_big_endian(tmp_path, dtype, code):
    array = (np.arange(2 * 3 * 5).reshape(2, 3, 5) * 37 - 100).astype(dtype)
    _write_idx(tmp_path / "a.idx", array, code)
    assert np.array_equal(ds.read_idx(tmp_path / "a.idx").numpy(), array)


def test_idx_errors_name_the_file_and_the_fault(tmp_path):
    images = np.zeros((4, 28, 28), np.uint8)
    _write_idx(tmp_path / "cut", images, 0x08, cut=10)
    with pytest.raises(ds.DatasetError, match=r"cut: truncated: the header promises shape \(4, 28, 28\) "
                                              r"\(3152 bytes\), the file holds 3142"):
        ds.read_idx(tmp_path / "cut")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ds.DatasetError, match=r"text: not an IDX file"):
        ds.read_idx(tmp_path / "text")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01x")
    with pytest.raises(ds.DatasetError, match=r"code: unknown IDX type code 0x07"):
        ds.read_idx(tmp_path / "code")
    good = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04abcd")
    (tmp_path / "bad.gz").write_bytes(good[:-6])
    with pytest.raises(ds.DatasetError, match=r"bad.gz: damaged or truncated gzip data"):
        ds.read_idx(tmp_path / "bad.gz")
    with pytest.raises(ds.DatasetError, match=r"missing: no such file"):
        ds.read_idx(tmp_path / "missing")


def test_mnist_checks_counts_labels_and_files(tmp_path):
    _mnist_files(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), 0x08)
    with pytest.raises(ds.DatasetError, match=r"train-images-idx3-ubyte holds 12 images but .*train-labels-idx1-ubyte 11"):
        ds.mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 10, np.uint8), 0x08)
    with pytest.raises(ds.DatasetError, match=r"train-labels-idx1-ubyte: label 10 is not a class 0-9"):
        ds.mnist(tmp_path)
    with pytest.raises(ds.DatasetError, match=r"none of train-images-idx3-ubyte"):
        ds.mnist(tmp_path / "nowhere")


def _cifar_records(n, label_bytes, classes, seed):
    rng = np.random.default_rng(seed)
    labels = np.stack([rng.integers(0, c, n, dtype=np.uint8) for c in classes], 1)
    pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    return np.concatenate([labels, pixels], 1), labels, pixels


def test_cifar10_binary_batches_read_back(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    written = []
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        records, labels, pixels = _cifar_records(3 + i, 1, (10,), i)
        (folder / name).write_bytes(records.tobytes())
        written.append((labels, pixels))
    train, test = ds.cifar10(tmp_path, True), ds.cifar10(tmp_path, False)
    assert len(train) == 3 + 4 + 5 + 6 + 7 and len(test) == 8 and train.classes == 10
    labels, pixels = written[-1]
    # 1,024 red values, then green, then blue, each row by row.
    r, c, h, w = 5, 2, 7, 30
    assert test.images[r, c, h, w].item() == pixels[r, c * 1024 + h * 32 + w]
    assert torch.equal(test.images.reshape(8, -1), torch.from_numpy(pixels))
    assert [test[i][1] for i in range(8)] == labels[:, 0].tolist()
    assert torch.equal(train.images[:3].reshape(3, -1), torch.from_numpy(written[0][1]))


def test_cifar100_coarse_and_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for name, seed in (("train.bin", 0), ("test.bin", 1)):
        records, labels, pixels = _cifar_records(9, 2, (20, 100), seed)
        (folder / name).write_bytes(records.tobytes())
    fine, coarse = ds.cifar100(tmp_path, False), ds.cifar100(tmp_path, False, labels="coarse")
    assert fine.classes == 100 and coarse.classes == 20
    assert fine.labels.tolist() == labels[:, 1].tolist() and coarse.labels.tolist() == labels[:, 0].tolist()
    assert torch.equal(fine.images.reshape(9, -1), torch.from_numpy(pixels))


def test_cifar_errors_name_the_file_and_the_fault(tmp_path):
    records, _, _ = _cifar_records(4, 1, (10,), 0)
    (tmp_path / "test_batch.bin").write_bytes(records.tobytes()[:-100])
    with pytest.raises(ds.DatasetError, match=r"test_batch.bin: 12192 bytes is not a whole number of 3073-byte CIFAR "
                                              r"records .* truncated"):
        ds.cifar10(tmp_path, False)
    records[2, 0] = 10
    (tmp_path / "test_batch.bin").write_bytes(records.tobytes())
    with pytest.raises(ds.DatasetError, match=r"test_batch.bin: record 2 has label 10 in byte 0, but there are only 10"):
        ds.cifar10(tmp_path, False)
    with pytest.raises(ds.DatasetError, match=r"elsewhere: no test.bin in it or in cifar-100-binary/"):
        ds.cifar100(tmp_path / "elsewhere", False)


def _image_folder(root, sizes=((40, 30), (30, 50), (64, 64))):
    from PIL import Image

    colors = {"cat": (250, 10, 10), "dog": (10, 240, 20), "emu": (5, 15, 230)}
    for name, color in colors.items():
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.new("RGB", size, color).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "notes.txt").write_text("not an image")
    return colors


def test_image_folder_decodes_resizes_and_labels_by_class(tmp_path):
    colors = _image_folder(tmp_path / "train")
    data = ds.ImageFolder(tmp_path / "train", image_size=24)
    assert data.class_names == ["cat", "dog", "emu"] and len(data) == 9 and data.classes == 3
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.uint8
        expected = torch.tensor(colors[data.class_names[y]], dtype=torch.float32)
        assert (x.float().mean((1, 2)) - expected).abs().max() < 4  # a solid colour stays (JPEG rounds a little)


def test_image_folder_errors(tmp_path):
    _image_folder(tmp_path / "train")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    data = ds.ImageFolder(tmp_path / "train", 16)
    broken = next(i for i, (p, _) in enumerate(data.samples) if p.endswith("broken.jpg"))
    with pytest.raises(ds.DatasetError, match=r"dog/broken.jpg: cannot decode the image"):
        data[broken]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ds.DatasetError, match=r"empty: no images"):
        ds.ImageFolder(tmp_path / "empty")
    with pytest.raises(ds.DatasetError, match=r"val/dog: missing"):
        (tmp_path / "val" / "cat").mkdir(parents=True)
        ds.ImageFolder(tmp_path / "val", classes=data.class_names)


def test_char_windows_of_a_text_file(tmp_path):
    text = "hello, world: a plain-text corpus for the char-RNN. " * 3
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    data = ds.CharWindows(tmp_path / "input.txt", unroll=10)
    assert data.vocab == sorted(set(text)) and len(data) == (len(text) - 1) // 10
    x, y = data[3]
    assert "".join(data.vocab[i] for i in x) == text[30:40] and "".join(data.vocab[i] for i in y) == text[31:41]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 20)
    with pytest.raises(ds.DatasetError, match=r"latin1.txt: not UTF-8 text \(byte 3"):
        ds.CharWindows(tmp_path / "latin1.txt")
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ds.DatasetError, match=r"short.txt: 3 characters, fewer than one window of 51"):
        ds.CharWindows(tmp_path / "short.txt")


def test_image_data_finds_the_format_or_stands_in(tmp_path, capsys):
    train, test = ds.image_data(None, image_size=20)
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "no --data DIR given" in line and "20x20" in line
    assert train.images.shape[1:] == (3, 20, 20) and len(train) + len(test) == 1797
    (tmp_path / "mnist").mkdir()
    _mnist_files(tmp_path / "mnist", gz=True)
    assert ds.image_data(str(tmp_path / "mnist"))[0].images.shape[1:] == (1, 28, 28)
    (tmp_path / "c10" / "cifar-10-batches-bin").mkdir(parents=True)
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        (tmp_path / "c10" / "cifar-10-batches-bin" / name).write_bytes(_cifar_records(2, 1, (10,), 0)[0].tobytes())
    assert len(ds.image_data(str(tmp_path / "c10"))[0]) == 10
    _image_folder(tmp_path / "folders" / "train")
    _image_folder(tmp_path / "folders" / "val", sizes=((20, 20),))
    train, test = ds.image_data(str(tmp_path / "folders"), image_size=16)
    assert (len(train), len(test), train[0][0].shape) == (9, 3, (3, 16, 16))
    with pytest.raises(ds.DatasetError, match=r"--data .*: found none of CIFAR-10"):
        ds.image_data(str(tmp_path / "folders" / "train" / "cat"))


@pytest.mark.parametrize("kind", ["cifar10", "folder", "text"])
def test_distributed_sampler_and_dataloader_workers(tmp_path, kind):
    if kind == "text":
        (tmp_path / "input.txt").write_text("abcdefghij" * 7, encoding="utf-8")
        data = ds.CharWindows(tmp_path / "input.txt", unroll=6)
        seen = []
        for rank in range(2):
            loader = DataLoader(data, batch_size=3, num_workers=2,
                                sampler=DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=1))
            for x, y in loader:
                assert x.shape[1:] == (6,) and torch.equal(x[:, 1:], y[:, :-1])
                seen += x[:, 0].tolist()
        assert sorted(set(seen)) == sorted({data[i][0][0].item() for i in range(len(data))})
        return
    if kind == "cifar10":
        records, labels, _ = _cifar_records(10, 1, (10,), 3)
        (tmp_path / "test_batch.bin").write_bytes(records.tobytes())
        data = ds.cifar10(tmp_path, False)
    else:
        _image_folder(tmp_path)
        data = ds.ImageFolder(tmp_path, 8)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=2)
        for x, y in loader:
            assert x.dtype == torch.uint8 and x.shape[1:] == data[0][0].shape
            seen += y.tolist()
    everything = [data[i][1] for i in range(len(data))]
    # DistributedSampler pads to equal shares by repeating the first indices; every sample is read
    assert sorted(set(seen)) == sorted(set(everything)) and len(seen) == 2 * -(-len(data) // 2)


def test_eval_shards_cover_the_test_set_once():
    data = ds.TensorImages(torch.zeros(11, 1, 2, 2, dtype=torch.uint8), torch.arange(11) % 10, 10)
    shards = [ds.EvalShard(data, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {4}
    valid = sorted(j for s in shards for j in s.indices if j < 11)
    assert valid == list(range(11)) and sum(not s[i][2] for s in shards for i in range(len(s))) == 1


def test_augment_is_a_mirrored_crop_maybe_flipped():
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).reshape(2, 3, 6, 5)
    padded = np.pad(x.numpy(), [(0, 0), (0, 0), (2, 2), (2, 2)], mode="symmetric")
    out = ds.augment(x, pad=2, generator=torch.Generator().manual_seed(0))
    flips = 0
    for i in range(100):  # a different draw each time: every output is one window of the padded image
        out = ds.augment(x, pad=2, generator=torch.Generator().manual_seed(i)).numpy()
        for n in range(2):
            windows = [padded[n, :, a:a + 6, b:b + 5] for a in range(5) for b in range(5)]
            plain = any(np.array_equal(out[n], w) for w in windows)
            flipped = any(np.array_equal(out[n], w[..., ::-1]) for w in windows)
            assert plain or flipped
            flips += flipped and not plain
    assert 60 < flips < 140  # about half the images are flipped
