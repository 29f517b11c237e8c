"""Render the files through which Slurm enforces a policy: ``policy.conf``
(a slurm.conf fragment: preemption type and mode, one partition per tier)
and ``job_submit.lua`` (the rules of ``rules.py``, with the policy baked in).

Pure apart from reading the Jinja2 templates in the repository's
``templates/`` directory; installing the files is ``cli/admin_policy.py``'s
job, and the local cluster (``cluster/render.py``) renders the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jinja2

from .. import contract, paths
from .api import Policy, PreemptMode
from .rules import MAX_COUNT, TRANSPARENT_TAG_FIELD

#: Name of the installed policy file, beside job_submit.lua and policy.conf.
INSTALLED_POLICY = "policy.toml"
#: The daemon's systemd unit that ``policy apply`` renders and installs.
UNIT_NAME = "singularity-schedd.service"


def templates_dir() -> Path:
    """The repository's ``templates/`` directory (policy.toml, the .j2 files)."""
    return paths.TEMPLATES_DIR


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=False)


def lua_literal(value: object) -> str:
    """A Lua literal for ``value`` (str, int, float, bool, None, dict, list/tuple)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _lua_string(value)
    if isinstance(value, dict):
        items = ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}"
                          for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def _lua_string(text: str) -> str:
    """Double-quoted Lua 5.1 string; anything outside printable ASCII as
    decimal byte escapes (Lua 5.1 has no \\x or \\u escapes)."""
    out = []
    for ch in text:
        if ch in "\\\"":
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127:
            out.append(ch)
        else:
            out.extend(f"\\{b}" for b in ch.encode("utf-8"))
    return '"' + "".join(out) + '"'


def policy_table(policy: Policy) -> dict[str, object]:
    """The data job_submit.lua needs, as plain values (becomes ``POLICY``)."""
    return {
        "tier_names": {"premium": True, "standard": True, "basic": True},
        "default_tier": policy.defaults.tier.value,
        "default_account": policy.defaults.account,
        "tiers": {t.value: {"partition": s.partition,
                            "requeue": 0 if s.preempt_mode is PreemptMode.CANCEL else 1,
                            "signal": s.signal}
                  for t, s in policy.tiers.items()},
        "partition_tier": {s.partition: t.value for t, s in policy.tiers.items()},
        "accounts": {name: {"tiers": {t.value: True for t in a.tiers},
                            "allowed": ", ".join(t.value for t in a.tiers),
                            "quota": a.gpu_quota,
                            "members": ({u: True for u in a.members} if a.members else None)}
                     for name, a in policy.accounts.items()},
        "known_accounts": ", ".join(sorted(policy.accounts)),
        "multiple": policy.elastic.world_size_multiple_of_devices,
        "max_splice": policy.elastic.max_splice_factor,
    }


def _partitions(policy: Policy, nodes: str) -> list[dict[str, object]]:
    rows = []
    for spec in sorted(policy.tiers.values(), key=lambda s: -s.priority_tier):
        part = policy.partitions[spec.partition]
        mode = spec.preempt_mode.value.upper() if spec.preemptible_by else "OFF"
        rows.append(dict(
            name=spec.partition, tier=spec.tier.value,
            nodes=nodes if part.nodes == "ALL" else part.nodes,
            priority_tier=spec.priority_tier, preempt_mode=mode,
            grace_time_s=spec.grace_time_s, max_time=part.max_time,
            default=spec.tier is policy.defaults.tier, gpu_fraction=spec.gpu_fraction,
            preemptible_by=", ".join(t.value for t in spec.preemptible_by)))
    return rows


def render_policy_conf(policy: Policy, nodes: str, source: str = "(policy)") -> str:
    """The slurm.conf fragment: PreemptType, PreemptMode, one partition per
    tier over ``nodes`` (a Slurm node list such as ``n[1-4]``)."""
    rows = _partitions(policy, nodes)
    if policy.elastic.preemption == "daemon":
        # singularity-schedd takes every preemption and shrink itself
        for r in rows:
            r["preempt_mode"] = "OFF"
    modes = {r["preempt_mode"] for r in rows} - {"OFF"}
    return _environment().get_template("policy.conf.j2").render(
        source=source, partitions=rows, policy_sha256=policy.sha256,
        preempt_type="preempt/partition_prio" if modes else "preempt/none",
        preempt_mode="REQUEUE" if "REQUEUE" in modes else ("CANCEL" if modes else "OFF"))


def render_job_submit(policy: Policy, source: str = "(policy)") -> str:
    """job_submit.lua implementing ``rules.decide`` for ``policy``."""
    env_names = {name: getattr(contract, name) for name in
                 ("SLA", "ELASTIC", "WORLD_SIZE", "PREEMPT_SIGNAL", "PROXY", "CKPT_DIR",
                  "DETERMINISTIC")}
    return _environment().get_template("job_submit.lua.j2").render(
        source=source.replace("]]", "] ]"), policy_table=lua_literal(policy_table(policy)),
        policy_sha256=policy.sha256,
        max_count=MAX_COUNT, plugin=contract.SPANK_PLUGIN_NAME, env=env_names,
        tag_prefix=contract.JOB_TAG_PREFIX, transparent_tag=TRANSPARENT_TAG_FIELD)


def associations(policy: Policy, everyone: Sequence[str]
                 ) -> tuple[dict[str, tuple[str, ...]], dict[str, int | None], dict[str, str]]:
    """What slurmdbd must hold for ``policy`` (``SlurmClient.ensure_accounts``'s
    arguments): account -> users (its ``members``, or ``everyone`` when it
    lists none), account -> GrpTRES gres/gpu (its ``gpu_quota``: the GPUs the
    account may hold at once), user -> default account (a member's first
    account in the policy; for ``everyone``, the policy's default account when
    they may use it, else their first account)."""
    members = {name: (acc.members or tuple(everyone)) for name, acc in policy.accounts.items()}
    limits = {name: acc.gpu_quota for name, acc in policy.accounts.items()}
    defaults: dict[str, str] = {}
    preferred = policy.defaults.account
    for name, users in members.items():
        for user in users:
            defaults.setdefault(user, name)
    for user in everyone:
        if preferred is not None and user in members.get(preferred, ()):
            defaults[user] = preferred
    return members, limits, defaults


def render_policy_files(policy: Policy, nodes: str, source: str = "(policy)") -> dict[str, str]:
    """``{"policy.conf": ..., "job_submit.lua": ...}`` for ``policy`` over
    the node list ``nodes``; ``source`` (the policy file's name) goes into
    their header comments. A policy parsed from a file (``source_text``) adds
    ``policy.toml``, its text, and both headers carry its sha256
    (``install.HASH_LINE``): what Slurm enforces names the policy it came from."""
    files = {"policy.conf": render_policy_conf(policy, nodes, source),
             "job_submit.lua": render_job_submit(policy, source)}
    if policy.source_text:
        # the policy itself, beside what it generates: the one live policy
        files[INSTALLED_POLICY] = policy.source_text
    return files


def render_unit(venv: Path, slurm_conf: Path, policy: Path) -> str:
    """The daemon's systemd unit: ``venv``'s singularity-schedd for the
    Slurm of ``slurm_conf``, on the installed ``policy``."""
    return _environment().get_template(f"{UNIT_NAME}.j2").render(
        venv=venv, slurm_conf=slurm_conf, policy=policy)
