"""VGG-11 and VGG-16 with batch norm, of native layers: torchvision's architectures module for module (its
state_dicts load into them), with SINGA's CIFAR-10 classifier for CIFAR-sized images.

    python examples/vgg.py --data DIR                                     # VGG-16-BN on CIFAR-10 (cifar-10-batches-bin/)
    singa-launch -np 2 python examples/vgg.py --arch vgg11_bn --data DIR
    singa-launch -np 4 --strategy downpour --worker-groups 2 --servers 1 python examples/vgg.py --data DIR
    singa-launch -np 8 python examples/vgg.py --data DIR --image-size 224   # DIR/train/<class>/*.jpg, DIR/val/...
    python examples/vgg.py --weights vgg16_bn.pth --data DIR --image-size 224   # from torchvision's weights
    python examples/vgg.py                                                # no data: the digits at 32x32 stand in

`features` is torchvision's (3x3 convolutions, batch norm, ReLU; max pooling between the stages). Images of
224x224 get torchvision's classifier (adaptive average pooling to 7x7, two 4096-wide layers with dropout).
Images smaller than 64x64 leave the features at 1x1x512 and get the classifier of SINGA's CIFAR-10 VGG
(from cifar.torch): dropout, 512-wide inner product, batch norm, ReLU, dropout, inner product. Training:
SGD, momentum 0.9, weight decay 5e-4, learning rate 0.05 (scaled by batch / 128), divided by 10 at half and
three quarters of training; SINGA's random crops and flips.
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

CONFIGS = {  # torchvision's: output channels of each 3x3 convolution, "M" for a 2x2 max pooling
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(torch.nn.Module):
    def __init__(self, arch: str = "vgg16_bn", num_classes: int = 1000, cifar: bool = False, channels: int = 3):
        super().__init__()
        if arch not in CONFIGS:
            raise ValueError(f"vgg: --arch must be one of {', '.join(CONFIGS)}, got {arch!r}")
        layers, width = [], channels
        for v in CONFIGS[arch]:
            if v == "M":
                layers.append(nl.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nl.Conv2d(width, v, kernel_size=3, padding=1), nl.BatchNorm2d(v), nl.ReLU(inplace=True)]
                width = v
        self.features = torch.nn.Sequential(*layers)
        if cifar:
            self.avgpool = torch.nn.Identity()
            self.classifier = torch.nn.Sequential(
                nl.Dropout(0.5), nl.Linear(512, 512), nl.BatchNorm1d(512), nl.ReLU(inplace=True),
                nl.Dropout(0.5), nl.Linear(512, num_classes))
        else:
            # No native adaptive pooling: torch's (it has no parameters, so the state_dict is unchanged).
            self.avgpool = torch.nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = torch.nn.Sequential(
                nl.Linear(512 * 7 * 7, 4096), nl.ReLU(inplace=True), nl.Dropout(0.5),
                nl.Linear(4096, 4096), nl.ReLU(inplace=True), nl.Dropout(0.5),
                nl.Linear(4096, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                torch.nn.init.zeros_(m.bias)
            elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0, 0.01)
                torch.nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_model(arch: str = "vgg16_bn", num_classes: int = 10, image_size: int = 32, channels: int = 3) -> VGG:
    if image_size < 32:
        raise ValueError(f"vgg: images of {image_size}x{image_size} are too small for five 2x2 poolings (at least 32)")
    return VGG(arch, num_classes, cifar=image_size < 64, channels=channels)


def lr_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """The learning rate divided by 10 after 1/2 and 3/4 of the epochs."""
    return step_schedule(optimizer, epochs, (1 / 2, 3 / 4))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="CIFAR-10/100 or MNIST binary files, or train/ and val/ image folders")
    parser.add_argument("--arch", default="vgg16_bn", choices=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=None, help="default: 0.05 * batch / 128")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 for image folders, else 32")
    parser.add_argument("--weights", default=None, help="a torchvision state_dict to start from")
    parser.add_argument("--no-augment", action="store_true", help="no random crops and flips")
    parser.add_argument("--strategy", default=None, help="default: the launcher's")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="at most this many steps an epoch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--csv", default="vgg_accuracy.csv", help="per-epoch accuracy log (rank 0)")
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

    model = build_model(args.arch, train_set.classes, image_size).to(device)
    if args.weights:
        load_torchvision_weights(model, args.weights)
    lr = args.lr if args.lr is not None else 0.05 * args.batch_size / 128
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
