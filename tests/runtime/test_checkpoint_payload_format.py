"""The checkpoint payload (stateformat): every type a training state holds
round-trips exactly, tied tensors are stored once, what cannot be stored is
refused with the place named, a damaged header is refused, and checkpoints
of the previous format (torch.save, sha256) are still read."""

from __future__ import annotations

import hashlib
import io
import math

import numpy
import pytest
import torch

from slurm_singularity.runtime import checkpoint, signing, stateformat
from slurm_singularity.runtime.api import CheckpointError, CheckpointReason, CorruptCheckpointError


def _state():
    torch.manual_seed(3)
    shared = torch.randn(4, 5)
    return {
        "weights": torch.randn(3, 7),
        "tied_a": shared, "tied_b": shared,
        "half": torch.randn(6).to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "strided": torch.arange(12.0).reshape(3, 4).t(),     # not contiguous
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "rng": torch.get_rng_state(),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0],
                                        "foreach": None, "amsgrad": False}]},
        "cursor": [7, [1, 2, 3]], "nan": math.nan, "inf": -math.inf, "name": "lm",
        "numpy": numpy.arange(6, dtype=numpy.float32).reshape(2, 3),
    }


def _assert_same(got, want, where="state"):
    assert type(got) is type(want), where
    if isinstance(want, numpy.ndarray):
        assert want.dtype == got.dtype and numpy.array_equal(got, want), where
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, where


def test_every_kind_of_value_round_trips_exactly():
    want = _state()
    got = checkpoint.deserialize(checkpoint.serialize(want), "x.pt")
    _assert_same(got, want)


def test_numpy_scalars_become_the_numbers_they_hold():
    got = checkpoint.deserialize(checkpoint.serialize(
        {"best": numpy.float64(0.25), "epoch": numpy.int64(3), "flag": numpy.bool_(True)}))
    assert got == {"best": 0.25, "epoch": 3, "flag": True}
    assert type(got["epoch"]) is int and type(got["flag"]) is bool


def test_tied_tensors_are_stored_once():
    state = _state()
    untied = dict(state, tied_b=state["tied_b"].clone())
    assert len(checkpoint.serialize(untied)) - len(checkpoint.serialize(state)) >= 4 * 5 * 4


def test_an_object_a_checkpoint_cannot_hold_is_refused_with_its_place(tmp_path):
    state = {"scheduler": {"lr_lambdas": [lambda step: 1.0]}}
    with pytest.raises(CheckpointError, match=r"state\['scheduler'\]\['lr_lambdas'\]\[0\] is a function"):
        checkpoint.write(tmp_path, 1, state, devices=1, world_size=1,
                         reason=CheckpointReason.PERIODIC)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_header_is_refused_even_with_a_matching_checksum():
    encoded = stateformat.encode({"w": torch.ones(4)})
    head = encoded.head.replace(b'"float32"', b'"xloat32"')
    payload = head + b"".join(encoded.buffers)
    with pytest.raises(stateformat.StateFormatError, match="tensor 0 of the header"):
        stateformat.decode(payload)
    digest = checkpoint.FORMATS[checkpoint.MAGIC].new_hash(payload).hexdigest()
    data = checkpoint.MAGIC + payload + checkpoint._trailer(
        digest, len(payload), 0, signing.load_key())
    with pytest.raises(CorruptCheckpointError, match="passes its checksum but cannot be loaded"):
        checkpoint.deserialize(data, "x.pt")


def test_a_header_pointing_outside_the_payload_is_refused():
    encoded = stateformat.encode({"w": torch.ones(4)})
    with pytest.raises(stateformat.StateFormatError, match="outside the payload"):
        stateformat.decode(encoded.head)        # the tensor bytes are missing


def test_unsigned_checkpoints_of_an_older_format_are_read_only_when_the_user_says_so(
        tmp_path, monkeypatch):
    """Format 02 (torch.save payload, sha256 trailer) as the runtime wrote it
    before: unsigned, so refused by default (it could be planted); a job
    requeued across an upgrade restores from it with the explicit option."""
    want = {"weights": torch.randn(3, 3), "step": 5}
    buf = io.BytesIO()
    torch.save(want, buf)
    payload = buf.getvalue()
    data = (b"SSCKPT02\n" + payload + hashlib.sha256(payload).hexdigest().encode()
            + f"{len(payload):016d}".encode() + b"\n" + checkpoint.END)
    (tmp_path / checkpoint.ckpt_name(5)).write_bytes(data)
    with pytest.raises(CheckpointError,
                       match="unsigned .format 02.*SINGULARITY_CKPT_ACCEPT_UNSIGNED=1"):
        checkpoint.load_latest(tmp_path)
    monkeypatch.setenv("SINGULARITY_CKPT_ACCEPT_UNSIGNED", "1")
    step, got = checkpoint.load_latest(tmp_path)
    assert step == 5
    _assert_same(got, want)
    flipped = bytearray(data)
    flipped[40] ^= 1
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        checkpoint.deserialize(bytes(flipped), "old.pt")
