"""An elastic training script for tests/test_elastic.py: the digits MLP under singa_dist.elastic.

    singa-launch -np 3 --min-np 2 --max-np 3 python tests/elastic_worker.py --epochs 8 [--die 1:3:5]

--die W:E:B makes worker W (its SINGA_WORKER_ID) kill itself with SIGKILL at epoch E, batch B, before that
batch's step; --die-forming W:N makes worker W kill itself when it comes to form its N-th process group (the
others are inside torch's group creation by then, waiting for it); --touch-at E:B:PATH makes rank 0 create the file PATH there (a host discovery script that
reads it then offers one more slot).
Rank 0 prints one line per commit and a last line `final accuracy A size S steps N resets R`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import singa_dist as sd  # noqa: E402
from datasets import digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--die", default=None)
    parser.add_argument("--die-forming", default=None)
    parser.add_argument("--touch-at", default=None)
    parser.add_argument("--commit-every", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds of extra 'compute' per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    me = int(os.environ.get("SINGA_WORKER_ID", "0"))
    if args.die_forming and me == int(args.die_forming.split(":")[0]):
        die_at, forming, created = int(args.die_forming.split(":")[1]), torch.distributed.init_process_group, [0]

        def dying(*a, **k):
            created[0] += 1
            if created[0] == die_at:
                time.sleep(1.0)  # the others are inside their group's creation by now
                os.kill(os.getpid(), signal.SIGKILL)
            return forming(*a, **k)

        torch.distributed.init_process_group = dying
    sd.init()
    result = train(args.epochs, args.batch_size, tuple(int(v) for v in args.die.split(":")) if args.die else None,
                   args.touch_at, args.commit_every, args.sleep)
    if sd.rank() == 0:
        print(f"final accuracy {result['accuracy']:.4f} size {result['size']} steps {result['steps']} "
              f"resets {result['resets']}", flush=True)
    sd.shutdown()


def train(epochs: int = 8, batch_size: int = 32, die: tuple | None = None, touch_at: str | None = None,
          commit_every: int = 4, sleep: float = 0.0) -> dict:
    """The training (after sd.init()); also the function a test hands to hvd.run with elastic arguments.
    Returns this worker's rank, size, steps, resets and final test accuracy."""
    me = int(os.environ.get("SINGA_WORKER_ID", "0"))
    sd.init()
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    dataset = torch.utils.data.TensorDataset(x_train, y_train)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                        named_parameters=model.named_parameters())
    sampler = sd.elastic.ElasticSampler(dataset, shuffle=True, seed=0)
    touch = touch_at.split(":", 2) if touch_at else None
    resets = [0]

    def on_reset():
        resets[0] += 1
        if sd.rank() == 0:  # the state is the last commit's here (rolled back after a failure, kept otherwise)
            print(f"reset: size {sd.size()} steps {state.steps}", flush=True)

    def commit(state):
        if sd.rank() == 0:
            print(f"commit: epoch {state.epoch} batch {state.batch} steps {state.steps} size {sd.size()}", flush=True)
        state.commit()

    state = sd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=0, batch=0, steps=0)
    state.register_reset_callbacks([on_reset])

    @sd.elastic.run
    def loop(state):
        loss_fn = torch.nn.CrossEntropyLoss()
        while state.epoch < epochs:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=state.sampler)
            for i, (x, y) in enumerate(loader):
                if die and (me, state.epoch, state.batch) == die:
                    os.kill(os.getpid(), signal.SIGKILL)
                if touch and sd.rank() == 0 and (state.epoch, state.batch) == (int(touch[0]), int(touch[1])):
                    open(touch[2], "w").close()
                time.sleep(sleep)
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
                state.sampler.record_batch(i, batch_size)
                state.batch += 1
                state.steps += 1
                if state.batch % commit_every == 0:
                    commit(state)
            state.epoch += 1
            state.batch = 0
            state.sampler.set_epoch(state.epoch)
            commit(state)

    loop(state)
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"rank": sd.rank(), "size": sd.size(), "steps": state.steps, "resets": resets[0], "accuracy": acc}


if __name__ == "__main__":
    main()
