"""A small character-level transformer language model trained with the
slurm-singularity runtime on text every machine has: a fixed list of the
Python standard library's source files (no downloads).

Run it under the launcher, e.g. W=8 logical ranks on 2 emulated devices:

    singularity-run --devices 2 --world-size 8 --ckpt-dir /tmp/lm \
        examples/train_lm.py --steps 30

It prints ``final step=<n> params_sha256=<hex>`` at the end; in
deterministic mode the hash is the same for every D that divides W and for
any schedule of preemptions and restarts.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from slurm_singularity import runtime

# Fixed, sorted list of standard-library files (missing ones are skipped).
CORPUS_FILES = sorted([
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "colorsys.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "fnmatch.py", "fractions.py",
    "functools.py", "heapq.py", "keyword.py", "numbers.py", "operator.py", "os.py",
    "queue.py", "random.py", "shlex.py", "string.py", "textwrap.py", "this.py",
])


def load_text(max_bytes: int) -> bytes:
    root = os.path.dirname(os.__file__)
    chunks = []
    for name in CORPUS_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                chunks.append(fh.read())
    text = b"\n".join(chunks)[:max_bytes]
    if len(text) < 4096:
        raise SystemExit(f"train_lm: only {len(text)} bytes of corpus under {root}")
    return text


class CharWindows(torch.utils.data.Dataset):
    """Windows of ``block + 1`` bytes at a stride of ``block``: (input, target)."""

    def __init__(self, text: bytes, block: int) -> None:
        self.data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        self.block = block

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block

    def __getitem__(self, i: int):
        chunk = self.data[i * self.block: i * self.block + self.block + 1]
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = self.drop(att.masked_fill(~mask, float("-inf")).softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharLM(nn.Module):
    def __init__(self, block: int, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.zeros(block, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def build(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(args.seed)
    model = CharLM(args.block, args.dim, args.layers, args.heads, args.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    return model, opt, sched


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per logical rank")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--corpus-bytes", type=int, default=200_000)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep per step (tests: time to send a signal)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    job = runtime.init()
    model, opt, sched = build(args, job.device)
    data = CharWindows(load_text(args.corpus_bytes), args.block)
    trainer = job.trainer(model, opt, data, batch_size=args.batch_size, scheduler=sched,
                          seed=args.seed, ckpt_every=args.ckpt_every)
    for step in trainer.steps(args.steps):
        for x, y in step.batches():
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            step.record("loss", loss)
        mean_loss = step.reduce("loss", op="mean")   # all W logical ranks: same on any D
        if args.step_sleep:
            import time
            time.sleep(args.step_sleep)
        if job.is_main:
            print(f"step {step.index + 1} loss {mean_loss:.4f}", flush=True)
    if job.is_main:
        print(f"final step={trainer.step} params_sha256={trainer.params_sha256()}", flush=True)
    job.close()


if __name__ == "__main__":
    main()
