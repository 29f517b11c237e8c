"""A small transformer LM trained through the proxy ends with bitwise the
same parameters as the same training without it (emulated CPU device)."""

from __future__ import annotations

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
