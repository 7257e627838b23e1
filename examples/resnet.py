"""ResNet of native layers: ResNet-20 for CIFAR-sized images, ResNet-18 and ResNet-50 for ImageNet-sized ones
(torchvision's architectures, module for module, so torchvision's state_dicts load into them).

    python examples/resnet.py --data DIR                                  # ResNet-20 on CIFAR-10 (cifar-10-batches-bin/)
    singa-launch -np 2 python examples/resnet.py --data DIR
    singa-launch -np 4 --strategy sandblaster --servers 2 python examples/resnet.py --data DIR
    singa-launch -np 8 python examples/resnet.py --arch resnet50 --data DIR   # DIR/train/<class>/*.jpg, DIR/val/...
    python examples/resnet.py --arch resnet18 --weights resnet18.pth --data DIR   # start from torchvision's weights
    python examples/resnet.py                                             # no data: the digits at 32x32 stand in

ResNet-20 is He et al.'s CIFAR net (3x3 convolutions of 16, 32 and 64 channels, three stages of three basic
blocks, global average pooling), with torchvision's block and names (a 1x1 convolution on the shortcut where
the shape changes). Training as in He et al.: SGD, momentum 0.9, weight decay 1e-4, learning rate 0.1 (scaled
by batch / 128), divided by 10 at half and three quarters of training; SINGA's random crops and flips.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

import native_layers as nl
import singa_dist as sd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import augment, channel_stats, fit_images, image_data, stand_in_note  # noqa: E402
from training import EpochLog, evaluate, load_torchvision_weights, run, step_schedule, train_loader  # noqa: E402


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nl.Conv2d:
    return nl.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(inplanes: int, planes: int, stride: int = 1) -> nl.Conv2d:
    return nl.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(torch.nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: torch.nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nl.BatchNorm2d(planes)
        self.relu = nl.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nl.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(torch.nn.Module):
    """torchvision's bottleneck (ResNet v1.5: the stride on the 3x3 convolution)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: torch.nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nl.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nl.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nl.BatchNorm2d(planes * self.expansion)
        self.relu = nl.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(torch.nn.Module):
    """torchvision's ResNet; with `cifar`, He et al.'s CIFAR stem (one 3x3 convolution, no max pooling) and
    stages of 16, 32, 64 channels."""

    def __init__(self, block, layers: list[int], num_classes: int = 1000, cifar: bool = False, channels: int = 3):
        super().__init__()
        widths = (16, 32, 64) if cifar else (64, 128, 256, 512)
        self.inplanes = widths[0]
        if cifar:
            self.conv1 = conv3x3(channels, widths[0])
        else:
            self.conv1 = nl.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nl.BatchNorm2d(widths[0])
        self.relu = nl.ReLU(inplace=True)
        self.maxpool = torch.nn.Identity() if cifar else nl.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (width, blocks) in enumerate(zip(widths, layers)):
            self.add_module(f"layer{i + 1}", self._make_layer(block, width, blocks, stride=1 if i == 0 else 2))
        self.stages = len(widths)
        # No native adaptive pooling: torch's (it has no parameters, so the state_dict is unchanged).
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nl.Linear(widths[-1] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> torch.nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = torch.nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                             nl.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return torch.nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHS = {  # name -> (block, blocks per stage, CIFAR stem)
    "resnet20": (BasicBlock, [3, 3, 3], True),
    "resnet18": (BasicBlock, [2, 2, 2, 2], False),
    "resnet50": (Bottleneck, [3, 4, 6, 3], False),
}


def build_model(arch: str = "resnet20", num_classes: int = 10, channels: int = 3) -> ResNet:
    if arch not in ARCHS:
        raise ValueError(f"resnet: --arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    block, layers, cifar = ARCHS[arch]
    return ResNet(block, layers, num_classes, cifar, channels)


def lr_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """The learning rate divided by 10 after 1/2 and 3/4 of the epochs."""
    return step_schedule(optimizer, epochs, (1 / 2, 3 / 4))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="CIFAR-10/100 or MNIST binary files, or train/ and val/ image folders")
    parser.add_argument("--arch", default="resnet20", choices=list(ARCHS))
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=None, help="default: 0.1 * batch / 128")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 for image folders, else 32")
    parser.add_argument("--weights", default=None, help="a torchvision state_dict to start from")
    parser.add_argument("--no-augment", action="store_true", help="no random crops and flips")
    parser.add_argument("--strategy", default=None, help="default: the launcher's")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="at most this many steps an epoch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--csv", default="resnet_accuracy.csv", help="per-epoch accuracy log (rank 0)")
    parser.add_argument("--plot", default=None, help="write the accuracy curve to this PNG (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    folders = args.data is not None and os.path.isdir(os.path.join(args.data, "train"))
    image_size = args.image_size or (224 if folders else 32)
    train_set, test_set = image_data(args.data, image_size, verbose=False)  # before sd.init(): see run()
    sd.init()
    torch.manual_seed(args.seed)
    device = sd.device()
    rank, size = sd.rank(), sd.size()
    if rank == 0 and args.data is None:
        print(stand_in_note(image_size), flush=True)
    mean, std = (t.view(1, -1, 1, 1).to(device) for t in channel_stats(train_set))

    def prepare(x):  # uint8 images -> normalised per channel
        return (fit_images(x, image_size, 3) / 255 - mean) / std

    model = build_model(args.arch, train_set.classes).to(device)
    if args.weights:
        load_torchvision_weights(model, args.weights)
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size / 128
    optimizer = sd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay),
        named_parameters=model.named_parameters(), strategy=args.strategy)
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
    scheduler = lr_schedule(optimizer, args.epochs)
    loss_fn = nl.SoftmaxCrossEntropy()

    per_rank = max(args.batch_size // size, 1)
    loader = train_loader(train_set, per_rank, args.seed, args.workers)
    steps = min(len(loader), args.steps_per_epoch or len(loader))
    log = EpochLog(args.csv)
    if rank == 0:
        print(f"{args.arch}: workers={size} strategy={optimizer.strategy.name} train={len(train_set)} "
              f"test={len(test_set)} image={image_size}x{image_size} batch={per_rank}x{size}", flush=True)
    bar = tqdm(total=args.epochs * steps, disable=rank != 0 or args.quiet, desc="train", unit="step",
               mininterval=0.5, file=sys.stdout)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for step, (x, y) in enumerate(loader):
            if step == steps:
                break
            x, y = prepare(x.to(device)), y.to(device)
            if not args.no_augment:
                x = augment(x, pad=image_size // 8, generator=generator)
            optimizer.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(1)
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_seconds = time.perf_counter() - start
        test_acc = evaluate(model, test_set, per_rank, prepare, args.workers)
        log.add(epoch=epoch + 1, train_loss=round(loss_sum / seen, 5), train_accuracy=round(correct / seen, 5),
                test_accuracy=round(test_acc, 5), lr=lr_now, train_seconds=round(train_seconds, 3),
                eval_seconds=round(time.perf_counter() - start - train_seconds, 3))
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", test=f"{test_acc:.3f}")
    bar.close()

    acc = log.rows[-1]["test_accuracy"] if log.rows else evaluate(model, test_set, per_rank, prepare)
    if args.plot:
        log.plot(args.plot, args.arch)
    if rank == 0:
        print(f"test accuracy: {acc:.4f}")
    sd.shutdown()
    return acc


if __name__ == "__main__":
    run(main)
