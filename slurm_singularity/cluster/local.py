"""Bring a local cluster up and down: munged, slurmctld and one slurmd per
node on loopback, emulated GPUs as character devices.

Why shaped so: every daemon runs in the foreground of its own process
session, started by us, so the pid we record is the daemon's pid. ``down``
stops exactly those pids (after checking that each still is the daemon we
started, so a reused pid is never killed), never by name. The spec is saved
in the state directory so that ``down``, ``status`` and ``env`` need nothing
but the state directory, and a second ``up`` finds the running cluster
instead of starting duplicates.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .. import paths
from ..policy.api import Policy
from ..policy.render import associations
from ..slurm.api import SlurmError
from ..slurm.cli import CliSlurmClient
from .api import ClusterError, ClusterSpec, ClusterStatus, DaemonKind, NodeStatus
from . import wait
from .render import render_cluster_files

log = logging.getLogger(__name__)

SPEC_FILE = "cluster.json"
DAEMONS_FILE = "run/daemons.json"
STOP_WAIT_S = 10.0
#: Seconds each daemon gets to come up on an idle machine; ``wait.wait_for``
#: stretches them by the load and while the daemon's log grows.
START_WAIT_S = {DaemonKind.MUNGED: 10.0, DaemonKind.MARIADBD: 30.0, DaemonKind.SLURMDBD: 30.0,
                DaemonKind.SLURMCTLD: 30.0}


# -- spec and daemon records ------------------------------------------------

def save_spec(spec: ClusterSpec) -> None:
    data = asdict(spec)
    data["state_dir"] = str(spec.state_dir)
    data["shared_state_dir"] = spec.shared_state_dir and str(spec.shared_state_dir)
    _write_atomic(spec.state_dir / SPEC_FILE, json.dumps(data, indent=2) + "\n")


def load_spec(state_dir: Path) -> ClusterSpec:
    """:raises ClusterError: no cluster was ever brought up there."""
    try:
        data = json.loads((state_dir / SPEC_FILE).read_text())
    except FileNotFoundError:
        raise ClusterError(f"no local cluster in {state_dir} (run `cluster up` first)") from None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot read {state_dir / SPEC_FILE}: {exc}") from None
    data["state_dir"] = Path(data["state_dir"])
    if data.get("shared_state_dir"):
        data["shared_state_dir"] = Path(data["shared_state_dir"])
    return ClusterSpec(**data)


def _read_daemons(state_dir: Path) -> dict[str, dict]:
    try:
        return json.loads((state_dir / DAEMONS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_daemons(state_dir: Path, daemons: dict[str, dict]) -> None:
    _write_atomic(state_dir / DAEMONS_FILE, json.dumps(daemons, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _alive(record: dict) -> bool:
    """The recorded pid still runs the command we started (not a reused pid)."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if status.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return [c.decode() for c in cmdline if c] == record.get("argv")


def live_daemons(state_dir: Path) -> dict[str, int]:
    """Daemon name -> pid, for the daemons of this cluster that still run."""
    return {name: rec["pid"] for name, rec in _read_daemons(state_dir).items() if _alive(rec)}


# -- checks before starting anything ----------------------------------------

def _check_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ClusterError(f"--state-dir {state_dir} cannot be written: {exc.strerror}") from None


def _check_ports(spec: ClusterSpec) -> None:
    for port in spec.ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                which = {spec.ctld_port: "--ctld-port", spec.dbd_port: "--dbd-port",
                         spec.mysql_port: "--mysql-port"}.get(port, "--slurmd-port")
                raise ClusterError(
                    f"port {port} ({which}) is already in use; choose other ports "
                    f"or stop what listens there") from None


def _check_binaries() -> None:
    for binary in ("munged", "slurmctld", "slurmd", "sinfo", "slurmdbd", "mariadbd",
                   "mariadb-install-db"):
        if shutil.which(binary) is None:
            raise ClusterError(f"{binary} is not installed; run `make setup`")


# -- preparing the state directory ------------------------------------------

def _prepare(spec: ClusterSpec, policy: Policy) -> None:
    sd = spec.state_dir
    for sub in ("etc", "run", "log", "spool/ctld", "dev"):
        (sd / sub).mkdir(parents=True, exist_ok=True)
    spec.storage_root.mkdir(exist_ok=True)
    os.chmod(spec.storage_root, 0o1777)      # every user's jobs write there, like /tmp
    for node in spec.node_names:
        (sd / "spool" / f"slurmd-{node}").mkdir(parents=True, exist_ok=True)
    if spec.owns_services:
        _make_munge_key(spec)
    _make_devices(spec)
    plugin = paths.SPANK_PLUGIN if paths.SPANK_PLUGIN.exists() else None
    if plugin is None:
        log.warning("SPANK plugin %s is not built; sbatch will lack --sla etc.", paths.SPANK_PLUGIN)
    own_dbd = spec.accounting and spec.owns_services
    password = _db_password(spec) if own_dbd else ""
    for name, text in render_cluster_files(spec, policy, plugin, password).items():
        _write_atomic(spec.conf_dir / name, text)
    if own_dbd:
        os.chmod(spec.conf_dir / "slurmdbd.conf", 0o600)   # holds the password
        _init_database(spec)


def _make_munge_key(spec: ClusterSpec) -> None:
    munge_dir = spec.state_dir / "munge"
    munge_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(munge_dir, 0o700)
    # every user authenticates through the socket; only root reads the key
    spec.munge_socket.parent.mkdir(mode=0o755, exist_ok=True)
    os.chmod(spec.munge_socket.parent, 0o755)
    key = munge_dir / "munge.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(1024))


def _db_password(spec: ClusterSpec) -> str:
    """slurmdbd's MariaDB password: made once, readable by root only."""
    try:
        return spec.db_secret.read_text().strip()
    except FileNotFoundError:
        pass
    password = os.urandom(24).hex()
    fd = os.open(spec.db_secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return password


def _init_database(spec: ClusterSpec) -> None:
    """A private MariaDB data directory for slurmdbd, made once, 0700: its
    root logs in through the unix socket inside it only (socket
    authentication), so no other local user can read or rewrite accounting."""
    datadir = spec.state_dir / "mysql"
    datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(datadir, 0o700)
    if (datadir / "mysql").is_dir():
        return
    proc = subprocess.run(
        [shutil.which("mariadb-install-db") or "mariadb-install-db", "--no-defaults",
         f"--datadir={datadir}", "--user=root", "--auth-root-authentication-method=socket",
         "--skip-test-db"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ClusterError(f"mariadb-install-db failed for {datadir}: "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")


def _grant_slurmdbd(spec: ClusterSpec) -> None:
    """The MariaDB user slurmdbd connects as: its password, rights on its own
    database only; root by the unix socket only (also in a data directory
    made by an older version, whose root had no password); no anonymous
    users. Idempotent (run at every ``up``).

    :raises ClusterError: the client failed (its message)."""
    password = _db_password(spec)
    db = f"slurm_acct_{spec.cluster_name}"
    host = socket.gethostname()
    sql = (f"DROP USER IF EXISTS ''@'localhost', ''@'{host}', 'root'@'{host}', "
           "'root'@'127.0.0.1', 'root'@'::1'; "
           "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket; "
           f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
           f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
           f"GRANT ALL PRIVILEGES ON `{db}`.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
    proc = subprocess.run(
        [shutil.which("mariadb") or "mariadb", "--no-defaults",
         f"--socket={spec.state_dir / 'mysql' / 'mysqld.sock'}", "-u", "root", "-e", sql],
        capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ClusterError(f"cannot create slurmdbd's MariaDB user: {proc.stderr.strip()[-500:]}")


def _make_devices(spec: ClusterSpec) -> None:
    """Emulated GPUs: character devices like /dev/null (1, 3), one per GPU."""
    dev_dir = spec.state_dir / "dev"
    for node in spec.node_names:
        for i in range(spec.gpus_per_node):
            path = dev_dir / f"{node}-gpu{i}"
            if path.exists() and stat.S_ISCHR(path.stat().st_mode):
                continue
            if path.exists():
                path.unlink()
            try:
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            except PermissionError:
                raise ClusterError(
                    f"cannot create emulated GPU {path} with mknod: run as root") from None


# -- starting and stopping ---------------------------------------------------

def _daemon_argv(spec: ClusterSpec) -> list[tuple[str, DaemonKind, list[str]]]:
    conf = str(spec.slurm_conf)
    munge = spec.state_dir / "munge"
    out: list[tuple[str, DaemonKind, list[str]]] = []
    if spec.owns_services:
        out += _service_argv(spec, munge)
    out += [
        ("slurmctld", DaemonKind.SLURMCTLD,
         [shutil.which("slurmctld") or "slurmctld", "-D", "-i", "-f", conf])]
    for node in spec.node_names:
        out.append((f"slurmd-{node}", DaemonKind.SLURMD,
                    [shutil.which("slurmd") or "slurmd", "-D", "-N", node, "-f", conf]))
    return out


def _service_argv(spec: ClusterSpec, munge: Path) -> list[tuple[str, DaemonKind, list[str]]]:
    """munged, and MariaDB and slurmdbd with accounting: what a cluster that
    shares another's services does not run."""
    out = [("munged", DaemonKind.MUNGED, [
        shutil.which("munged") or "munged", "-F", "--force",
        f"--socket={spec.munge_socket}", f"--key-file={munge / 'munge.key'}",
        f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
        f"--log-file={spec.state_dir / 'log' / 'munged.log'}"]),
    ]
    if spec.accounting:
        mysql = spec.state_dir / "mysql"
        out.append(("mariadbd", DaemonKind.MARIADBD, [
            shutil.which("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={mysql}",
            f"--socket={mysql}/mysqld.sock", f"--port={spec.mysql_port}",
            "--bind-address=127.0.0.1", f"--pid-file={mysql}/mariadbd.pid", "--user=root",
            # private to this cluster: loopback only, on its own port, with
            # grant tables (slurmdbd logs in with a password)
            "--skip-name-resolve",
            f"--log-error={spec.state_dir / 'log' / 'mariadbd.log'}"]))
        out.append(("slurmdbd", DaemonKind.SLURMDBD, [
            shutil.which("slurmdbd") or "slurmdbd", "-D"]))
    return out


def _start(name: str, argv: list[str], spec: ClusterSpec) -> dict:
    log_path = spec.state_dir / "log" / f"{name}.out"
    env = dict(os.environ)
    env.update(spec.env())
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=env, start_new_session=True, close_fds=True)
    return {"pid": proc.pid, "argv": argv, "kind": name}


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, *,
              spec: ClusterSpec | None = None, daemons: dict[str, dict] | None = None,
              progress: Callable[[str], None] = lambda msg: None) -> None:
    """``wait.wait_for`` (a limit scaled by the load), watching ``daemons``
    (name -> record) of ``spec``: one that dies ends the wait at once."""
    watched = [_watched(spec, name, rec) for name, rec in (daemons or {}).items()] if spec else []
    waited = wait.wait_for(predicate, timeout_s, what, watched=watched, progress=progress)
    log.debug("waited %.1f s for %s", waited, what)


def _watched(spec: ClusterSpec, name: str, record: dict) -> wait.Watched:
    logs = [spec.state_dir / "log" / f"{name}.log", spec.state_dir / "log" / f"{name}.out"]

    def size() -> int:
        return sum(p.stat().st_size for p in logs if p.exists())
    return wait.Watched(name, lambda: _alive(record), size, lambda: _log_tail(spec, name))


def _log_tail(spec: ClusterSpec, name: str, lines: int = 5) -> str:
    for path in (spec.state_dir / "log" / f"{name}.log", spec.state_dir / "log" / f"{name}.out"):
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
        if text:
            return "\n  ".join(text[-lines:])
    return "(no log)"


def up(spec: ClusterSpec, policy: Policy,
       progress: Callable[[str], None] = lambda msg: None) -> ClusterStatus:
    """Start the cluster and wait until every node is idle.

    Idempotent: if this state directory's cluster already runs, nothing is
    started. On failure everything started so far is stopped again.

    :raises ClusterError: names the option, port or path at fault.
    """
    _check_binaries()
    _check_state_dir(spec.state_dir)
    running = live_daemons(spec.state_dir)
    if running:
        old = load_spec(spec.state_dir)
        if old != spec:
            raise ClusterError(
                f"a cluster with another shape already runs in {spec.state_dir} "
                f"({old.nodes} nodes x {old.gpus_per_node} GPUs, port {old.ctld_port}); "
                f"run `cluster down` first")
        progress(f"cluster already up in {spec.state_dir}; nothing started")
        return status(spec.state_dir)
    _check_ports(spec)
    _prepare(spec, policy)
    save_spec(spec)
    started: dict[str, dict] = {}
    try:
        for name, kind, argv in _daemon_argv(spec):
            progress(f"starting {name}")
            started[name] = _start(name, argv, spec)
            _write_daemons(spec.state_dir, started)
            waits = {
                DaemonKind.MUNGED: (spec.munge_socket.exists, "munged's socket"),
                DaemonKind.MARIADBD: (lambda: _listening(spec.mysql_port),
                                      f"mariadbd to listen on port {spec.mysql_port}"),
                DaemonKind.SLURMDBD: (lambda: _listening(spec.dbd_port),
                                      f"slurmdbd to listen on port {spec.dbd_port}"),
                DaemonKind.SLURMCTLD: (lambda: _controller_answers(spec),
                                       f"slurmctld to answer on port {spec.ctld_port}"),
            }
            if kind in waits:
                predicate, what = waits[kind]
                progress(f"waiting for {what}")
                _wait_for(predicate, START_WAIT_S[kind], what, spec=spec, daemons=started,
                          progress=progress)
            if kind is DaemonKind.MARIADBD:
                _grant_slurmdbd(spec)
            time.sleep(0.05)
            if not _alive(started[name]):
                raise ClusterError(f"{name} exited at start:\n  {_log_tail(spec, name)}")
        progress(f"waiting for {spec.nodes} nodes to be idle")
        _wait_for(lambda: _all_idle(spec), spec.ready_timeout_s,
                  f"every one of the {spec.nodes} nodes to be idle", spec=spec, daemons=started,
                  progress=progress)
        if spec.accounting:
            # without an association, --account=NAME falls back to the user's
            # default account; make the policy's accounts real
            CliSlurmClient(spec.env(), timeout_s=30).ensure_accounts(
                *associations(policy, sorted({"root", getpass.getuser()})))
    except BaseException:
        _stop_all(spec.state_dir, started)
        raise
    return status(spec.state_dir)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _controller_answers(spec: ClusterSpec) -> bool:
    try:
        CliSlurmClient(spec.env(), timeout_s=5).scontrol("ping")
        return True
    except SlurmError:
        return False


def _all_idle(spec: ClusterSpec) -> bool:
    try:
        nodes = CliSlurmClient(spec.env(), timeout_s=5).nodes()
    except SlurmError:
        return False
    idle = [n for n in nodes if n.state == "idle"]
    return len(idle) == spec.nodes


def down(state_dir: Path, progress: Callable[[str], None] = lambda msg: None) -> list[str]:
    """Cancel the cluster's jobs and stop its daemons by their recorded pids.
    Returns the names of the daemons stopped. Safe to call twice."""
    records = _read_daemons(state_dir)
    live = {n: r for n, r in records.items() if _alive(r)}
    if not live:
        progress(f"no daemons running for {state_dir}")
        if records:
            _write_daemons(state_dir, {})
        return []
    if "slurmctld" in live:
        _cancel_all_jobs(state_dir, progress)
    stopped = _stop_all(state_dir, live, progress)
    return stopped


def _cancel_all_jobs(state_dir: Path, progress: Callable[[str], None]) -> None:
    try:
        spec = load_spec(state_dir)
        client = CliSlurmClient(spec.env(), timeout_s=10)
        jobs = [j for j in client.jobs() if j.state in ("RUNNING", "PENDING", "REQUEUED",
                                                         "SUSPENDED", "CONFIGURING", "COMPLETING")]
        if not jobs:
            return
        progress(f"cancelling {len(jobs)} job(s)")
        client.cancel(*(j.job_id for j in jobs))
        _wait_for(lambda: not any(j.state in ("RUNNING", "COMPLETING", "CONFIGURING")
                                  for j in client.jobs()), 30, "jobs to end")
    except (ClusterError, SlurmError) as exc:
        log.warning("could not cancel every job before stopping: %s", exc)


def _stop_all(state_dir: Path, records: dict[str, dict],
              progress: Callable[[str], None] = lambda msg: None) -> list[str]:
    """Stop in reverse start order: slurmd, slurmctld, then munged. Each gets
    SIGTERM, then SIGKILL after ``STOP_WAIT_S``."""
    order = sorted(records, key=lambda n: (n.startswith("slurmd"), n == "slurmctld"), reverse=True)
    for name in order:
        rec = records[name]
        if _alive(rec):
            progress(f"stopping {name} (pid {rec['pid']})")
            _signal(rec["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    for name in order:
        while _alive(records[name]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(records[name]):
            log.warning("%s (pid %s) ignored SIGTERM; killing it", name, records[name]["pid"])
            _signal(records[name]["pid"], signal.SIGKILL)
    remaining = {n: r for n, r in _read_daemons(state_dir).items()
                 if n not in records or _alive(r)}
    _write_daemons(state_dir, remaining)
    return order


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def status(state_dir: Path) -> ClusterStatus:
    """Daemons and nodes of the cluster in ``state_dir``.

    :raises ClusterError: no cluster was ever brought up there.
    """
    spec = load_spec(state_dir)
    records = _read_daemons(state_dir)
    daemons = {name: (rec["pid"] if _alive(rec) else None) for name, rec in records.items()}
    nodes: tuple[NodeStatus, ...] = ()
    if daemons.get("slurmctld"):
        try:
            nodes = tuple(NodeStatus(n.name, n.state, n.gpus)
                          for n in CliSlurmClient(spec.env(), timeout_s=5).nodes())
        except SlurmError as exc:
            log.warning("sinfo failed: %s", exc)
    return ClusterStatus(state_dir / SPEC_FILE, daemons, nodes)


def restart(state_dir: Path, name: str) -> int:
    """Stop one daemon of the cluster (``slurmctld``, ``slurmd-n2``, ...) by
    its pid and start it again with the same command line; returns the new
    pid. Used to show that the scheduler survives a slurmctld restart.

    :raises ClusterError: no such daemon in this cluster.
    """
    stop_daemon(state_dir, name)
    return start_daemon(state_dir, name)


def stop_daemon(state_dir: Path, name: str) -> None:
    """Stop one daemon of the cluster by its recorded pid (its record stays,
    for ``start_daemon``). :raises ClusterError: no such daemon."""
    records = _read_daemons(state_dir)
    if name not in records:
        raise ClusterError(f"no daemon {name!r} in {state_dir} (have: {', '.join(records)})")
    _stop_all(state_dir, {name: records[name]})
    _write_daemons(state_dir, {**_read_daemons(state_dir), name: records[name]})


def start_daemon(state_dir: Path, name: str) -> int:
    """Start one daemon of the cluster (stopped by ``stop_daemon``) with its
    command line; for slurmctld, wait until it answers. Returns its pid.
    :raises ClusterError: no such daemon, or it did not come up."""
    spec = load_spec(state_dir)
    records = _read_daemons(state_dir)
    argv = records.get(name, {}).get("argv") or next(
        (a for n, _, a in _daemon_argv(spec) if n == name), None)
    if argv is None:
        raise ClusterError(f"no daemon {name!r} in {state_dir} (have: {', '.join(records)})")
    records[name] = _start(name, argv, spec)
    _write_daemons(state_dir, records)
    if name == "slurmctld":
        _wait_for(lambda: _controller_answers(spec), START_WAIT_S[DaemonKind.SLURMCTLD],
                  f"slurmctld to answer on port {spec.ctld_port}", spec=spec,
                  daemons={name: records[name]})
    return records[name]["pid"]
