"""Spliced ranks attached under one job share one copy of the named state in
the proxy, and the proxy snapshots a job's device state as a state_dict-like
blob that restores into another job."""

from __future__ import annotations

import io

import torch

from slurm_singularity.proxy import persist, reference as R
from slurm_singularity.proxy.client import attach


def test_two_connections_of_one_job_share_the_named_parameters_without_a_copy(proxy):
    a = attach(proxy.addr, "spliced")
    b = attach(proxy.addr, "spliced")
    try:
        w = a.put(torch.zeros(4))
        a.register("model.w", w)
        a.sync()
        shared = b.lookup("model.w")
        shared.add_(1.0)      # rank b updates the one copy ...
        b.sync()
        assert a.fetch(w).tolist() == [1.0] * 4   # ... rank a sees it
        w.mul_(3.0)
        a.sync()
        assert b.fetch(shared).tolist() == [3.0] * 4
    finally:
        a.close()
        b.close()


def test_a_snapshot_holds_the_named_tensors_and_restores_into_another_job(proxy):
    cfg = R.LMConfig()
    dev = attach(proxy.addr, "snap")
    try:
        torch.manual_seed(0)
        model = R.TinyLM(cfg)
        dev.module(model)
        opt = R.optimizer(model)
        dev.manual_seed(1)
        x, y = R.batch(cfg, 0)
        R.train_step(model, opt, dev.put(x), dev.put(y))
        with dev.atomic():
            opt.step()
            persist.commit_step(dev, model, opt, 1)
        blob = dev.snapshot()
        want = R.param_sha256(model)
        head = dict(model.named_parameters())["head.weight"].cpu()
    finally:
        dev.close()
    state = torch.load(io.BytesIO(blob), weights_only=True)
    assert state["meta"]["train.step"] == 1
    assert torch.equal(state["tensors"]["train.model.head.weight"], head)
    other = attach(proxy.addr, "snap-restored")
    try:
        other.restore(blob)
    finally:
        other.close()
    again = attach(proxy.addr, "snap-restored")  # sees the names the restore made
    try:
        torch.manual_seed(0)
        fresh = R.TinyLM(cfg)
        _opt, step = persist.resume(again, fresh, R.optimizer)
        assert step == 1
        assert R.param_sha256(fresh) == want
    finally:
        again.close()
