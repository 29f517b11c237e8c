"""The policy file fails closed: every mistake is an error that names the
file, the dotted key and the line, and `policy check` exits non-zero."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_singularity.cli import admin
from slurm_singularity.policy import default_policy_path
from slurm_singularity.policy.api import PolicyError, PreemptMode, Tier
from slurm_singularity.policy.load import line_of, load_policy, parse_policy

DEFAULT = default_policy_path().read_text()


def _line_containing(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_the_default_policy_has_three_tiers_over_three_partitions_and_lets_root_submit():
    policy = load_policy(default_policy_path())
    assert set(policy.tiers) == {Tier.PREMIUM, Tier.STANDARD, Tier.BASIC}
    assert policy.tiers[Tier.PREMIUM].preempt_mode is PreemptMode.OFF
    assert set(policy.tiers[Tier.BASIC].preemptible_by) == {Tier.PREMIUM, Tier.STANDARD}
    assert policy.tiers[Tier.STANDARD].preemptible_by == (Tier.PREMIUM,)
    assert policy.tiers[Tier.STANDARD].preempt_mode is PreemptMode.REQUEUE
    assert policy.tiers[Tier.PREMIUM].gpu_fraction >= 0.95
    assert policy.tiers[Tier.STANDARD].gpu_fraction >= 0.70
    assert policy.defaults.account == "default"
    assert Tier.PREMIUM not in policy.accounts["default"].tiers
    assert set(policy.accounts["research"].tiers) == set(Tier)


@pytest.mark.parametrize("old,new,key,needle", [
    ("grace_time_s = 30", "grace_time_s = -1", "tiers.basic.grace_time_s", "grace_time_s = -1"),
    ("grace_time_s = 30", "grace_time = 30", "tiers.basic.grace_time", "grace_time = 30"),
    ("priority_tier = 10", 'priority_tier = "ten"', "tiers.basic.priority_tier", '"ten"'),
    ('partition = "basic"', 'partition = "cheap"', "tiers.basic.partition", '"cheap"'),
    ('tiers = ["standard", "basic"]', 'tiers = ["gold"]', "accounts.default.tiers", '"gold"'),
    ('account = "default"', 'account = "nobody"', "defaults.account", '"nobody"'),
    ("gpu_fraction = 0.70", "gpu_fraction = 1.5", "tiers.standard.gpu_fraction", "1.5"),
    ("max_splice_factor = 16", "max_splice_factor = true", "elastic.max_splice_factor",
     "max_splice_factor = true"),
    ('signal = "TERM"\ngpu_fraction = 0.0', 'signal = "SIGBOGUS"\ngpu_fraction = 0.0',
     "tiers.basic.signal", "SIGBOGUS"),
    ('preemptible_by = ["premium", "standard"]', 'preemptible_by = ["premium"]  # too few',
     "tiers.basic.preemptible_by", "too few"),
])
def test_a_mistake_is_an_error_naming_key_and_line(old, new, key, needle):
    assert old in DEFAULT
    text = DEFAULT.replace(old, new, 1)
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "site.toml")
    assert err.value.key == key
    assert err.value.path == "site.toml"
    assert err.value.line == _line_containing(text, needle)
    assert str(err.value).startswith(f"site.toml:{err.value.line}: {key}: ")


def test_an_unknown_section_and_bad_toml_are_errors():
    with pytest.raises(PolicyError, match=r"x.toml:\d+: colours: unknown section"):
        parse_policy(DEFAULT + "\n[colours]\nred = 1\n", "x.toml")
    with pytest.raises(PolicyError, match=r"x.toml:3: not valid TOML"):
        parse_policy("[defaults]\ntier = 'basic'\ntier = = 2\n", "x.toml")


def test_a_declared_partition_without_a_tier_is_an_error():
    with pytest.raises(PolicyError, match="partitions.spare: is declared but no tier uses it"):
        parse_policy(DEFAULT + '\n[partitions.spare]\nnodes = "ALL"\n', "x.toml")


def test_two_tiers_cannot_share_a_partition():
    text = DEFAULT.replace('partition = "basic"', 'partition = "standard"')
    text = text.replace('[partitions.basic]\nnodes = "ALL"\nmax_time = "UNLIMITED"\n', "")
    with pytest.raises(PolicyError, match="tiers.basic.partition: partition 'standard' is "
                                          "already the partition of tier standard"):
        parse_policy(text, "x.toml")


def test_line_of_finds_dotted_keys_in_tables_and_inline():
    text = "[tiers.basic]\nsignal = 'TERM'\n\n[accounts]\ndefault.gpu_quota = 3\n"
    assert line_of(text, "tiers.basic.signal") == 2
    assert line_of(text, "accounts.default.gpu_quota") == 5
    assert line_of(text, "tiers.basic.missing") == 1


def test_policy_check_exits_nonzero_and_names_file_key_and_line(tmp_path: Path, capsys):
    bad = tmp_path / "policy.toml"
    bad.write_text(DEFAULT.replace("grace_time_s = 30", "grace_time_s = -3"))
    assert admin.main(["policy", "check", str(bad)]) != 0
    err = capsys.readouterr().err
    line = _line_containing(bad.read_text(), "grace_time_s = -3")
    assert (f"{bad}:{line}: tiers.basic.grace_time_s: must be a whole number in [0, 86400], "
            "got -3") in err


def test_policy_check_of_a_missing_file_fails_with_its_name(tmp_path: Path, capsys):
    assert admin.main(["policy", "check", str(tmp_path / "nope.toml")]) != 0
    assert "nope.toml: cannot read" in capsys.readouterr().err


def test_policy_check_of_the_default_prints_a_summary(capsys):
    assert admin.main(["policy", "check", str(default_policy_path())]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "premium" in out and "research" in out


# Every numeric field of the policy: (line in the default policy, dotted key, range in the error).
NUMERIC_FIELDS = [
    ("max_splice_factor = 16", "elastic.max_splice_factor", "a whole number in [1, 1024]"),
    ("priority_tier = 10", "tiers.basic.priority_tier", "a whole number in [0, 65533]"),
    ("grace_time_s = 30", "tiers.basic.grace_time_s", "a whole number in [0, 86400]"),
    ("gpu_fraction = 0.70", "tiers.standard.gpu_fraction", "a number in [0, 1]"),
    ("gpu_quota = 32\nfair_share_weight = 1.0", "accounts.default.gpu_quota",
     "a whole number in [1, 1000000]"),
    ("fair_share_weight = 2.0", "accounts.research.fair_share_weight",
     "a number in [1e-06, 1e+06]"),
]
ABSURD = ["nan", "inf", "-inf", "1e-320", "1e300", "-1", "-1.5", "99999999999",
          "9223372036854775807", "-9223372036854775808"]


@pytest.mark.parametrize("line, key, allowed", NUMERIC_FIELDS)
@pytest.mark.parametrize("value", ABSURD)
def test_every_numeric_field_refuses_an_absurd_value_naming_the_field_and_its_range(
        line, key, allowed, value):
    assert line in DEFAULT
    name = key.rsplit(".", 1)[1]
    old = next(part for part in line.split("\n") if part.startswith(name))
    text = DEFAULT.replace(line, line.replace(old, f"{name} = {value}"), 1)
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "site.toml")
    assert err.value.key == key, str(err.value)
    assert err.value.line == _line_containing(text, f"{name} = {value}")
    assert f"site.toml:{err.value.line}: {key}: must be {allowed}, got " in str(err.value)


def test_policy_check_refuses_a_nan_fair_share_weight_and_a_huge_grace_time(tmp_path: Path, capsys):
    for old, new, key in [("fair_share_weight = 2.0", "fair_share_weight = nan",
                           "accounts.research.fair_share_weight"),
                          ("grace_time_s = 30", "grace_time_s = 99999999999",
                           "tiers.basic.grace_time_s")]:
        bad = tmp_path / "policy.toml"
        bad.write_text(DEFAULT.replace(old, new))
        assert admin.main(["policy", "check", str(bad)]) != 0
        err = capsys.readouterr().err
        assert f"{bad}:{_line_containing(bad.read_text(), new)}: {key}: must be" in err, err


FLOAT_FIELDS = [("gpu_fraction = 0.70", "tiers.standard.gpu_fraction", 0.0, 1.0),
                ("fair_share_weight = 2.0", "accounts.research.fair_share_weight", 1e-6, 1e6)]


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(FLOAT_FIELDS), x=st.floats(allow_nan=True, allow_infinity=True))
def test_a_float_field_holds_only_finite_normal_numbers_in_its_range(field, x):
    line, key, lo, hi = field
    text = DEFAULT.replace(line, f"{line.split(' = ')[0]} = {x!r}", 1)
    try:
        policy = parse_policy(text, "site.toml")
    except PolicyError as err:
        assert err.key == key and "must be a number in [" in err.message
        assert not (lo <= x <= hi and (x == 0 or abs(x) >= sys.float_info.min))
        return
    spec = (policy.tiers[Tier.STANDARD].gpu_fraction if key.startswith("tiers")
            else policy.accounts["research"].fair_share_weight)
    assert spec == x and lo <= x <= hi
