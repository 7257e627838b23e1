"""AlexNet of native layers: torchvision's architecture module for module, so its state_dict loads into it.

    python examples/alexnet.py --data DIR                               # CIFAR-10 (cifar-10-batches-bin/), images at 64x64
    singa-launch -np 2 python examples/alexnet.py --data DIR
    singa-launch -np 2 --strategy hogwild --sync-freq 10 python examples/alexnet.py --data DIR
    singa-launch -np 8 python examples/alexnet.py --data DIR            # DIR/train/<class>/*.jpg, DIR/val/...: 224x224
    python examples/alexnet.py --weights alexnet.pth --data DIR         # from torchvision's weights
    python examples/alexnet.py                                          # no data: the digits at 64x64 stand in

Five convolutions (11x11 stride 4, 5x5, then three 3x3) with ReLU and three 3/2 max poolings, adaptive average
pooling to 6x6, then three inner-product layers (4096, 4096, classes) with dropout before the first two.
The net needs images of at least 63x63: CIFAR's 32x32 images are resized to 64x64. Training as torchvision's
reference recipe: SGD, momentum 0.9, weight decay 1e-4 (5e-4 in Krizhevsky et al.), learning rate 0.01 (scaled
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


class AlexNet(torch.nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, channels: int = 3):
        super().__init__()
        self.features = torch.nn.Sequential(
            nl.Conv2d(channels, 64, kernel_size=11, stride=4, padding=2), nl.ReLU(inplace=True),
            nl.MaxPool2d(kernel_size=3, stride=2),
            nl.Conv2d(64, 192, kernel_size=5, padding=2), nl.ReLU(inplace=True),
            nl.MaxPool2d(kernel_size=3, stride=2),
            nl.Conv2d(192, 384, kernel_size=3, padding=1), nl.ReLU(inplace=True),
            nl.Conv2d(384, 256, kernel_size=3, padding=1), nl.ReLU(inplace=True),
            nl.Conv2d(256, 256, kernel_size=3, padding=1), nl.ReLU(inplace=True),
            nl.MaxPool2d(kernel_size=3, stride=2),
        )
        # No native adaptive pooling: torch's (it has no parameters, so the state_dict is unchanged).
        self.avgpool = torch.nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = torch.nn.Sequential(
            nl.Dropout(dropout), nl.Linear(256 * 6 * 6, 4096), nl.ReLU(inplace=True),
            nl.Dropout(dropout), nl.Linear(4096, 4096), nl.ReLU(inplace=True),
            nl.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_model(num_classes: int = 10, image_size: int = 64, channels: int = 3) -> AlexNet:
    if image_size < 63:
        raise ValueError(f"alexnet: images of {image_size}x{image_size} are too small (at least 63x63)")
    return AlexNet(num_classes, channels=channels)


def lr_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """The learning rate divided by 10 after 1/2 and 3/4 of the epochs."""
    return step_schedule(optimizer, epochs, (1 / 2, 3 / 4))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="CIFAR-10/100 or MNIST binary files, or train/ and val/ image folders")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=None, help="default: 0.01 * batch / 128")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 for image folders, else 64")
    parser.add_argument("--weights", default=None, help="a torchvision state_dict to start from")
    parser.add_argument("--no-augment", action="store_true", help="no random crops and flips")
    parser.add_argument("--strategy", default=None, help="default: the launcher's")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="at most this many steps an epoch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--csv", default="alexnet_accuracy.csv", help="per-epoch accuracy log (rank 0)")
    parser.add_argument("--plot", default=None, help="write the accuracy curve to this PNG (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    folders = args.data is not None and os.path.isdir(os.path.join(args.data, "train"))
    image_size = args.image_size or (224 if folders else 64)
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

    model = build_model(train_set.classes, image_size).to(device)
    if args.weights:
        load_torchvision_weights(model, args.weights)
    lr = args.lr if args.lr is not None else 0.01 * args.batch_size / 128
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
        print(f"alexnet: workers={size} strategy={optimizer.strategy.name} train={len(train_set)} "
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
        log.plot(args.plot, "alexnet")
    if rank == 0:
        print(f"test accuracy: {acc:.4f}")
    sd.shutdown()
    return acc


if __name__ == "__main__":
    run(main)
