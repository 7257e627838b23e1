"""SINGA's CIFAR-10 example: the "cuda-convnet" net (three convolution blocks, then one inner-product layer),
with SINGA's hyperparameters and augmentation, of native layers.

    python examples/cifar10_convnet.py --data DIR                    # DIR holds cifar-10-batches-bin/
    singa-launch -np 2 python examples/cifar10_convnet.py --data DIR
    singa-launch -np 2 python examples/cifar10_convnet.py --data DIR --hybrid        # SINGA's hybrid.conf
    singa-launch -np 4 --strategy downpour --worker-groups 2 --servers 1 python examples/cifar10_convnet.py --data DIR
    python examples/cifar10_convnet.py                               # no data: the digits at 32x32 stand in

The net of SINGA's examples/cifar10/job.conf (from cuda-convnet's layers-18pct): conv 5x5 (32) -> max pool
3/2 -> ReLU -> LRN, conv 5x5 (32) -> ReLU -> avg pool 3/2 -> LRN, conv 5x5 (64) -> ReLU -> avg pool 3/2, then
the inner product layer `ip1` to 10 classes. Inputs are pixel values 0-255 minus the training set's mean
image (SINGA's RGBImage layer with its mean file). SGD, momentum 0.9, weight decay 0.004 (x250 on ip1's
weights, none on biases, whose learning rate is doubled), learning rate 0.001, then 0.0001 and 0.00001 at
6/7 and 6.5/7 of training (SINGA's steps 60,000 and 65,000 of 70,000). `--hybrid` splits as hybrid.conf
does: convolutions data parallel, ip1 model parallel, through `sd.partition`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict

import torch
from tqdm import tqdm

import native_layers as nl
import singa_dist as sd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import augment, fit_images, image_data, mean_image, stand_in_note  # noqa: E402
from training import EpochLog, evaluate, run, step_schedule, train_loader  # noqa: E402


def build_model(num_classes: int = 10, channels: int = 3, image_size: int = 32) -> torch.nn.Sequential:
    side = image_size
    for _ in range(3):
        side = (side - 3) // 2 + 1  # each 3/2 pooling (SINGA's pooling rounds down)
    if side < 1:
        raise ValueError(f"cifar10_convnet: images of {image_size}x{image_size} are too small (at least 15x15)")
    model = torch.nn.Sequential(OrderedDict(
        conv1=nl.Conv2d(channels, 32, kernel_size=5, padding=2),
        pool1=nl.MaxPool2d(kernel_size=3, stride=2),                # 32x32 -> 15x15
        relu1=nl.ReLU(),
        norm1=nl.LRN(size=3, alpha=5e-5, beta=0.75),
        conv2=nl.Conv2d(32, 32, kernel_size=5, padding=2),
        relu2=nl.ReLU(),
        pool2=nl.AvgPool2d(kernel_size=3, stride=2),                # -> 7x7
        norm2=nl.LRN(size=3, alpha=5e-5, beta=0.75),
        conv3=nl.Conv2d(32, 64, kernel_size=5, padding=2),
        relu3=nl.ReLU(),
        pool3=nl.AvgPool2d(kernel_size=3, stride=2),                # -> 3x3
        flat=torch.nn.Flatten(),
        ip1=nl.Linear(64 * side * side, num_classes),
    ))
    # SINGA's init: Gaussian weights (std 0.0001 for conv1, whose inputs are raw pixels; 0.01 elsewhere), zero biases.
    for name, module in model.named_children():
        if hasattr(module, "weight"):
            torch.nn.init.normal_(module.weight, std=1e-4 if name == "conv1" else 0.01)
            torch.nn.init.zeros_(module.bias)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """SINGA's lr_scale and wd_scale: biases learn at twice the rate without decay, ip1's weights decay x250."""
    groups = {"weights": [], "ip1": [], "biases": []}
    for name, p in model.named_parameters():
        groups["biases" if name.endswith("bias") else "ip1" if name.startswith("ip1") else "weights"].append(p)
    return [dict(params=groups["weights"], weight_decay=weight_decay, lr=lr),
            dict(params=groups["ip1"], weight_decay=weight_decay * 250, lr=lr),
            dict(params=groups["biases"], weight_decay=0.0, lr=lr * 2)]


def lr_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """SINGA's steps (70,000 steps, the rate divided by 10 at 60,000 and 65,000) as fractions of the epochs."""
    return step_schedule(optimizer, epochs, (60 / 70, 65 / 70))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="folder with CIFAR-10's (or CIFAR-100's, MNIST's) binary files")
    parser.add_argument("--epochs", type=int, default=90, help="SINGA's 70,000 steps of 64 are about 90 epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--weight-decay", type=float, default=0.004)
    parser.add_argument("--image-size", type=int, default=32, help="images are resized to this (CIFAR: 32)")
    parser.add_argument("--no-augment", action="store_true", help="no random crops and flips")
    parser.add_argument("--hybrid", action="store_true", help="ip1 model parallel, the rest data parallel")
    parser.add_argument("--strategy", default=None, help="default: the launcher's")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="at most this many steps an epoch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--csv", default="cifar10_convnet_accuracy.csv", help="per-epoch accuracy log (rank 0)")
    parser.add_argument("--plot", default=None, help="write the accuracy curve to this PNG (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    train_set, test_set = image_data(args.data, args.image_size, verbose=False)  # before sd.init(): see run()
    sd.init()
    torch.manual_seed(args.seed)
    device = sd.device()
    rank, size = sd.rank(), sd.size()
    if rank == 0 and args.data is None:
        print(stand_in_note(args.image_size), flush=True)
    mean = fit_images(mean_image(train_set)[None], args.image_size, 3).to(device)

    def prepare(x):  # uint8 images -> pixel values minus the mean image, as SINGA's RGBImage layer
        return fit_images(x, args.image_size, 3) - mean

    full = build_model(train_set.classes, 3, args.image_size).to(device)
    if args.hybrid:
        sd.broadcast_parameters(full.state_dict(), root_rank=0)  # every worker cuts its shard of ip1 from rank 0's
        model = sd.partition.partition(full, {"ip1": 1})
    else:
        model = full
    optimizer = sd.DistributedOptimizer(
        torch.optim.SGD(param_groups(model, args.weight_decay, args.lr), lr=args.lr, momentum=0.9),
        named_parameters=model.named_parameters(), strategy="allreduce" if args.hybrid else args.strategy)
    if not args.hybrid:
        sd.broadcast_parameters(model.state_dict(), root_rank=0)
    scheduler = lr_schedule(optimizer, args.epochs)
    loss_fn = nl.SoftmaxCrossEntropy()

    per_rank = max(args.batch_size // size, 1)
    loader = train_loader(train_set, per_rank, args.seed, args.workers)
    steps = min(len(loader), args.steps_per_epoch or len(loader))
    log = EpochLog(args.csv)
    if rank == 0:
        print(f"workers={size} strategy={'hybrid partitioning' if args.hybrid else optimizer.strategy.name} "
              f"train={len(train_set)} test={len(test_set)} batch={per_rank}x{size}", flush=True)
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
                x = augment(x, generator=generator)
            optimizer.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(1)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_seconds = time.perf_counter() - start
        test_acc = evaluate(model, test_set, per_rank, prepare, args.workers)
        log.add(epoch=epoch + 1, train_loss=round(loss_sum / seen, 5), train_accuracy=round(correct / seen, 5),
                test_accuracy=round(test_acc, 5), lr=lr, train_seconds=round(train_seconds, 3),
                eval_seconds=round(time.perf_counter() - start - train_seconds, 3))
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", test=f"{test_acc:.3f}")
    bar.close()

    acc = log.rows[-1]["test_accuracy"] if log.rows else evaluate(model, test_set, per_rank, prepare)
    if args.plot:
        log.plot(args.plot, "cifar10_convnet" + (" (hybrid)" if args.hybrid else ""))
    if rank == 0:
        print(f"test accuracy: {acc:.4f}")
    sd.shutdown()
    return acc


if __name__ == "__main__":
    run(main)
