"""A small transformer LM trained through the proxy ends with bitwise the
same parameters as the same training without it (emulated CPU device)."""

from __future__ import annotations

import threading

import torch

from slurm_singularity.proxy import reference as R
from slurm_singularity.proxy.client import ProxyTensor, attach

STEPS = 4


def _direct(cfg: R.LMConfig) -> tuple[str, list[float]]:
    model, opt = R.make(cfg)
    torch.manual_seed(1)
    losses = []
    for s in range(STEPS):
        x, y = R.batch(cfg, s)
        losses.append(R.train_step(model, opt, x, y).item())
        opt.step()
        opt.zero_grad()
    return R.param_sha256(model), losses


def _through(proxy, cfg: R.LMConfig, job: str) -> tuple[str, list[float], object]:
    dev = attach(proxy.addr, job)
    try:
        torch.manual_seed(0)
        model = R.TinyLM(cfg)
        dev.module(model)
        opt = R.optimizer(model)
        dev.manual_seed(1)
        losses = []
        for s in range(STEPS):
            x, y = R.batch(cfg, s)
            losses.append(R.train_step(model, opt, dev.put(x), dev.put(y)))
            opt.step()
            opt.zero_grad()
        assert all(isinstance(p, ProxyTensor) for p in model.parameters())
        return R.param_sha256(model), [v.item() for v in losses], model
    finally:
        dev.close()


def test_a_small_lm_trained_through_the_proxy_has_bitwise_the_parameters_of_direct_training(proxy):
    cfg = R.LMConfig()
    want_sha, want_losses = _direct(cfg)
    got_sha, got_losses, _ = _through(proxy, cfg, "equivalence")
    assert got_losses == want_losses
    assert got_sha == want_sha


def test_values_read_back_from_the_proxy_match_local_arithmetic(proxy):
    dev = attach(proxy.addr, "reads")
    try:
        a = torch.arange(12.0).reshape(3, 4)
        pa = dev.put(a)
        got = (pa.t() @ pa).softmax(-1)
        assert torch.equal(got.cpu(), (a.t() @ a).softmax(-1))
        assert (pa.sum() > 10).item() is True
        assert "ProxyTensor" in repr(pa[0])
        assert float(pa[1, 2]) == 6.0
    finally:
        dev.close()


def test_an_operator_error_in_the_proxy_is_raised_at_the_next_read(proxy):
    from slurm_singularity.proxy.api import RemoteError
    import pytest

    dev = attach(proxy.addr, "errors")
    try:
        t = dev.put(torch.ones(3))
        idx = dev.put(torch.tensor([5]))
        bad = t[idx]  # shape is fine locally; the index is out of range in the proxy
        with pytest.raises(RemoteError, match="index"):
            bad.cpu()
        assert dev.fetch(t + 1).tolist() == [2.0, 2.0, 2.0]
    finally:
        dev.close()


def test_the_example_lm_written_for_job_device_trains_unchanged_under_the_proxy_mode(proxy):
    """examples/train_lm.py's model, built with ``.to(device)`` and creating
    its mask with ``device=x.device``, gives the direct run's bits when the
    device is the proxy (the meta device under ``dev.mode()``)."""
    import argparse
    import hashlib
    import importlib.util
    from pathlib import Path

    import torch.nn.functional as F

    path = Path(__file__).resolve().parents[2] / "examples" / "train_lm.py"
    spec = importlib.util.spec_from_file_location("example_train_lm", path)
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    args = argparse.Namespace(block=16, dim=32, layers=2, heads=2, dropout=0.1, lr=3e-3,
                              warmup=2, seed=0)
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, 256, (3, 4, args.block + 1), generator=g)

    def run(device: torch.device, seed_device) -> tuple[str, float]:
        model, opt, sched = lm.build(args, device)
        seed_device(1)  # dropout's stream: the device's own, as on a GPU
        for s in range(3):
            x, y = data[s, :, :-1].to(device), data[s, :, 1:].to(device)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().cpu().numpy().tobytes())
        return h.hexdigest(), loss.item()

    direct = run(torch.device("cpu"), torch.manual_seed)
    dev = attach(proxy.addr, "example-lm")
    try:
        with dev.mode():
            through = run(torch.device("meta"), dev.manual_seed)
    finally:
        dev.close()
    assert through == direct


def test_with_the_worker_rng_dropout_follows_the_workers_cpu_generator(proxy):
    """rng="worker": random operators draw from the worker's CPU generator,
    so a run through the proxy equals a CPU run without reseeding anything
    (what the runtime's per-rank RNG handling relies on)."""
    cfg = R.LMConfig()
    model, opt = R.make(cfg)
    for s in range(2):
        R.train_step(model, opt, *R.batch(cfg, s))
        opt.step()
        opt.zero_grad()
    want = R.param_sha256(model)
    dev = attach(proxy.addr, "worker-rng", rng="worker")
    try:
        torch.manual_seed(0)
        model = R.TinyLM(cfg)
        dev.module(model)
        opt = R.optimizer(model)
        for s in range(2):
            x, y = R.batch(cfg, s)
            R.train_step(model, opt, dev.put(x), dev.put(y))
            opt.step()
            opt.zero_grad()
        assert R.param_sha256(model) == want
    finally:
        dev.close()


def test_sgd_with_momentum_through_the_proxy_matches_direct_training(proxy):
    def train(put):
        torch.manual_seed(3)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        if put is not None:
            put.module(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=1e-4, foreach=False)
        g = torch.Generator().manual_seed(4)
        for _ in range(3):
            x, y = torch.randn(5, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
            if put is not None:
                x, y = put.put(x), put.put(y)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().cpu() for p in net.parameters()]

    dev = attach(proxy.addr, "sgd")
    try:
        got = train(dev)
    finally:
        dev.close()
    want = train(None)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_two_threads_of_one_worker_get_their_own_results(proxy):
    # handles and layout ids are given out atomically: tensors made on two
    # threads at once never share a handle
    dev = attach(proxy.addr, "threads")
    results: dict[int, list[float]] = {}

    def work(k: int) -> None:
        x = dev.put(torch.full((3,), float(k)))
        for i in range(300):
            x = x * 1.0 + (k if i % 2 else -k)  # ends where it started
        results[k] = dev.fetch(x).tolist()

    threads = [threading.Thread(target=work, args=(k,)) for k in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: [float(k)] * 3 for k in (1, 2, 3)}
    dev.close()
