"""Benchmark: a training step of the reference LM through the device proxy vs
direct execution on the same device, alternating in one run, and the
round-trip time of one small operator.

    .venv/bin/python bench/proxy.py [--device cpu|cuda] [--dim 256] ...

The last line is one JSON object (value = proxy step time, baseline = direct
step time, ratio = value/baseline). Goal: ratio <= 1.15 on the CPU, 1.03 on
a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slurm_singularity.proxy import reference as R
from slurm_singularity.proxy.api import start_proxies, stop_proxies
from slurm_singularity.proxy.client import attach


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"


def _example_model(args: argparse.Namespace):
    """examples/train_lm.py's CharLM and AdamW, sized by the options."""
    spec = importlib.util.spec_from_file_location("example_train_lm", EXAMPLE)
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    torch.manual_seed(0)
    model = lm.CharLM(args.seq, args.dim, args.layers, 4, 0.1)
    return model


def _train(model, opt, x, y):
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    return loss


def _steps(model, opt, batches, put, ctx) -> float:
    with ctx():
        t0 = time.perf_counter()
        loss = None
        for x, y in batches:
            loss = _train(model, opt, put(x), put(y))
            opt.step()
            opt.zero_grad()
        loss.item()
        return (time.perf_counter() - t0) / len(batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="steps per timed repetition")
    p.add_argument("--reps", type=int, default=7, help="alternating repetitions")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=["example", "reference"], default="example",
                   help="examples/train_lm.py's CharLM (default) or the proxy's reference LM")
    p.add_argument("--rng", choices=["worker", "proxy"], default="worker",
                   help="where dropout draws (worker: what singularity-run uses)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = R.LMConfig(vocab=512, dim=args.dim, heads=4, layers=args.layers, seq=args.seq,
                     batch=args.batch)
    goal = 1.15 if args.device == "cpu" else 1.03
    direct_dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    state = tempfile.mkdtemp(prefix="sgpx-bench-")
    handles = start_proxies(1, state, device="cpu" if args.device == "cpu" else None,
                            threads=args.threads)
    try:
        dev = attach(handles[0].addr, "bench", rng=args.rng)
        use_example = args.model == "example" and EXAMPLE.exists()
        print(f"proxy device: {dev.device_name}; model "
              f"{'example CharLM' if use_example else 'reference TinyLM'} dim={cfg.dim} "
              f"layers={cfg.layers} seq={cfg.seq} batch={cfg.batch} rng={args.rng}",
              file=sys.stderr)

        def build():
            return _example_model(args) if use_example else R.make(cfg)[0]

        vocab = 256 if use_example else cfg.vocab
        direct = build().to(direct_dev)
        d_opt = torch.optim.AdamW(direct.parameters(), lr=3e-3, foreach=False)
        with dev.mode():
            proxied = build().to(torch.device("meta"))
        p_opt = torch.optim.AdamW(proxied.parameters(), lr=3e-3, foreach=False)
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(args.steps):
            data = torch.randint(0, vocab, (cfg.batch, cfg.seq + 1), generator=g)
            batches.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
        d_put = (lambda t: t.to(direct_dev))
        none = contextlib.nullcontext
        # warm-up: optimizer state, caches, allocator
        _steps(direct, d_opt, batches[:2], d_put, none)
        _steps(proxied, p_opt, batches[:2], dev.put, dev.mode)
        d_times, p_times = [], []
        for rep in range(args.reps):
            d_times.append(_steps(direct, d_opt, batches, d_put, none))
            p_times.append(_steps(proxied, p_opt, batches, dev.put, dev.mode))
            print(f"rep {rep}: direct {d_times[-1] * 1e3:.1f} ms/step, "
                  f"proxy {p_times[-1] * 1e3:.1f} ms/step", file=sys.stderr)
        small = dev.put(torch.ones(4))
        rtts = []
        for _ in range(200):
            t0 = time.perf_counter()
            (small + 1).sum().item()
            rtts.append(time.perf_counter() - t0)
        local = torch.ones(4, device=direct_dev)
        local_rtts = []
        for _ in range(200):
            t0 = time.perf_counter()
            (local + 1).sum().item()
            local_rtts.append(time.perf_counter() - t0)
        dev.close()
    finally:
        stop_proxies(handles)
        shutil.rmtree(state, ignore_errors=True)
    value = statistics.median(p_times)
    base = statistics.median(d_times)
    ratio = value / base
    print(json.dumps({
        "bench": "proxy", "value": round(value * 1e3, 3), "baseline": round(base * 1e3, 3),
        "ratio": round(ratio, 4), "unit": "ms/step", "goal": goal, "ok": ratio <= goal,
        "device": args.device, "model": {"name": "example" if use_example else "reference",
                                         "rng": args.rng, "dim": cfg.dim, "layers": cfg.layers, "seq": cfg.seq,
                                         "batch": cfg.batch, "vocab": vocab},
        "small_op_roundtrip_us": round(statistics.median(rtts) * 1e6, 1),
        "small_op_direct_us": round(statistics.median(local_rtts) * 1e6, 1),
        "reps": args.reps, "steps_per_rep": args.steps, "threads": args.threads,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
