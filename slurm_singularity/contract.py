"""The contract that the SPANK plugin, job_submit.lua, the runtime, the proxy
and the scheduler daemon agree on: environment variable names, exit codes and
file names.

This is the one module that reads the process environment. Every variable has
one typed accessor that says who sets it and what its default is, so that no
other module calls ``os.environ`` for a contract variable. Subsystems that must
not import each other (``runtime``, ``sched``, ``proxy``) meet here.
"""

from __future__ import annotations

import os
import signal as _signal
from dataclasses import dataclass, field
from typing import Mapping

#: Exit code with which the runtime asks Slurm to requeue the job after it
#: wrote a consistent checkpoint (EX_TEMPFAIL). slurm.conf lists it in
#: ``RequeueExit`` so that Slurm requeues such a batch job by itself.
REQUEUE_EXIT_CODE = 75

#: Name of the SPANK plugin; job_submit.lua sees its options as
#: ``_SLURM_SPANK_OPTION_singularity_<name>`` in ``job_desc.spank_job_env``.
SPANK_PLUGIN_NAME = "singularity"

# Environment variables. Set by the SPANK plugin in the job's environment
# (from --sla, --elastic, --world-size, ...), or by singularity-run outside
# Slurm, or by a user by hand.
SLA = "SINGULARITY_SLA"
ELASTIC = "SINGULARITY_ELASTIC"            # "MIN:MAX" devices
WORLD_SIZE = "SINGULARITY_WORLD_SIZE"      # logical data-parallel ranks W
CKPT_DIR = "SINGULARITY_CKPT_DIR"          # checkpoint directory of the job
PREEMPT_SIGNAL = "SINGULARITY_PREEMPT_SIGNAL"  # e.g. "USR1" or "TERM"
DETERMINISTIC = "SINGULARITY_DETERMINISTIC"    # "1" or "0"
PROXY = "SINGULARITY_PROXY"                # "on" or "off"
PROXY_ADDRS = "SINGULARITY_PROXY_ADDRS"    # comma list of proxy socket paths
PROXY_JOB = "SINGULARITY_PROXY_JOB"        # name workers attach to their proxy under
WORKER_DEVICE = "SINGULARITY_WORKER_DEVICE"  # torch device of a worker ("meta": its proxy)
PROXY_RING_BYTES = "SINGULARITY_PROXY_RING_BYTES"  # size of each proxy shared ring
PROXY_STATE = "SINGULARITY_PROXY_STATE"    # directory of the step's proxies (SPANK)
DEVICES = "SINGULARITY_DEVICES"            # devices D the launcher uses
STATE_DIR = "SINGULARITY_STATE_DIR"        # local cluster state directory
DEVICE_RANK = "SINGULARITY_DEVICE_RANK"    # this worker's device index (runtime)
CKPT_EVERY_S = "SINGULARITY_CKPT_EVERY_S"  # periodic checkpoint every T seconds
CKPT_DELAY_S = "SINGULARITY_CKPT_DELAY_S"  # TESTING KNOB: slow checkpoint writes
MIGRATION_COPY_DELAY_S = "SINGULARITY_MIGRATION_COPY_DELAY_S"  # TESTING KNOB: slow copies
PROGRESS_FD = "SINGULARITY_PROGRESS_FD"    # launcher pipe for worker progress
CKPT_KEY = "SINGULARITY_CKPT_KEY"          # file of the key that signs checkpoints
CKPT_ACCEPT_UNSIGNED = "SINGULARITY_CKPT_ACCEPT_UNSIGNED"  # "1": restore unsigned ones
RENDEZVOUS_TIMEOUT_S = "SINGULARITY_RENDEZVOUS_TIMEOUT_S"  # bound of the devices' rendezvous

ALL_VARIABLES: tuple[str, ...] = (
    SLA, ELASTIC, WORLD_SIZE, CKPT_DIR, PREEMPT_SIGNAL, DETERMINISTIC,
    PROXY, PROXY_ADDRS, DEVICES, STATE_DIR, DEVICE_RANK, CKPT_EVERY_S,
    CKPT_DELAY_S, PROGRESS_FD, PROXY_JOB, WORKER_DEVICE, PROXY_RING_BYTES, PROXY_STATE,
    CKPT_KEY, CKPT_ACCEPT_UNSIGNED, RENDEZVOUS_TIMEOUT_S, MIGRATION_COPY_DELAY_S,
)

#: Module a launcher runs a worker under (``python -m PROXY_WORKER_MODULE
#: SCRIPT ARGS``) when the job's device proxy is on: it attaches the worker to
#: its device's proxy and runs SCRIPT with the proxy as the worker's device.
PROXY_WORKER_MODULE = "slurm_singularity.proxy.worker"


class ContractError(ValueError):
    """A contract variable holds a value that cannot be parsed; the message
    names the variable."""


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _get(name: str, environ: Mapping[str, str] | None) -> str | None:
    value = _env(environ).get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


#: Largest world size W and largest count of devices per node a job may
#: ask for (a launcher forks one worker per device of its node).
MAX_WORLD_SIZE = 1 << 20
MAX_DEVICES_PER_NODE = 1024
#: Largest periodic-checkpoint interval, seconds (a week).
MAX_CKPT_EVERY_S = 7 * 86400.0


def _int(name: str, environ: Mapping[str, str] | None, minimum: int = 1,
         maximum: int = 1 << 62) -> int | None:
    """The variable as an integer in ``[minimum, maximum]``; None when unset.

    :raises ContractError: names the variable.
    """
    raw = _get(name, environ)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ContractError(f"{name}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise ContractError(f"{name}={raw[:40]!r} must be between {minimum} and {maximum}")
    return value


def sla(environ: Mapping[str, str] | None = None) -> str | None:
    """Tier of the job (``--sla``); set by the SPANK plugin. Default: none
    (the policy's default tier applies)."""
    return _get(SLA, environ)


def elastic(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """Elastic range ``MIN:MAX`` devices (``--elastic``); set by the SPANK
    plugin. Default: none (not elastic).

    :raises ContractError: the value is not ``MIN:MAX`` with 1 <= MIN <= MAX.
    """
    raw = _get(ELASTIC, environ)
    if raw is None:
        return None
    lo, sep, hi = raw.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi)
    except ValueError:
        raise ContractError(f"{ELASTIC}={raw!r} is not MIN:MAX") from None
    if not sep or lo_i < 1 or hi_i < lo_i:
        raise ContractError(f"{ELASTIC}={raw!r} needs 1 <= MIN <= MAX")
    return lo_i, hi_i


def world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """Logical ranks W (``--world-size``); set by the SPANK plugin or
    singularity-run. Default: none (the devices requested).

    :raises ContractError: not a positive integer.
    """
    return _int(WORLD_SIZE, environ, maximum=MAX_WORLD_SIZE)


def devices(environ: Mapping[str, str] | None = None) -> int | None:
    """Devices D to run on (``singularity-run --devices``). Default: none
    (count of ``CUDA_VISIBLE_DEVICES``, else 1).

    :raises ContractError: not a positive integer.
    """
    return _int(DEVICES, environ, maximum=MAX_DEVICES_PER_NODE)


def preempt_signals(environ: Mapping[str, str] | None = None) -> frozenset[_signal.Signals]:
    """Signals that ask the job to checkpoint and exit: ``preempt_signal()``
    and always SIGTERM, which Slurm sends at preemption to a job that did
    not ask for a signal of its own (and at scancel and the time limit,
    where a checkpoint saves the work too).

    :raises ContractError: as ``preempt_signal``.
    """
    return frozenset({preempt_signal(environ), _signal.SIGTERM})


def ckpt_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """Checkpoint directory (``--ckpt-dir``); set by the SPANK plugin.
    Default: none (the runtime picks one from the job id)."""
    return _get(CKPT_DIR, environ)


def preempt_signal(environ: Mapping[str, str] | None = None) -> _signal.Signals:
    """Signal that asks the job to checkpoint and exit; set by the SPANK
    plugin from the policy. Default: SIGTERM (what Slurm sends at preemption).

    :raises ContractError: not a known signal name or number.
    """
    raw = _get(PREEMPT_SIGNAL, environ)
    if raw is None:
        return _signal.SIGTERM
    return parse_signal(raw, PREEMPT_SIGNAL)


def parse_signal(raw: str, field: str) -> _signal.Signals:
    """``USR1``, ``SIGUSR1`` or ``10`` -> ``signal.SIGUSR1``.

    :raises ContractError: names ``field``.
    """
    text = raw.strip().upper()
    if text.isdigit():
        try:
            return _signal.Signals(int(text))
        except ValueError:
            raise ContractError(f"{field}={raw!r} is not a signal") from None
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return _signal.Signals[text]
    except KeyError:
        raise ContractError(f"{field}={raw!r} is not a signal") from None


def deterministic(environ: Mapping[str, str] | None = None) -> bool:
    """Deterministic reduction order (bitwise-equal results for every D).
    Set by a user or singularity-run. Default: on."""
    raw = _get(DETERMINISTIC, environ)
    return raw is None or raw not in ("0", "off", "false", "no")


def proxy_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Route device work through a device proxy (``--proxy``); set by the
    SPANK plugin. Default: off."""
    return _get(PROXY, environ) in ("on", "1", "true", "yes")


def proxy_addrs(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Socket paths of this step's device proxies, one per device; set by the
    SPANK plugin or singularity-run. Default: none."""
    raw = _get(PROXY_ADDRS, environ)
    return tuple(a for a in (raw or "").split(",") if a)


def cuda_visible_devices(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Devices Slurm allocated to the job (``CUDA_VISIBLE_DEVICES``); set by
    slurmd from gres. Default: none."""
    raw = _get("CUDA_VISIBLE_DEVICES", environ)
    return tuple(d for d in (raw or "").split(",") if d)


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """``SLURM_JOB_ID``; set by Slurm. Default: none (not under Slurm)."""
    return _get("SLURM_JOB_ID", environ)


def slurm_conf(environ: Mapping[str, str] | None = None) -> str | None:
    """``SLURM_CONF``: which slurm.conf the Slurm commands read; set by
    ``eval $(singularity-admin cluster env)``. Default: Slurm's own."""
    return _get("SLURM_CONF", environ)


def state_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """Local cluster state directory; set by a user or the tests.
    Default: none (``.state/cluster`` in the repository)."""
    return _get(STATE_DIR, environ)


# Job tag: what job_submit.lua records in the job's AdminComment so that the
# scheduler daemon and `scontrol show job` see the job's resolved tier,
# elastic range and world size (users cannot change AdminComment).
# Format: "singularity:sla=basic,elastic=2:8,ws=8" - the prefix, then
# comma-separated key=value pairs in this order; unknown keys are ignored by
# parse_job_tag so later versions may append more.

#: Prefix of the job tag in ``AdminComment``.
JOB_TAG_PREFIX = "singularity:"


@dataclass(frozen=True)
class JobTag:
    """The job tag as a typed record: the job's resolved tier (``sla``),
    elastic range in devices (MIN, MAX) and world size. The daemon appends
    its marks after it; a job's whole AdminComment, tag and marks, is read
    as one record by ``slurm/admin_comment.py``, which calls this parser
    for the tag.
    ``extra`` holds any other ``key=value`` fields, verbatim."""

    sla: str
    elastic: tuple[int, int]
    world_size: int
    extra: Mapping[str, str] = field(default_factory=dict, compare=False)

    def render(self) -> str:
        """``"singularity:sla=basic,elastic=2:8,ws=8"`` (without ``extra``)."""
        lo, hi = self.elastic
        return f"{JOB_TAG_PREFIX}sla={self.sla},elastic={lo}:{hi},ws={self.world_size}"


def format_job_tag(sla: str, elastic: tuple[int, int], world: int) -> str:
    """``("basic", (2, 8), 8)`` -> ``"singularity:sla=basic,elastic=2:8,ws=8"``."""
    return JobTag(sla, elastic, world).render()


def _brief(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters: a
    tag is the job's, and a 100 KB one must not make a 200 KB message."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_job_tag(text: str | None) -> JobTag | None:
    """Inverse of ``JobTag.render``; None if ``text`` is not a job tag
    (another AdminComment, or none: the job was not submitted through
    job_submit.lua). Fields after the tag's own (the daemon's marks) are
    kept in ``extra``.

    :raises ContractError: a job tag with a malformed or missing field (the
        message quotes at most a few dozen characters of it).
    """
    text = (text or "").strip()
    if not text.startswith(JOB_TAG_PREFIX):
        return None
    fields: dict[str, str] = {}
    for item in text[len(JOB_TAG_PREFIX):].split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ContractError(f"job tag {_brief(text)}: field {_brief(item)} is not key=value")
        fields[key] = value
    try:
        sla = fields.pop("sla")
        lo_hi = elastic({ELASTIC: fields.pop("elastic")[:40]})
        world = _int(WORLD_SIZE, {WORLD_SIZE: fields.pop("ws")[:40]})
    except KeyError as exc:
        raise ContractError(f"job tag {_brief(text)}: missing field {exc.args[0]!r}") from None
    except ContractError as exc:
        raise ContractError(f"job tag {_brief(text)}: {exc}") from None
    if lo_hi is None or world is None:
        raise ContractError(f"job tag {_brief(text)}: elastic and ws must not be empty")
    return JobTag(sla, lo_hi, world, fields)


# --- runtime (singularity-run and its workers) ---------------------------


def _nonneg_float(name: str, environ: Mapping[str, str] | None,
                  maximum: float = 1e9) -> float | None:
    """The variable as a finite number in ``[0, maximum]``; None when unset.

    :raises ContractError: names the variable (NaN and infinities too).
    """
    raw = _get(name, environ)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ContractError(f"{name}={raw[:40]!r} is not a number") from None
    if not 0 <= value <= maximum:
        raise ContractError(f"{name}={raw[:40]!r} must be a number between 0 and {maximum:g}")
    return value


def device_rank(environ: Mapping[str, str] | None = None) -> int:
    """Index of this worker's device among the job's D devices; set by
    singularity-run for each worker. Default: 0 (a lone worker).

    :raises ContractError: not an integer >= 0.
    """
    value = _int(DEVICE_RANK, environ, minimum=0)
    return 0 if value is None else value


def ckpt_every_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Periodic checkpoint every T seconds of training; set by a user or
    singularity-run ``--ckpt-every-s``. Default: none (only every N steps,
    at preemption and at the end).

    :raises ContractError: not a number >= 0.
    """
    value = _nonneg_float(CKPT_EVERY_S, environ, maximum=MAX_CKPT_EVERY_S)
    return value or None


def ckpt_delay_s(environ: Mapping[str, str] | None = None) -> float:
    """TESTING KNOB, never for production: seconds every checkpoint write
    sleeps after streaming its payload into the temporary file and before
    the trailer and fsync, so that a test can
    kill a worker mid-write or show a checkpoint that misses Slurm's grace
    time. Set by tests. Default: 0.

    :raises ContractError: not a number >= 0.
    """
    return _nonneg_float(CKPT_DELAY_S, environ) or 0.0


def migration_copy_delay_s(environ: Mapping[str, str] | None = None) -> float:
    """TESTING KNOB, never for production: seconds a migration's checkpoint
    copy sleeps between copying into its temporary directory and verifying
    and renaming it, so that a test can kill the placer mid-copy. Set by
    tests in the placer's environment. Default: 0.

    :raises ContractError: not a number >= 0.
    """
    return _nonneg_float(MIGRATION_COPY_DELAY_S, environ) or 0.0


def ckpt_key_file(environ: Mapping[str, str] | None = None) -> str | None:
    """File holding the key that signs and verifies this user's checkpoints
    (32 random bytes, mode 0600, owned by the user; created on first use).
    Set by a user whose home is not shared by every node. Default: none
    (``~/.config/slurm-singularity/ckpt.key``)."""
    return _get(CKPT_KEY, environ)


def ckpt_accept_unsigned(environ: Mapping[str, str] | None = None) -> bool:
    """Restore checkpoints written before checkpoints were signed (formats
    02 and 03), which cannot be told apart from planted ones. Set by a user,
    once, to resume a job across the upgrade. Default: off (refused).

    :raises ContractError: not one of 1/0, on/off, true/false, yes/no.
    """
    raw = _get(CKPT_ACCEPT_UNSIGNED, environ)
    if raw is None:
        return False
    if raw.lower() in ("1", "on", "true", "yes"):
        return True
    if raw.lower() in ("0", "off", "false", "no"):
        return False
    raise ContractError(f"{CKPT_ACCEPT_UNSIGNED}={raw!r}: expected 1 or 0")


def progress_fd(environ: Mapping[str, str] | None = None) -> int | None:
    """File descriptor of the pipe on which worker 0 reports progress (steps,
    checkpoints) to singularity-run, which writes ``history.jsonl``; set by
    singularity-run. Default: none (the worker writes history itself).

    :raises ContractError: not an integer >= 0.
    """
    return _int(PROGRESS_FD, environ, minimum=0)


#: Default and bounds of ``rendezvous_timeout_s`` (seconds).
RENDEZVOUS_TIMEOUT_DEFAULT_S = 120.0
RENDEZVOUS_TIMEOUT_BOUNDS_S = (1.0, 3600.0)


def rendezvous_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds the devices of a job wait for each other when they start
    (device 0's TCP store, the process group): a rendezvous that has not
    completed by then fails the step and asks for a requeue. Set by a user
    or the site. Default: 120; range 1..3600.

    :raises ContractError: not a number in the range.
    """
    value = _nonneg_float(RENDEZVOUS_TIMEOUT_S, environ)
    if value is None:
        return RENDEZVOUS_TIMEOUT_DEFAULT_S
    low, high = RENDEZVOUS_TIMEOUT_BOUNDS_S
    if not low <= value <= high:
        raise ContractError(f"{RENDEZVOUS_TIMEOUT_S}={value:g} must be between "
                            f"{low:g} and {high:g} seconds")
    return value


def slurm_step_nodelist(environ: Mapping[str, str] | None = None) -> str | None:
    """``SLURM_STEP_NODELIST`` (compressed host list of this srun step, whose
    first host is node 0 of the step); set by Slurm. Default: none."""
    return _get("SLURM_STEP_NODELIST", environ)


def slurm_nodeid(environ: Mapping[str, str] | None = None) -> int:
    """``SLURM_NODEID``: this node's index in the job step; set by Slurm.
    Default: 0.

    :raises ContractError: not an integer >= 0.
    """
    value = _int("SLURM_NODEID", environ, minimum=0)
    return 0 if value is None else value


def slurm_nnodes(environ: Mapping[str, str] | None = None) -> int:
    """``SLURM_NNODES``: nodes of the job step; set by Slurm. Default: 1.

    :raises ContractError: not a positive integer.
    """
    value = _int("SLURM_NNODES", environ)
    return 1 if value is None else value


def slurm_job_nodelist(environ: Mapping[str, str] | None = None) -> str | None:
    """``SLURM_JOB_NODELIST`` (compressed host list); set by Slurm.
    Default: none."""
    return _get("SLURM_JOB_NODELIST", environ)


def slurm_submit_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """``SLURM_SUBMIT_DIR``: where sbatch ran; set by Slurm. Default: none."""
    return _get("SLURM_SUBMIT_DIR", environ)


def master_addr(environ: Mapping[str, str] | None = None) -> str | None:
    """``MASTER_ADDR``: host of device 0 for torch.distributed; set by a
    user for multi-node runs or by singularity-run. Default: none."""
    return _get("MASTER_ADDR", environ)


def proxy_job(environ: Mapping[str, str] | None = None) -> str | None:
    """Name under which a job's workers attach to their proxies (state named
    in a proxy belongs to it); set by singularity-run or the SPANK plugin.
    Default: none (``SLURM_JOB_ID``, else ``local``)."""
    return _get(PROXY_JOB, environ)


def proxy_ring_bytes(environ: Mapping[str, str] | None = None) -> int | None:
    """Bytes of each shared-memory ring between a worker and its device
    proxy (a power of two >= 4096, checked by the proxy). Default: none,
    the proxy's own (4 MiB)."""
    return _int(PROXY_RING_BYTES, environ)


def worker_device(environ: Mapping[str, str] | None = None) -> str | None:
    """Torch device a worker computes on, when something other than the
    runtime's own choice: ``meta`` means the worker's device proxy (set by
    the proxy's worker entry, ``PROXY_WORKER_MODULE``). Default: none."""
    return _get(WORKER_DEVICE, environ)
