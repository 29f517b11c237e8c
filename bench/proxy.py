"""Benchmark: a training step of examples/train_lm.py's model through the
device proxy vs direct execution on the same device, alternating in one run,
and the round-trip time of one small operator.

    .venv/bin/python bench/proxy.py [--device cpu|cuda] [--dim 32,256] ...

Two widths by default: 32, the example's own default (every operator is
tiny, so this measures the proxy's cost per operator), and 256 (the kernels
take longer than the proxy's work). The last line is one JSON object: value,
baseline and ratio (proxy / direct step time) of the first width, every
width under "widths"; ok when every width meets the goal: ratio <= 1.15 on
the CPU, 1.03 on a GPU.

The proxy runs on a CPU of its own and this process (worker and direct
runs) on the others, as a GPU's proxy would be placed (``--no-pin``: both
where the scheduler puts them; on a 2-CPU machine it often keeps the two
processes of a pipeline on one CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
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


def _measure(dev, args: argparse.Namespace, direct_dev: torch.device, cfg: R.LMConfig,
             use_example: bool) -> tuple[float, float]:
    """Median proxy and direct step times (s) of one model width."""
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
    # warm-up: optimizer state, caches, allocator, the proxy's templates
    _steps(direct, d_opt, batches[:2], d_put, none)
    _steps(proxied, p_opt, batches[:2], dev.put, dev.mode)
    d_times, p_times = [], []
    for rep in range(args.reps):
        d_times.append(_steps(direct, d_opt, batches, d_put, none))
        p_times.append(_steps(proxied, p_opt, batches, dev.put, dev.mode))
        print(f"dim {cfg.dim} rep {rep}: direct {d_times[-1] * 1e3:.1f} ms/step, "
              f"proxy {p_times[-1] * 1e3:.1f} ms/step", file=sys.stderr)
    return statistics.median(p_times), statistics.median(d_times)


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
    p.add_argument("--dim", default="32,256",
                   help="model widths, comma-separated; the first is the headline")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="steps per timed repetition")
    p.add_argument("--reps", type=int, default=11, help="alternating repetitions")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=["example", "reference"], default="example",
                   help="examples/train_lm.py's CharLM (default) or the proxy's reference LM")
    p.add_argument("--rng", choices=["worker", "proxy"], default="worker",
                   help="where dropout draws (worker: what singularity-run uses)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="leave the proxy and this process where the scheduler puts them")
    args = p.parse_args(argv)
    try:
        dims = [int(d) for d in args.dim.split(",")]
    except ValueError:
        p.error(f"--dim {args.dim!r}: comma-separated integers expected")
    if not dims or min(dims) < 4 or any(d % 4 for d in dims):
        p.error(f"--dim {args.dim!r}: each width a multiple of 4 (4 heads)")
    torch.set_num_threads(args.threads)
    goal = 1.15 if args.device == "cpu" else 1.03
    direct_dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    state = tempfile.mkdtemp(prefix="sgpx-bench-")
    mine = sorted(os.sched_getaffinity(0))
    pinned = {"proxy": mine[-1:], "bench": mine[:-1]} if args.pin and len(mine) > 1 else None
    if pinned:
        os.sched_setaffinity(0, pinned["bench"])
    handles = start_proxies(1, state, device="cpu" if args.device == "cpu" else None,
                            threads=args.threads,
                            cpus=tuple(pinned["proxy"]) if pinned else None)
    print(f"CPUs: {pinned or 'not pinned'}", file=sys.stderr)
    widths = []
    try:
        dev = attach(handles[0].addr, "bench", rng=args.rng)
        use_example = args.model == "example" and EXAMPLE.exists()
        for dim in dims:
            args.dim = dim
            cfg = R.LMConfig(vocab=512, dim=dim, heads=4, layers=args.layers, seq=args.seq,
                             batch=args.batch)
            print(f"proxy device: {dev.device_name}; model "
                  f"{'example CharLM' if use_example else 'reference TinyLM'} dim={cfg.dim} "
                  f"layers={cfg.layers} seq={cfg.seq} batch={cfg.batch} rng={args.rng}",
                  file=sys.stderr)
            value, base = _measure(dev, args, direct_dev, cfg, use_example)
            widths.append({"dim": dim, "value": round(value * 1e3, 3),
                           "baseline": round(base * 1e3, 3), "ratio": round(value / base, 4),
                           "ok": value / base <= goal})
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
    head = widths[0]
    print(json.dumps({
        "bench": "proxy", "value": head["value"], "baseline": head["baseline"],
        "ratio": head["ratio"], "unit": "ms/step", "goal": goal,
        "ok": all(w["ok"] for w in widths), "device": args.device,
        "model": {"name": "example" if use_example else "reference", "rng": args.rng,
                  "dim": head["dim"], "layers": args.layers, "seq": args.seq,
                  "batch": args.batch},
        "widths": widths,
        "small_op_roundtrip_us": round(statistics.median(rtts) * 1e6, 1),
        "small_op_direct_us": round(statistics.median(local_rtts) * 1e6, 1),
        "reps": args.reps, "steps_per_rep": args.steps, "threads": args.threads,
        "pinned": pinned,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
