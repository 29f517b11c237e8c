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
   ``--transparent`` asks for one node: CRIU dumps one node's process tree
   and a cut across nodes is not implemented, so ``--nodes=N`` (or
   ``MIN-MAX``) with N or MAX above 1 is refused here, at submit, and an
   accepted transparent job is held to one node (``max_nodes = 1``) and its
   tag says so (``transparent=1``: ``singularity-admin status`` marks it).
2. Account: ``--account`` (lower-cased), else the user's default account in
   Slurm (``job_desc.default_account``: the account the job will really run
   under), else the policy's default account; it must be in the policy, and
   when the account lists ``members`` the user must be one of them (Slurm's
   own association check, ``AccountingStorageEnforce=associations``, then
   refuses a user without an association to the account).
3. Tier: ``--sla``, else the tier whose partition ``--partition`` names, else
   the policy's default tier. ``--partition`` must be a policy partition and
   agree with ``--sla``. The tier must be defined and allowed to the account.
4. Devices: GPUs requested ``G`` from the TRES strings, counted on the
   job's largest shape (``-N1-2 --gres=gpu:2`` is 4 GPUs); a job without
   GPUs runs on one device (D=1, the CPU).
5. Elastic range: ``--elastic`` or ``D:D``; D must lie within it.
6. World size: ``--world-size`` or lcm(MIN, MAX, D) (= D when not elastic);
   with ``world_size_multiple_of_devices`` it must be a multiple of MIN, MAX
   and D; W / MIN must not exceed ``max_splice_factor``.
7. Quota: the most GPUs the job may hold (MAX, or G) must not exceed the
   account's ``gpu_quota``. (The quota holds for the account as a whole in
   Slurm itself: ``GrpTRES=gres/gpu=N`` on the account's association.)

A change to a queued or running job (``scontrol update``, job_submit.lua's
``slurm_job_modify``) by anyone but root goes through the same rules:
``decide_change`` merges the change into the job, keeps the tier, elastic
range and world size its tag recorded, and decides the result again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .. import contract
from ..slurm import gres
from ..slurm.admin_comment import AdminComment
from ..slurm.api import SlurmOutputError
from ..transparent.api import TAG_FIELD as TRANSPARENT_TAG_FIELD
from .api import Policy, PreemptMode, Tier

#: Largest value of --world-size and of either end of --elastic. Keeps every
#: number exact in Lua (doubles) and in C (int).
MAX_COUNT = 65536

#: Slurm's "not set" numbers (NO_VAL16, NO_VAL): anything at or above them is unset.
_UNSET_FROM = 65534

# ASCII digits only, whole string (as Lua's %d and the C plugin).
_ELASTIC = re.compile(r"([0-9]{1,6}):([0-9]{1,6})")
_COUNT = re.compile(r"[0-9]{1,6}")


@dataclass(frozen=True)
class Submission:
    """A submission as job_submit.lua sees it. ``None`` = not given."""

    sla: str | None = None
    elastic: str | None = None
    world_size: str | None = None
    ckpt_dir: str | None = None
    proxy: str | None = None
    deterministic: str | None = None
    #: ``--transparent`` given (its value, empty for the bare flag).
    transparent: str | None = None
    account: str | None = None
    partition: str | None = None
    tres_per_job: str | None = None
    tres_per_node: str | None = None
    tres_per_socket: str | None = None
    tres_per_task: str | None = None
    min_nodes: int | None = None
    #: Upper end of ``--nodes=MIN-MAX``; GPUs are counted on it.
    max_nodes: int | None = None
    num_tasks: int | None = None
    sockets_per_node: int | None = None
    #: A batch job (sbatch): job_submit can set its environment.
    batch: bool = True
    #: The submitting user's default account in Slurm (None: unknown or no
    #: accounting): the account a job without ``--account`` runs under.
    default_account: str | None = None
    #: The submitting user's login name (None: unknown; membership unchecked).
    user: str | None = None


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
    #: ``job_desc.max_nodes`` set by job_submit (1 for a transparent job, so
    #: that Slurm never spreads it over nodes); None: left as submitted.
    max_nodes: int | None = None

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


def check_transparent_nodes(sub: Submission) -> None:
    """``--transparent`` on more than one node.

    :raises Rejected: the job may get more than one node, naming
        ``--transparent`` and why.
    """
    nodes = max(_set(sub.max_nodes) or 0, _set(sub.min_nodes) or 0)
    if sub.transparent is not None and nodes > 1:
        raise Rejected("--transparent", f"--transparent with {nodes} nodes: transparent "
                       "mode runs on one node only (CRIU dumps the process tree of one "
                       "node; a consistent cut across nodes is not implemented); submit "
                       "with --nodes=1")


# -- GPUs requested ----------------------------------------------------------

def gpus_in_tres(tres: str | None) -> int:
    """GPUs in a TRES request string (``gres:gpu:4``, ``gres/gpu:4``,
    ``gres:gpu:a100:2,gres:gpu:v100:1``, ``gres:gpu``), read by the one
    GRES/TRES reader, ``slurm/gres.py``.

    :raises Rejected: a spelling it cannot read, naming ``--gres``.
    """
    try:
        return gres.gpus(tres, "--gres")
    except SlurmOutputError as exc:
        raise Rejected("--gres", f"--gres: cannot read {exc.text}: {exc.reason}") from None


def _set(n: int | None) -> int | None:
    return n if n is not None and 1 <= n < _UNSET_FROM else None


def gpus_requested(sub: Submission) -> int:
    """Total GPUs of the job on its largest shape: per job, else per node x
    nodes, else per socket x sockets x nodes, else per task x tasks, where
    nodes is the most the job may get (``--nodes=MIN-MAX``: MAX)."""
    nodes = max(_set(sub.max_nodes) or 0, _set(sub.min_nodes) or 0) or 1
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
    check_transparent_nodes(sub)

    # Account: the one the job will really run under.
    if sub.account:
        account = sub.account.lower()
        label = f"--account={account}"
    elif sub.default_account:
        account = sub.default_account.lower()
        label = f"no --account: your default account {account}"
    elif policy.defaults.account is not None:
        account = policy.defaults.account
        label = f"--account={account}"
    else:
        raise Rejected("--account", "--account is required: the policy has no default account")
    if account not in policy.accounts:
        known = ", ".join(sorted(policy.accounts))
        raise Rejected("--account", f"{label}: not an account of the policy "
                       f"(known: {known})")
    acc = policy.accounts[account]
    if acc.members and sub.user is not None and sub.user not in acc.members:
        raise Rejected("--account", f"{label}: user {sub.user} is not a member of account "
                       f"{account} (the policy's accounts.{account}.members)")

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
                       f"(allowed: {allowed}; the policy's accounts.{account}.tiers)")
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
                       f"has a gpu_quota of {acc.gpu_quota} (accounts.{account}.gpu_quota)")

    tag = contract.format_job_tag(tier.value, (lo, hi), world)
    if sub.transparent is not None:
        tag += "," + TRANSPARENT_TAG_FIELD
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
        world_size=world, tag=tag, env=env if sub.batch else {},
        max_nodes=1 if sub.transparent is not None else None)


# -- a change to an existing job (scontrol update) ----------------------------

#: Fields of a change that replace the job's own when given.
_CHANGEABLE = ("tres_per_job", "tres_per_node", "tres_per_socket", "tres_per_task",
               "min_nodes", "max_nodes", "num_tasks", "sockets_per_node")


def _given(value: str | int | None) -> str | int | None:
    """A change's field, None when not given (unset number, empty string)."""
    if isinstance(value, int):
        return _set(value)
    return value or None


def decide_change(policy: Policy, job: Submission, change: Submission,
                  tag: str | None, uid: int) -> Rejection | None:
    """Whether user ``uid`` may apply ``change`` (what ``scontrol update``
    sets; None = unchanged) to ``job`` (the job as Slurm holds it, with its
    owner as ``user`` and its options as submitted) whose AdminComment is
    ``tag``. None = allowed. Pure.

    Root (the scheduler daemon, an admin) may change anything. Anyone else:
    the partition is the tier's and may not change; the job keeps the tier,
    elastic range and world size of its tag (when it has one) and the result
    is decided by the submission rules again, so its new shape must lie in the
    elastic range, fit the world size and the account's quota, and a new
    account must allow the tier and have the owner as a member.
    """
    if uid == 0:
        return None
    if change.partition and change.partition != job.partition:
        result: Decision | Rejection = Rejected(
            "--partition", f"--partition={change.partition}: the partition follows the "
            "tier; resubmit with --sla instead").rejection
    else:
        result = decide(policy, _merged(job, change, tag))
    if isinstance(result, Rejection):
        return Rejection(result.option, result.message.replace(
            "singularity: ", "singularity: job update refused: ", 1))
    return None


def _recorded_tag(tag: str | None) -> contract.JobTag | None:
    """The job tag in a job's AdminComment, marks and all (the daemon's
    ``unsignalled`` too, which the tag's own parser refuses); one whose marks
    do not parse is still read for its tag fields, as job_submit.lua reads
    the tag's prefix alone; None when there is no readable tag."""
    if tag is None:
        return None
    try:
        return AdminComment.parse(tag).job_tag
    except SlurmOutputError:
        pass
    try:
        return contract.parse_job_tag(tag)
    except contract.ContractError:
        return None


def _merged(job: Submission, change: Submission, tag: str | None) -> Submission:
    """``job`` with ``change`` applied, its tag's options in force."""
    merged = {k: (_given(getattr(change, k)) if _given(getattr(change, k)) is not None
                  else getattr(job, k)) for k in _CHANGEABLE}
    recorded = _recorded_tag(tag)
    options = dict(sla=job.sla, elastic=job.elastic, world_size=job.world_size,
                   partition=job.partition)
    if recorded is not None:
        lo, hi = recorded.elastic
        options = dict(sla=recorded.sla, elastic=f"{lo}:{hi}",
                       world_size=str(recorded.world_size), partition=None)
    return Submission(
        **options, **merged, ckpt_dir=job.ckpt_dir, proxy=job.proxy,
        deterministic=job.deterministic, transparent=job.transparent, account=change.account or job.account,
        user=job.user, batch=False)
