"""The datasets of SINGA's examples, read from their real file formats, and stand-ins that ship with installed
packages, so that no example downloads anything at run time.

Bundled (scikit-learn):
- `digits()`: the 1,797 8x8 handwritten digits, split once with a fixed seed into 1,438 training and 359
  held-out test images, scaled to [0, 1]; `digit_images(size)` the same digits as RGB images of any size.
- `text_corpus()`: about 43 kB of English prose.

Readers, each a `torch.utils.data.Dataset` of (image, label) pairs that works with `DistributedSampler` and
`DataLoader` workers; images are uint8 (C, H, W) tensors, labels ints:
- IDX files (MNIST, Fashion-MNIST; gzipped or not): `read_idx(path)`, `mnist(root, train)`;
- CIFAR-10 and CIFAR-100 binary batches: `cifar10(root, train)`, `cifar100(root, train, labels="fine")`;
- a folder of images per class (ImageNet style), decoded with Pillow: `ImageFolder(root, image_size)`;
- a plain-text corpus (char-RNN): `CharWindows(path, unroll)`.
A file of the wrong format or cut short raises `DatasetError` naming the file and what is wrong.

`image_data(data_dir, image_size)` finds which of these a folder holds (or takes the resized digits when
there is none) and returns the training and test sets; `augment` is SINGA's random crop and flip on a batch.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class DatasetError(ValueError):
    """A dataset file that is missing, of the wrong format, or truncated."""


# ---------------------------------------------------------------------------------------------------------
# Bundled data

def digits(test_fraction: float = 0.2, seed: int = 0, image: bool = False):
    """(x_train, y_train, x_test, y_test): float32 features (N, 64), or (N, 1, 8, 8) with image=True."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    if image:
        x = x.view(-1, 1, 8, 8)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, size: int):
    """This rank's share of a dataset: every size-th sample starting at rank (equal shares, remainder dropped)."""
    n = (len(x) // size) * size
    return x[rank:n:size], y[rank:n:size]


def text_corpus() -> str:
    """About 43 kB of English prose: the dataset descriptions that ship with scikit-learn."""
    from importlib import resources

    folder = resources.files("sklearn.datasets") / "descr"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".rst"))
    return "\n".join((folder / name).read_text(encoding="utf-8") for name in names)


class TensorImages(Dataset):
    """Images held in memory: uint8 (N, C, H, W) and int64 labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: int, source: str = ""):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"TensorImages: expected uint8 (N, C, H, W) images and N labels, got "
                             f"{images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images, self.labels, self.classes, self.source = images, labels.long(), classes, source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def digit_images(image_size: int = 32, channels: int = 3, test_fraction: float = 0.2, seed: int = 0):
    """The bundled digits as (train, test) TensorImages of channels x image_size x image_size (bilinear)."""
    x_train, y_train, x_test, y_test = digits(test_fraction, seed, image=True)

    def images(x, y, part):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, channels, -1, -1).contiguous()
        return TensorImages(x, y, 10, f"scikit-learn digits ({part}) at {image_size}x{image_size}")
    return images(x_train, y_train, "train"), images(x_test, y_test, "test")


# ---------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

# IDX type codes: the element type of the array, stored big-endian
_IDX_TYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
              0x0E: torch.float64}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DatasetError(f"{path}: damaged or truncated gzip data ({e})") from None
    return raw


def read_idx(path) -> torch.Tensor:
    """The array in an IDX file (gzipped or not): magic 0x0000, a type code, the number of dimensions, each
    dimension as a big-endian 32-bit count, then the elements, big-endian."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (the first two bytes must be zero, got {raw[:2].hex() or 'nothing'})")
    dtype = _IDX_TYPES.get(raw[2])
    if dtype is None:
        raise DatasetError(f"{path}: unknown IDX type code 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path}: IDX header cut short ({len(raw)} bytes for {ndim} dimensions)")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = header + itemsize * torch.Size(shape).numel()
    if len(raw) != expected:
        raise DatasetError(f"{path}: {'truncated' if len(raw) < expected else 'trailing data'}: the header "
                           f"promises shape {tuple(shape)} ({expected} bytes), the file holds {len(raw)}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    if itemsize > 1:
        data = data.view(-1, itemsize).flip(1).contiguous()  # big-endian to this machine's little-endian
    return data.view(dtype).reshape(shape)


def _find(root: Path, names: list[str]) -> Path:
    for name in names:
        for candidate in (root / name, root / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise DatasetError(f"{root}: none of {', '.join(names)} (or .gz) found")


def mnist(root, train: bool = True) -> TensorImages:
    """MNIST or Fashion-MNIST from their IDX files in `root` (train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-...; gzipped or not): (1, 28, 28) images, labels 0-9."""
    root = Path(root)
    prefix = "train" if train else "t10k"
    images_path = _find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    labels_path = _find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise DatasetError(f"{images_path}: expected a 3-dimensional uint8 array of images, got "
                           f"{images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1 or labels.dtype != torch.uint8:
        raise DatasetError(f"{labels_path}: expected a 1-dimensional uint8 array of labels, got "
                           f"{labels.dtype} {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} is not a class 0-9")
    return TensorImages(images.unsqueeze(1), labels.long(), 10, str(images_path))


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 binary batches

CIFAR_PIXELS = 3 * 32 * 32  # each record: label byte(s), then 1024 red, 1024 green, 1024 blue values, row-major


def read_cifar(paths, label_bytes: int, label_index: int, classes: tuple[int, ...]) -> TensorImages:
    """Records of `label_bytes` label bytes and 3,072 pixel bytes from each file; the label at `label_index`;
    `classes[i]`: how many values label byte i may take (checked)."""
    record = label_bytes + CIFAR_PIXELS
    images, labels = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise DatasetError(f"{path}: no such file")
        raw = path.read_bytes()
        if len(raw) == 0 or len(raw) % record:
            raise DatasetError(f"{path}: {len(raw)} bytes is not a whole number of {record}-byte CIFAR records "
                               f"({label_bytes} label byte{'s' if label_bytes > 1 else ''} + {CIFAR_PIXELS} pixels): "
                               f"truncated, or not this CIFAR's binary format")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, record)
        for i, n in enumerate(classes):
            bad = data[:, i] >= n
            if bad.any():
                row = int(bad.nonzero()[0])
                raise DatasetError(f"{path}: record {row} has label {int(data[row, i])} in byte {i}, but there are "
                                   f"only {n} classes: not this CIFAR's binary format")
        labels.append(data[:, label_index].long())
        images.append(data[:, label_bytes:].reshape(-1, 3, 32, 32))
    return TensorImages(torch.cat(images), torch.cat(labels), classes[label_index],
                        ", ".join(str(p) for p in paths))


def _cifar_folder(root: Path, sub: str, marker: str) -> Path:
    """root itself or root/sub, whichever holds `marker`."""
    for folder in (root, root / sub):
        if (folder / marker).is_file():
            return folder
    raise DatasetError(f"{root}: no {marker} in it or in {sub}/")


def cifar10(root, train: bool = True) -> TensorImages:
    """CIFAR-10's binary version (cifar-10-batches-bin: data_batch_1.bin ... data_batch_5.bin, test_batch.bin)."""
    folder = _cifar_folder(Path(root), "cifar-10-batches-bin", "test_batch.bin")
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    return read_cifar([folder / n for n in names], 1, 0, (10,))


def cifar100(root, train: bool = True, labels: str = "fine") -> TensorImages:
    """CIFAR-100's binary version (cifar-100-binary: train.bin, test.bin; a coarse and a fine label byte)."""
    if labels not in ("coarse", "fine"):
        raise ValueError(f"cifar100: labels must be 'coarse' or 'fine', got {labels!r}")
    folder = _cifar_folder(Path(root), "cifar-100-binary", "test.bin")
    return read_cifar([folder / ("train.bin" if train else "test.bin")], 2, 0 if labels == "coarse" else 1,
                      (20, 100))


# ---------------------------------------------------------------------------------------------------------
# A folder of images per class (ImageNet style)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


class ImageFolder(Dataset):
    """root/<class>/<image>: classes are the sub-folders in sorted order; each image decoded with Pillow, in
    RGB, its shorter side resized to image_size * 8 / 7 and the centre image_size square cut out (the usual
    ImageNet evaluation crop; 256 -> 224)."""

    def __init__(self, root, image_size: int = 224, classes: list[str] | None = None):
        self.root, self.image_size = Path(root), image_size
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: no such folder")
        self.class_names = classes or sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.class_names:
            raise DatasetError(f"{self.root}: no class folders in it (expected root/<class>/<image>)")
        self.samples = []
        for index, name in enumerate(self.class_names):
            folder = self.root / name
            if not folder.is_dir():
                raise DatasetError(f"{folder}: missing (class {name!r} of the training set)")
            self.samples += [(str(folder / f), index) for f in sorted(os.listdir(folder))
                             if f.lower().endswith(tuple(e.lower() for e in IMAGE_EXTENSIONS))]
        if not self.samples:
            raise DatasetError(f"{self.root}: no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) in its class folders")
        self.classes = len(self.class_names)
        self.source = str(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                short = round(self.image_size * 8 / 7)
                w, h = image.size
                scale = short / min(w, h)
                image = image.resize((max(round(w * scale), self.image_size), max(round(h * scale), self.image_size)),
                                     Image.BILINEAR)
                w, h = image.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                image = image.crop((left, top, left + self.image_size, top + self.image_size))
                data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{path}: cannot decode the image ({e})") from None
        return data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).contiguous(), label


# ---------------------------------------------------------------------------------------------------------
# Plain-text corpora (char-RNN)

class CharWindows(Dataset):
    """Windows of unroll + 1 characters from a UTF-8 text file, one starting every `unroll` characters, as
    (input codes, next-character codes); `vocab` is the sorted set of the text's characters."""

    def __init__(self, path, unroll: int = 50, vocab: list[str] | None = None):
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if len(text) < unroll + 1:
            raise DatasetError(f"{path}: {len(text)} characters, fewer than one window of {unroll + 1}")
        self.vocab = vocab or sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = set(text) - set(index)
        if unknown:
            raise DatasetError(f"{path}: characters outside the vocabulary: {''.join(sorted(unknown))[:20]!r}")
        self.codes = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.unroll = unroll

    def __len__(self) -> int:
        return (len(self.codes) - 1) // self.unroll

    def __getitem__(self, i):
        window = self.codes[i * self.unroll:(i + 1) * self.unroll + 1]
        return window[:-1], window[1:]


# ---------------------------------------------------------------------------------------------------------
# What an example calls

def image_data(data_dir: str | None, image_size: int = 32, channels: int = 3, verbose: bool = True):
    """(train, test) datasets from `data_dir`: CIFAR-10 or CIFAR-100 binary batches, MNIST/Fashion-MNIST IDX
    files, or train/ and val/ (or test/) folders of images per class. Without a folder, the bundled digits at
    image_size x image_size, and one line saying so."""
    if data_dir is None:
        if verbose:
            print(stand_in_note(image_size), flush=True)
        return digit_images(image_size, channels)
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"--data {data_dir}: no such folder")
    for sub in ("", "cifar-10-batches-bin"):
        if (root / sub / "test_batch.bin").is_file():
            return cifar10(root, True), cifar10(root, False)
    for sub in ("", "cifar-100-binary"):
        if (root / sub / "test.bin").is_file():
            return cifar100(root, True), cifar100(root, False)
    if any((root / n).is_file() for n in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")):
        return mnist(root, True), mnist(root, False)
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train = ImageFolder(root / "train", image_size)
        return train, ImageFolder(test_dir, image_size, classes=train.class_names)
    raise DatasetError(f"--data {data_dir}: found none of CIFAR-10 (test_batch.bin), CIFAR-100 (test.bin), MNIST "
                       f"(train-images-idx3-ubyte[.gz]) or train/ + val/ image folders")


def stand_in_note(image_size: int) -> str:
    """What image_data() says when no --data folder is given."""
    return (f"no --data DIR given: training on a stand-in, the scikit-learn digits resized to "
            f"{image_size}x{image_size} (see docs/zoo.md for the real datasets)")


def fit_images(x: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """A uint8 batch (N, C, H, W) as float (N, channels, image_size, image_size) in [0, 255]: gray repeated
    to three channels, other sizes resized (bilinear)."""
    x = x.float()
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise ValueError(f"images have {x.shape[1]} channels, the model takes {channels}")
        x = x.expand(-1, channels, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x


def augment(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """SINGA's augmentation of a training batch (N, C, H, W): pad each side by `pad` mirroring the edge pixels
    (numpy's 'symmetric'), cut a random H x W window out of each image, and flip half the images left-right."""
    n, _, h, w = x.shape
    rows = torch.cat([torch.arange(pad - 1, -1, -1), torch.arange(h), torch.arange(h - 1, h - 1 - pad, -1)])
    cols = torch.cat([torch.arange(pad - 1, -1, -1), torch.arange(w), torch.arange(w - 1, w - 1 - pad, -1)])
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    r = rows[dy[:, None] + torch.arange(h)]                                   # (n, h)
    c = cols[dx[:, None] + torch.arange(w)]                                   # (n, w)
    c = torch.where(flip[:, None], c.flip(1), c)
    index = (torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
             r[:, None, :, None].to(x.device), c[:, None, None, :].to(x.device))
    return x[index]


class EvalShard(Dataset):
    """A worker's share of a test set for evaluation: every size-th sample from `rank`, padded so that every
    worker has the same number (collectives inside the model see the same batches); padding is marked invalid.
    Items: (image, label, valid)."""

    def __init__(self, dataset: Dataset, rank: int, size: int):
        self.dataset = dataset
        n = len(dataset)
        self.indices = list(range(rank, -(-n // size) * size, size))
        self.n = n

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        x, y = self.dataset[j % self.n]
        return x, y, j < self.n


def mean_image(dataset: Dataset, limit: int = 50_000) -> torch.Tensor:
    """The mean of the first `limit` images as float (C, H, W) in [0, 255]: SINGA's mean file, subtracted
    from every input by its RGBImage layer."""
    if isinstance(dataset, TensorImages):
        return dataset.images[:limit].float().mean(0)
    total = None
    count = min(len(dataset), limit)
    for i in range(count):
        x = dataset[i][0].float()
        total = x if total is None else total + x
    return total / count


# torchvision's ImageNet statistics, which its pretrained weights expect
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def channel_stats(dataset: Dataset, channels: int = 3, limit: int = 10_000):
    """Per-channel (mean, std) of the images in [0, 1], from the first `limit` images held in memory;
    torchvision's ImageNet statistics for image folders (decoding them all would take long)."""
    if not isinstance(dataset, TensorImages):
        return torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    x = dataset.images[:limit].float().div_(255)
    x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x
    return x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp_min(1e-3)
