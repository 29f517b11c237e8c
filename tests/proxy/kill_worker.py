"""A training worker for the kill -9 test: attaches to a proxy as a job,
resumes from what the proxy keeps (or starts fresh), prints ``step N`` after
each committed step, and refuses to open any checkpoint file."""

from __future__ import annotations

import os
import sys
import time

CKPT_DIR = os.path.realpath(sys.argv[4])


def _no_checkpoints(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(CKPT_DIR) or path.endswith((".pt", ".pth", ".ckpt")):
            print(f"opened a checkpoint file: {path}", flush=True)
            os._exit(3)


sys.addaudithook(_no_checkpoints)

import torch  # noqa: E402

from slurm_singularity.proxy import persist, reference as R  # noqa: E402
from slurm_singularity.proxy.client import attach  # noqa: E402


def main() -> int:
    addr, job, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    cfg = R.LMConfig()
    dev = attach(addr, job)
    torch.manual_seed(0)
    model = R.TinyLM(cfg)
    if persist.completed_steps(dev) is None:
        dev.module(model)
        opt = R.optimizer(model)
        dev.manual_seed(1)
        start = 0
        print("fresh", flush=True)
    else:
        opt, start = persist.resume(dev, model, R.optimizer)
        print(f"resumed {start}", flush=True)
    for s in range(start, steps):
        x, y = R.batch(cfg, s)
        R.train_step(model, opt, dev.put(x), dev.put(y))
        time.sleep(0.03)  # gives the test's kill time to land inside a step
        with dev.atomic():
            opt.step()
            opt.zero_grad()
            persist.commit_step(dev, model, opt, s + 1)
        print(f"step {s + 1}", flush=True)
    print(f"sha {R.param_sha256(model)}", flush=True)
    dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
