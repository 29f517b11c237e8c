"""The launcher behind ``singularity-run``: one per node, one worker per device.

Why a separate launcher process: it outlives its workers, so it is the one
that sees how a run ended (all workers exited 75 after a consistent
checkpoint, or one died with ``kill -9``), returns the right exit code to
Slurm, forwards the preemption signal, and appends the run's record to
``history.jsonl`` from the progress worker 0 reports on a pipe.

Deciding is apart from doing: ``resolve()`` turns arguments and the contract
variables into a ``LaunchSpec`` (pure, raises ``RuntimeSetupError``);
``launch()`` starts and watches the processes.

Multi-node under ``srun`` (one launcher per node): node rank and node count
come from ``SLURM_NODEID``/``SLURM_NNODES``, ``D = nodes x devices per
node``, device 0's host is ``MASTER_ADDR`` or the ``NodeAddr`` Slurm gives
for the first node of the step (``device0_address``), the port is derived
from the job id. The devices' rendezvous is bounded
(``contract.rendezvous_timeout_s``) and gives way to a preemption signal:
see ``runtime.job``.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import runpy
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Mapping

from slurm_singularity import contract
from slurm_singularity.runtime.api import (
    CheckpointError, JobShape, RuntimeSetupError, StopReason,
)
from slurm_singularity.runtime import ckptdir
from slurm_singularity.runtime.history import RunProgress, record_run

if TYPE_CHECKING:
    from slurm_singularity.slurm.api import SlurmClient

log = logging.getLogger(__name__)

#: Seconds the launcher waits for the other workers once one has exited
#: (normally they agreed on the same step and exit within a step).
PEER_EXIT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LaunchSpec:
    """What to start on this node.

    devices_per_node: workers on this node; nnodes x devices_per_node = D.
    visible: CUDA device ids, one per worker; () for emulated CPU devices.
    """

    script: str
    args: tuple[str, ...]
    world_size: int
    devices_per_node: int
    ckpt_dir: Path
    nnodes: int = 1
    node_rank: int = 0
    visible: tuple[str, ...] = ()
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    deterministic: bool = True
    ckpt_every_s: float | None = None

    def __post_init__(self) -> None:
        JobShape(self.world_size, self.devices)  # validates W, D
        if not 0 <= self.node_rank < self.nnodes:
            raise RuntimeSetupError(f"node rank {self.node_rank} not in [0, {self.nnodes})")
        if self.visible and len(self.visible) != self.devices_per_node:
            raise RuntimeSetupError(
                f"{len(self.visible)} visible devices for {self.devices_per_node} workers")

    @property
    def devices(self) -> int:
        return self.nnodes * self.devices_per_node


def default_ckpt_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """``SINGULARITY_CKPT_DIR``, else ``<submit dir or ~>/.singularity/ckpt/job-<id>``
    under Slurm (the job id survives requeues), else None."""
    explicit = contract.ckpt_dir(environ)
    if explicit:
        return Path(explicit)
    job_id = contract.slurm_job_id(environ)
    if job_id is None:
        return None
    base = contract.slurm_submit_dir(environ) or str(Path.home())
    return Path(base).joinpath(*ckptdir.DEFAULT_LEVELS, f"job-{job_id}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def device0_address(environ: Mapping[str, str] | None = None,
                    slurm: "SlurmClient | None" = None) -> str:
    """The address of device 0's node, from Slurm: the first node of the
    step's node list (``SLURM_STEP_NODELIST``, else the job's), whose
    ``SLURM_NODEID`` is 0, looked up as its ``NodeAddr``. Node names need not
    resolve (the local cluster's do not; Slurm itself reaches nodes through
    NodeAddr). ``SLURM_LAUNCH_NODE_IPADDR`` is not used: it is the address
    of the node that ran srun (the batch host), which need not be node 0 of
    the step.

    :raises RuntimeSetupError: no node list, or Slurm cannot say the address.
    """
    from slurm_singularity.slurm.api import SlurmError
    from slurm_singularity.slurm.cli import CliSlurmClient

    nodelist = contract.slurm_step_nodelist(environ) or contract.slurm_job_nodelist(environ)
    if not nodelist:
        raise RuntimeSetupError(
            "a multi-node run needs SLURM_STEP_NODELIST or SLURM_JOB_NODELIST (run it "
            "under srun) or MASTER_ADDR to find device 0's node")
    client = slurm or CliSlurmClient()
    try:
        return client.node_address(client.hostnames(nodelist)[0])
    except SlurmError as exc:
        raise RuntimeSetupError(
            f"cannot find the address of device 0's node ({nodelist}) in Slurm: {exc}; "
            f"set MASTER_ADDR") from None


def resolve(script: str, args: list[str], *, devices: int | None, world_size: int | None,
            ckpt_dir: str | None, deterministic: bool | None = None,
            ckpt_every_s: float | None = None,
            environ: Mapping[str, str] | None = None) -> LaunchSpec:
    """Arguments + contract variables -> ``LaunchSpec``.

    :raises RuntimeSetupError: bad arguments; the message names the option.
    :raises contract.ContractError: a malformed contract variable.
    """
    if not script:
        raise RuntimeSetupError("missing the training script (singularity-run script.py ...)")
    if not Path(script).is_file():
        raise RuntimeSetupError(f"script {script!r} does not exist or is not a file")
    if devices is not None and not 1 <= devices <= contract.MAX_DEVICES_PER_NODE:
        raise RuntimeSetupError(f"--devices {devices}: must be between 1 and "
                                f"{contract.MAX_DEVICES_PER_NODE}")
    if world_size is not None and not 1 <= world_size <= contract.MAX_WORLD_SIZE:
        raise RuntimeSetupError(f"--world-size {world_size}: must be between 1 and "
                                f"{contract.MAX_WORLD_SIZE}")
    if ckpt_every_s is not None and not 0 <= ckpt_every_s <= contract.MAX_CKPT_EVERY_S:
        raise RuntimeSetupError(f"--ckpt-every-s {ckpt_every_s}: must be a number between 0 "
                                f"and {contract.MAX_CKPT_EVERY_S:g}")
    visible = contract.cuda_visible_devices(environ)
    per_node = devices or contract.devices(environ) or len(visible) or 1
    if visible:
        if per_node > len(visible):
            raise RuntimeSetupError(
                f"--devices {per_node}: only {len(visible)} devices in CUDA_VISIBLE_DEVICES")
        visible = visible[:per_node]
    nnodes, node_rank = contract.slurm_nnodes(environ), contract.slurm_nodeid(environ)
    if node_rank >= nnodes:
        nnodes, node_rank = 1, 0
    total = nnodes * per_node
    world = world_size or contract.world_size(environ) or total
    if world % total:
        raise RuntimeSetupError(
            f"--world-size {world} is not a multiple of the {total} devices "
            f"({nnodes} node(s) x {per_node})")
    ckpt = Path(ckpt_dir) if ckpt_dir else default_ckpt_dir(environ)
    if ckpt is None:
        raise RuntimeSetupError(
            "--ckpt-dir is required outside Slurm (or set SINGULARITY_CKPT_DIR)")
    contract.rendezvous_timeout_s(environ)   # a bad value fails here, not in every worker
    if nnodes > 1:
        addr = contract.master_addr(environ) or device0_address(environ)
        port = 20000 + int(contract.slurm_job_id(environ) or "0") % 20000
    else:
        addr, port = contract.master_addr(environ) or "127.0.0.1", free_port()
    return LaunchSpec(
        script=script, args=tuple(args), world_size=world, devices_per_node=per_node,
        ckpt_dir=ckpt, nnodes=nnodes, node_rank=node_rank, visible=visible,
        master_addr=addr, master_port=port,
        deterministic=contract.deterministic(environ) if deterministic is None else deterministic,
        ckpt_every_s=ckpt_every_s if ckpt_every_s is not None else contract.ckpt_every_s(environ))


def worker_env(spec: LaunchSpec, local: int, base: Mapping[str, str]) -> dict[str, str]:
    """Environment of worker ``local`` on this node."""
    rank = spec.node_rank * spec.devices_per_node + local
    env = dict(base)
    env.update({
        contract.WORLD_SIZE: str(spec.world_size),
        contract.DEVICES: str(spec.devices),
        contract.DEVICE_RANK: str(rank),
        contract.CKPT_DIR: str(spec.ckpt_dir),
        contract.DETERMINISTIC: "1" if spec.deterministic else "0",
        "MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port),
        "RANK": str(rank), "WORLD_SIZE": str(spec.devices), "LOCAL_RANK": str(local),
    })
    if spec.ckpt_every_s:
        env[contract.CKPT_EVERY_S] = str(spec.ckpt_every_s)
    if spec.visible:
        env["CUDA_VISIBLE_DEVICES"] = spec.visible[local]
    return env


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _worker_main(script: str, args: tuple[str, ...], env: dict[str, str],
                 progress: Connection | None) -> None:
    """Body of a worker process: the script as ``__main__`` in its env.

    Until this runs, the worker has the launcher's recording handler (fork
    copies it, with ``_RECEIVED``): a signal that came before the fork or
    before the lines below is in this process's copy of ``_RECEIVED`` and is
    replayed onto the flag here. ``runtime.job`` was imported by the
    launcher before the fork, so nothing here imports while a signal can
    interrupt it."""
    from slurm_singularity.runtime.job import install_preempt_handler

    os.environ.clear()
    os.environ.update(env)
    flag = install_preempt_handler()   # first: a preemption before init() is not lost
    preempt = contract.preempt_signals()
    for signum in _caught_signals():   # drop the launcher's recording handler
        if signum not in preempt:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else signal.SIG_IGN)
    for signum in tuple(_RECEIVED):    # what came before the handlers above
        if signum in preempt:
            flag.set(signum)
    if progress is not None:
        os.environ[contract.PROGRESS_FD] = str(progress.fileno())
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        if contract.proxy_enabled() and contract.proxy_addrs():
            # the device proxy's worker entry attaches to this device's proxy,
            # then runs the script with the proxy as the worker's device
            sys.argv = [contract.PROXY_WORKER_MODULE, script, *args]
            runpy.run_module(contract.PROXY_WORKER_MODULE, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    except (RuntimeSetupError, CheckpointError, contract.ContractError) as exc:
        rank = env.get(contract.DEVICE_RANK, "?")
        print(f"singularity-run: error: [device {rank}] {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        _ignore_signals()              # the run's outcome is decided: exit as it says


def _context() -> multiprocessing.context.BaseContext:
    """Workers fork from this launcher after it imported torch once (without
    touching CUDA): D workers on a small machine start in well under a
    second instead of paying D torch imports."""
    import torch  # noqa: F401 - imported for the forked workers
    import torch._dynamo  # noqa: F401 - what creating an optimizer imports (2 s)
    import slurm_singularity.runtime.job  # noqa: F401 - never imported half-way in a worker

    return multiprocessing.get_context("fork")


def launch(spec: LaunchSpec) -> int:
    """Start the workers, forward signals, wait; returns 0 when they
    finished, ``REQUEUE_EXIT_CODE`` when they all checkpointed for
    preemption, else the first failing worker's code (128+signal for a
    signal). Device 0's node appends the run to ``history.jsonl`` (or says
    once on stderr that it could not).

    Signals: from the call on, the launcher's handlers only record
    (``catch_signals``); the wait loop forwards them; once the workers are
    gone the signals are ignored, so no repeat kills the launcher while it
    records and exits (exit code 75 stays 75 for Slurm)."""
    catch_signals()
    procs: list[multiprocessing.process.BaseProcess] = []
    forwarder = _Forwarder(procs)
    main_node = spec.node_rank == 0
    progress = RunProgress(spec.devices, spec.world_size, ckpt_dir=spec.ckpt_dir)
    reader = None
    code = 1
    try:
        ckptdir.ensure_private(spec.ckpt_dir)   # cli/run.py ran ckptdir.prepare at start
        ctx = _context()
        reader_conn, writer_conn = ctx.Pipe(duplex=False) if main_node else (None, None)
        base = dict(os.environ)
        for local in range(spec.devices_per_node):
            env = worker_env(spec, local, base)
            conn = writer_conn if local == 0 else None
            proc = ctx.Process(target=_worker_main, args=(spec.script, spec.args, env, conn),
                               name=f"singularity-worker-{local}")
            proc.start()
            procs.append(proc)
        if reader_conn is not None and writer_conn is not None:
            writer_conn.close()
            reader = threading.Thread(target=_read_progress, args=(reader_conn, progress),
                                      daemon=True)
            reader.start()
        log.info("singularity-run: %d worker(s) on this node, W=%d D=%d, checkpoints in %s",
                 len(procs), spec.world_size, spec.devices, spec.ckpt_dir)
        code = _wait(procs, forwarder)
    except (OSError, CheckpointError) as exc:
        print(f"singularity-run: error: cannot start the workers: {exc}", file=sys.stderr,
              flush=True)
        _kill_all(procs)
        code = 1
    finally:
        _ignore_signals()
    if main_node:
        if reader is not None:
            reader.join(timeout=10)
        stop = {0: StopReason.FINISHED,
                contract.REQUEUE_EXIT_CODE: StopReason.PREEMPTED}.get(code, StopReason.FAILED)
        if progress.failure is not None:
            stop = StopReason.FAILED
        elif progress.stopped and code == 0:
            stop = StopReason.STOPPED
        record_run(spec.ckpt_dir, progress.record(stop, code))
    return code


def _read_progress(conn: Connection, progress: RunProgress) -> None:
    with os.fdopen(os.dup(conn.fileno()), "r", encoding="ascii", errors="replace") as fh:
        for line in fh:
            progress.feed(line)
    conn.close()


#: Signals singularity-run passes on to its workers (plus the preemption
#: signals of the contract). In a worker a preemption signal sets the flag;
#: SIGINT, when it is not one, interrupts (KeyboardInterrupt, a failed run);
#: USR1/USR2, when not one, are ignored.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

#: Signals this process received since ``catch_signals``, in order. The
#: handler only appends here (flag); the wait loop forwards. A forked worker
#: has its own copy and replays it onto its preemption flag.
_RECEIVED: list[int] = []


def _record(signum: int, _frame: object) -> None:
    _RECEIVED.append(signum)


def _caught_signals() -> set[int]:
    try:
        preempt = contract.preempt_signals()
    except contract.ContractError:
        preempt = frozenset()
    return {*preempt, *FORWARDED}


def catch_signals() -> None:
    """Record every forwarded and preemption signal from now on instead of
    dying of it (idempotent; main thread only). ``singularity-run`` calls it
    first thing, so a signal during its start-up is not a default death."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _caught_signals():
        if signal.getsignal(signum) is not _record:
            signal.signal(signum, _record)


def _ignore_signals() -> None:
    """SIG_IGN, not SIG_DFL: Python's finalization resets its own handlers
    to the default action but leaves SIG_IGN, so a late repeat cannot kill
    the process while it exits."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _caught_signals():
        signal.signal(signum, signal.SIG_IGN)


class _Forwarder:
    """Sends each worker every signal in ``_RECEIVED`` exactly once, also
    those that came before it was started (its copy of ``_RECEIVED`` has
    them too; a preemption flag set twice is set once)."""

    def __init__(self, procs: list[multiprocessing.process.BaseProcess]) -> None:
        self.procs = procs
        self.sent: dict[int, int] = {}   # worker index -> signals sent

    def __call__(self) -> None:
        received = tuple(_RECEIVED)
        for i, p in enumerate(self.procs):
            for signum in received[self.sent.get(i, 0):]:
                if p.exitcode is None and p.pid is not None:
                    try:
                        os.kill(p.pid, signum)
                    except ProcessLookupError:
                        pass
            self.sent[i] = len(received)


def _wait(procs: list[multiprocessing.process.BaseProcess], forward: _Forwarder) -> int:
    first_exit: float | None = None
    while True:
        forward()
        codes = [p.exitcode for p in procs]
        failed = [c for c in codes if c is not None and c not in (0, contract.REQUEUE_EXIT_CODE)]
        if failed:
            _kill_all(procs)
            return _exit_code(failed[0])
        if all(c is not None for c in codes):
            if all(c == contract.REQUEUE_EXIT_CODE for c in codes):
                return contract.REQUEUE_EXIT_CODE
            if all(c == 0 for c in codes):
                return 0
            return 1   # a mix of finished and preempted: the workers disagreed
        if any(c is not None for c in codes):
            first_exit = first_exit or time.monotonic()
            if time.monotonic() - first_exit > PEER_EXIT_TIMEOUT_S:
                log.error("singularity-run: workers did not exit within %.0f s of a peer",
                          PEER_EXIT_TIMEOUT_S)
                _kill_all(procs)
                return 1
        time.sleep(0.05)


def _kill_all(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        if p.exitcode is None:
            p.kill()
    for p in procs:
        p.join()
