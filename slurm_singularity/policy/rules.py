"""What the policy does with one submission: the rules of job_submit.lua,
written once as pure Python.

Why it exists: job_submit.lua runs inside slurmctld, where it cannot be
unit-tested or explained. These rules are the reference; the Lua that
``render.py`` generates implements exactly the same steps in the same order
with the same messages, and tests run one table of submissions through both
(``tests/policy``). ``singularity-admin job explain`` calls ``decide``.

Input is what job_submit.lua sees (``Submission``): the SPANK option strings
as the user typed them, the account and partition strings, and Slurm's TRES
request strings (``gres:gpu:4``). Output is a ``Decision`` or a
``Rejection`` whose message names the option and the rule.

Rules, in order (the first that fails rejects the job):

1. Option syntax: ``--sla`` a tier name, ``--elastic`` ``MIN:MAX`` whole
   numbers with 1 <= MIN <= MAX <= 65536, ``--world-size`` 1..65536,
   ``--proxy`` and ``--deterministic`` on|off, ``--ckpt-dir`` an absolute path.
2. Account: ``--account`` (lower-cased) or the policy's default account; it
   must be in the policy.
3. Tier: ``--sla``, else the tier whose partition ``--partition`` names, else
   the policy's default tier. ``--partition`` must be a policy partition and
   agree with ``--sla``. The tier must be defined and allowed to the account.
4. Devices: GPUs requested ``G`` from the TRES strings; a job without GPUs
   runs on one device (D=1, the CPU).
5. Elastic range: ``--elastic`` or ``D:D``; D must lie within it.
6. World size: ``--world-size`` or lcm(MIN, MAX, D) (= D when not elastic);
   with ``world_size_multiple_of_devices`` it must be a multiple of MIN, MAX
   and D; W / MIN must not exceed ``max_splice_factor``.
7. Quota: the most GPUs the job may hold (MAX, or G) must not exceed the
   account's ``gpu_quota``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .. import contract
from .api import Policy, PreemptMode, Tier

#: Largest value of --world-size and of either end of --elastic. Keeps every
#: number exact in Lua (doubles) and in C (int).
MAX_COUNT = 65536

#: Slurm's "not set" numbers (NO_VAL16, NO_VAL): anything at or above them is unset.
_UNSET_FROM = 65534

# ASCII digits only, whole string (as Lua's %d and the C plugin).
_ELASTIC = re.compile(r"([0-9]{1,6}):([0-9]{1,6})")
_COUNT = re.compile(r"[0-9]{1,6}")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Submission:
    """A submission as job_submit.lua sees it. ``None`` = not given."""

    sla: str | None = None
    elastic: str | None = None
    world_size: str | None = None
    ckpt_dir: str | None = None
    proxy: str | None = None
    deterministic: str | None = None
    account: str | None = None
    partition: str | None = None
    tres_per_job: str | None = None
    tres_per_node: str | None = None
    tres_per_socket: str | None = None
    tres_per_task: str | None = None
    min_nodes: int | None = None
    num_tasks: int | None = None
    sockets_per_node: int | None = None
    #: A batch job (sbatch): job_submit can set its environment.
    batch: bool = True


@dataclass(frozen=True)
class Rejection:
    """The job is refused; ``message`` is what sbatch prints."""

    option: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What job_submit does with an accepted job."""

    tier: Tier
    account: str
    partition: str
    #: job_desc.requeue: 1 unless the tier's preempt mode is ``cancel``.
    requeue: bool
    preemptible: bool
    #: Signal the runtime treats as "checkpoint now" (SINGULARITY_PREEMPT_SIGNAL).
    signal: str
    grace_time_s: int
    #: GPUs requested (0 = a CPU-only job).
    gpus: int
    #: Devices the job starts on.
    devices: int
    elastic: tuple[int, int]
    world_size: int
    #: ``job_desc.admin_comment`` (contract.format_job_tag).
    tag: str
    #: SINGULARITY_* defaults set in a batch job's environment.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def device_counts(self) -> tuple[int, ...]:
        """Device counts D in the elastic range that divide W: where the job may run."""
        lo, hi = self.elastic
        return tuple(d for d in range(lo, hi + 1) if self.world_size % d == 0)


class Rejected(Exception):
    """Internal: carries a Rejection out of the rule steps."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.rejection = Rejection(option, "singularity: " + message)


# -- option syntax (the SPANK plugin checks the same at sbatch time) -------

def parse_sla(text: str) -> Tier:
    """:raises Rejected: not premium, standard or basic."""
    try:
        return Tier(text)
    except ValueError:
        raise Rejected("--sla", f"--sla={text}: unknown tier "
                       "(expected premium, standard or basic)") from None


def parse_elastic(text: str) -> tuple[int, int]:
    """``MIN:MAX`` -> (MIN, MAX). :raises Rejected: bad syntax or range."""
    m = _ELASTIC.fullmatch(text)
    if not m:
        raise Rejected("--elastic", f"--elastic={text}: expected MIN:MAX devices, "
                       "two whole numbers such as 2:8")
    lo, hi = int(m.group(1)), int(m.group(2))
    if lo < 1 or hi > MAX_COUNT:
        raise Rejected("--elastic", f"--elastic={text}: MIN and MAX must lie in 1..{MAX_COUNT}")
    if lo > hi:
        raise Rejected("--elastic", f"--elastic={text}: MIN must not exceed MAX")
    return lo, hi


def parse_world_size(text: str) -> int:
    """:raises Rejected: not a whole number in 1..MAX_COUNT."""
    if not _COUNT.fullmatch(text) or not 1 <= int(text) <= MAX_COUNT:
        raise Rejected("--world-size", f"--world-size={text}: expected a whole number "
                       f"in 1..{MAX_COUNT}")
    return int(text)


def parse_on_off(option: str, text: str) -> str:
    """``--proxy``, ``--deterministic``. :raises Rejected: not on or off."""
    if text not in ("on", "off"):
        raise Rejected(option, f"{option}={text}: expected on or off")
    return text


def parse_ckpt_dir(text: str) -> str:
    """:raises Rejected: not an absolute path, or holds a comma or newline."""
    if not text.startswith("/") or any(c in text for c in ",\n"):
        raise Rejected("--ckpt-dir", f"--ckpt-dir={text}: expected an absolute path "
                       "without commas")
    return text


# -- GPUs requested ----------------------------------------------------------

def gpus_in_tres(tres: str | None) -> int:
    """GPUs in a TRES request string: ``gres:gpu:4`` / ``gres/gpu:4`` -> 4,
    ``gres:gpu:a100:2,gres:gpu:v100:1`` -> 3, ``gres:gpu`` -> 1, none -> 0."""
    total = 0
    for entry in (tres or "").split(","):
        parts = entry.strip().replace("gres/", "gres:").split(":")
        if parts and parts[0] == "gres":
            parts = parts[1:]
        if not parts or parts[0] != "gpu":
            continue
        last = parts[-1]
        total += int(last) if len(parts) > 1 and _DIGITS.fullmatch(last) else 1
    return total


def _set(n: int | None) -> int | None:
    return n if n is not None and 1 <= n < _UNSET_FROM else None


def gpus_requested(sub: Submission) -> int:
    """Total GPUs of the job: per job, else per node x nodes, else per
    socket x sockets x nodes, else per task x tasks."""
    nodes = _set(sub.min_nodes) or 1
    if (g := gpus_in_tres(sub.tres_per_job)) > 0:
        return g
    if (g := gpus_in_tres(sub.tres_per_node)) > 0:
        return g * nodes
    if (g := gpus_in_tres(sub.tres_per_socket)) > 0:
        return g * (_set(sub.sockets_per_node) or 1) * nodes
    if (g := gpus_in_tres(sub.tres_per_task)) > 0:
        return g * (_set(sub.num_tasks) or 1)
    return 0


# -- the decision ------------------------------------------------------------

def decide(policy: Policy, sub: Submission) -> Decision | Rejection:
    """Apply the rules (module docstring) to ``sub``. Pure."""
    try:
        return _decide(policy, sub)
    except Rejected as exc:
        return exc.rejection


def _decide(policy: Policy, sub: Submission) -> Decision:
    sla = parse_sla(sub.sla) if sub.sla is not None else None
    elastic = parse_elastic(sub.elastic) if sub.elastic is not None else None
    world = parse_world_size(sub.world_size) if sub.world_size is not None else None
    proxy = parse_on_off("--proxy", sub.proxy) if sub.proxy is not None else None
    determ = (parse_on_off("--deterministic", sub.deterministic)
              if sub.deterministic is not None else None)
    ckpt = parse_ckpt_dir(sub.ckpt_dir) if sub.ckpt_dir is not None else None

    # Account.
    if sub.account:
        account = sub.account.lower()
    elif policy.defaults.account is not None:
        account = policy.defaults.account
    else:
        raise Rejected("--account", "--account is required: the policy has no default account")
    if account not in policy.accounts:
        known = ", ".join(sorted(policy.accounts))
        raise Rejected("--account", f"--account={account}: not an account of the policy "
                       f"(known: {known})")
    acc = policy.accounts[account]

    # Tier.
    tier = sla
    if sub.partition:
        ptier = policy.tier_of_partition(sub.partition)
        if ptier is None:
            raise Rejected("--partition", f"--partition={sub.partition}: not a partition of "
                           "the policy; choose the tier with --sla")
        if tier is not None and tier is not ptier:
            raise Rejected("--partition", f"--partition={sub.partition} is tier "
                           f"{ptier.value}, which contradicts --sla={tier.value}")
        tier = ptier
    if tier is None:
        tier = policy.defaults.tier
        how = f"the default tier {tier.value}"
    else:
        how = f"--sla={tier.value}"
    if tier not in policy.tiers:
        raise Rejected("--sla", f"{how}: this cluster's policy offers no such tier")
    if tier not in acc.tiers:
        allowed = ", ".join(t.value for t in acc.tiers)
        raise Rejected("--sla", f"{how}: account {account} may not use this tier "
                       f"(allowed: {allowed})")
    spec = policy.tiers[tier]

    # Devices and elastic range.
    gpus = gpus_requested(sub)
    devices = gpus if gpus > 0 else 1
    lo, hi = elastic if elastic is not None else (devices, devices)
    if not lo <= devices <= hi:
        raise Rejected("--elastic", f"--elastic={lo}:{hi}: the job asks for {gpus} GPUs "
                       f"(--gres=gpu:N or --gpus=N), which must lie within {lo}..{hi}")

    # World size.
    rules = policy.elastic
    if world is None:
        world = math.lcm(lo, hi, devices)
        if world > MAX_COUNT:
            raise Rejected("--world-size", f"no --world-size given and the default "
                           f"lcm({lo}, {hi}, {devices}) = {world} exceeds {MAX_COUNT}")
    if rules.world_size_multiple_of_devices:
        for d in (lo, hi, devices):
            if world % d != 0:
                raise Rejected("--world-size", f"--world-size={world}: must be a multiple "
                               f"of {d} (the job may run on {lo} to {hi} devices and asks "
                               f"for {devices})")
    if world > lo * rules.max_splice_factor:
        raise Rejected("--world-size", f"--world-size={world}: on {lo} devices each would "
                       f"run more than {rules.max_splice_factor} ranks (the policy's "
                       "max_splice_factor)")

    # Quota.
    most = max(hi, gpus)
    if acc.gpu_quota is not None and gpus > 0 and most > acc.gpu_quota:
        raise Rejected("--gres", f"the job may hold {most} GPUs but account {account} "
                       f"has a gpu_quota of {acc.gpu_quota}")

    tag = contract.format_job_tag(tier.value, (lo, hi), world)
    env = {contract.SLA: tier.value, contract.ELASTIC: f"{lo}:{hi}",
           contract.WORLD_SIZE: str(world), contract.PREEMPT_SIGNAL: spec.signal,
           contract.PROXY: proxy or "off"}
    if ckpt is not None:
        env[contract.CKPT_DIR] = ckpt
    if determ is not None:
        env[contract.DETERMINISTIC] = determ
    return Decision(
        tier=tier, account=account, partition=spec.partition,
        requeue=spec.preempt_mode is not PreemptMode.CANCEL,
        preemptible=policy.preemptible(tier), signal=spec.signal,
        grace_time_s=spec.grace_time_s, gpus=gpus, devices=devices, elastic=(lo, hi),
        world_size=world, tag=tag, env=env if sub.batch else {})
