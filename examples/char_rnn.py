"""Character-level language model: a native GRU (or LSTM, or vanilla RNN) trained by back-propagation through
time with a fixed unroll, and RMSProp, as in SINGA's char-RNN, on text that ships with scikit-learn.

    singa-launch -np 2 python examples/char_rnn.py
    python examples/char_rnn.py --hidden 512 --unroll 50 --steps 2000      # SINGA's sizes
    python examples/char_rnn.py --cell lstm                                # or --cell rnn

Each worker reads its own stretch of the text; the hidden state is carried from one unrolled window to the
next and cut from the graph between them (truncated BPTT). Prints the held-out bits per character and a
sample.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import native_layers as nl
import singa_dist as sd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import text_corpus  # noqa: E402


CELLS = {"gru": nl.GRU, "lstm": nl.LSTM, "rnn": nl.RNN}


class CharRNN(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int = 1, cell: str = "gru"):
        super().__init__()
        self.embed = nl.Embedding(vocab, hidden)
        self.rnn = CELLS[cell](hidden, hidden, num_layers=layers, batch_first=True)
        self.out = nl.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, h=None):
        y, h = self.rnn(self.embed(x), h)
        return self.out(y), h


def detach(h):
    """The state without its history (an LSTM's is a pair of tensors)."""
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", choices=sorted(CELLS), default="gru", help="recurrent layer (SINGA's is the GRU)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--unroll", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per worker")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sd.init()
    torch.manual_seed(args.seed)
    text = text_corpus()
    vocab = sorted(set(text))
    codes = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    split = int(len(codes) * 0.9)
    train, held_out = codes[:split], codes[split:]

    rank, size = sd.rank(), sd.size()
    # batch_size parallel streams per worker, each starting at its own offset in the text
    streams = args.batch_size * size
    stride = len(train) // streams
    starts = torch.arange(args.batch_size) * stride + rank * args.batch_size * stride

    model = CharRNN(len(vocab), args.hidden, cell=args.cell)
    loss_fn = nl.SoftmaxCrossEntropy()
    opt = sd.DistributedOptimizer(torch.optim.RMSprop(model.parameters(), lr=args.lr, alpha=0.95),
                                  named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)

    h = None
    for step in range(args.steps):
        pos = starts + (step * args.unroll) % (stride - args.unroll - 1)  # wraps inside each stream's stretch
        idx = pos[:, None] + torch.arange(args.unroll + 1)
        window = train[idx]
        logits, h = model(window[:, :-1], h)
        h = detach(h)  # truncated BPTT: the next window starts from this state, not through it
        loss = loss_fn(logits.reshape(-1, len(vocab)), window[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if rank == 0 and (step + 1) % 100 == 0:
            print(f"step {step + 1}: train bits/char {loss.item() / math.log(2):.3f}")

    model.eval()
    with torch.no_grad():
        logits, _ = model(held_out[None, :-1])
        bits = loss_fn(logits[0], held_out[1:]).item() / math.log(2)
        generator = torch.Generator().manual_seed(args.seed)
        x, h, chars = held_out[:1][None], None, []
        for _ in range(120):
            logits, h = model(x, h)
            x = torch.multinomial(torch.softmax(logits[0, -1] / 0.8, -1), 1, generator=generator)[None]
            chars.append(vocab[x.item()])
    if rank == 0:
        print("sample: " + "".join(chars).replace("\n", " "))
        print(f"held-out bits per character: {bits:.3f}")
    sd.shutdown()
    return bits


if __name__ == "__main__":
    main()
