"""A checkpoint carries an HMAC-SHA256 under a key only its user can read
(issue 19, item 7): restore refuses one that does not verify, and the key
file itself is refused when it is not private. Run in-process as root; the
same as real users is in tests/security/test_checkpoints_are_private_and_signed.py."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

from slurm_singularity import contract
from slurm_singularity.runtime import checkpoint, signing
from slurm_singularity.runtime.api import CheckpointKeyError, CheckpointReason


@pytest.fixture(autouse=True)
def own_key(tmp_path, monkeypatch):
    """Each test with a fresh key file of its own."""
    monkeypatch.setattr(signing, "_cache", {})
    key = tmp_path / "keys" / "ckpt.key"
    monkeypatch.setenv(contract.CKPT_KEY, str(key))
    return key


def _write(ckpt_dir, step: int) -> None:
    checkpoint.write(ckpt_dir, step, {"step": step, "w": torch.full((100,), float(step))},
                     devices=1, world_size=2, reason=CheckpointReason.PERIODIC)


def test_a_checkpoint_renamed_to_a_later_step_is_refused_and_the_real_newest_used(
        tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    _write(ckpt, 1)
    _write(ckpt, 2)
    shutil.copy(ckpt / checkpoint.ckpt_name(2), ckpt / checkpoint.ckpt_name(9))
    step, state = checkpoint.load_latest(ckpt)
    assert (step, state["step"]) == (2, 2)
    assert (f"checkpoint {ckpt / checkpoint.ckpt_name(9)} was signed as the checkpoint of "
            "step 2, not 9: it was renamed or copied; refusing it") in caplog.text


def test_a_checkpoint_signed_with_another_key_is_refused_and_the_previous_one_used(
        tmp_path, monkeypatch, caplog, own_key):
    ckpt = tmp_path / "ckpt"
    _write(ckpt, 1)
    monkeypatch.setenv(contract.CKPT_KEY, str(tmp_path / "other" / "ckpt.key"))
    _write(ckpt, 2)                                   # someone else's key
    monkeypatch.setenv(contract.CKPT_KEY, str(own_key))
    step, _ = checkpoint.load_latest(ckpt)
    assert step == 1
    assert (f"checkpoint {ckpt / checkpoint.ckpt_name(2)} is not signed with your checkpoint "
            f"key ({own_key}): it was planted, altered") in caplog.text
    assert "using the previous checkpoint ckpt-00000001.pt instead" in caplog.text


def test_a_checkpoint_whose_signature_was_edited_is_refused(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    _write(ckpt, 1)
    _write(ckpt, 2)
    path = ckpt / checkpoint.ckpt_name(2)
    data = bytearray(path.read_bytes())
    at = len(data) - len(checkpoint.END) - 2          # the MAC's last hex digit
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    assert checkpoint.load_latest(ckpt)[0] == 1
    assert "ckpt-00000002.pt is not signed with your checkpoint key" in caplog.text


def test_the_key_is_made_on_first_use_0600_in_a_0700_directory_whatever_the_umask(
        tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(contract.CKPT_KEY)
    old = os.umask(0)
    try:
        key = signing.load_key()
    finally:
        os.umask(old)
    path = home / ".config" / "slurm-singularity" / "ckpt.key"
    assert path.read_bytes() == key and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / ".config").stat().st_mode) == 0o700
    monkeypatch.setattr(signing, "_cache", {})
    assert signing.load_key() == key                  # read back, not made again


@pytest.mark.parametrize("spoil,why", [
    (lambda p, users: p.chmod(0o644), "is readable by group or others"),
    (lambda p, users: os.chown(p, users[1].uid, users[1].gid), "is owned by sing-u2"),
    (lambda p, users: p.write_bytes(b"short"), "is not a file of 32 bytes (5 bytes)"),
])
def test_a_key_file_that_is_not_private_is_refused_naming_the_file_and_the_rule(
        own_key, monkeypatch, unprivileged_users, spoil, why):
    signing.load_key()
    spoil(own_key, unprivileged_users)
    monkeypatch.setattr(signing, "_cache", {})
    with pytest.raises(CheckpointKeyError) as refused:
        signing.load_key()
    assert f"checkpoint key {own_key} {why}" in str(refused.value)
    assert "must be a file of 32 bytes owned by you and readable by no one else" in str(
        refused.value)


def test_a_malformed_accept_unsigned_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(contract.CKPT_ACCEPT_UNSIGNED, "maybe")
    with pytest.raises(contract.ContractError, match="SINGULARITY_CKPT_ACCEPT_UNSIGNED='maybe'"):
        contract.ckpt_accept_unsigned()
