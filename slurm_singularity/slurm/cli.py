"""CLI backend of ``SlurmClient``: runs Slurm's commands with ``--json``.

Why the CLI: Debian 12 ships Slurm 22.05, for which no pyslurm release
builds (DESIGN.md); the commands are the stable interface. Every call has a
timeout so that a hung slurmctld cannot hang the caller.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from . import gres
from .api import Job, JobRun, Node, SlurmError, SlurmOutputError, SlurmState

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"Submitted batch job (\d+)")

class CliSlurmClient:
    """Talks to the Slurm named by ``env`` (``SLURM_CONF``) through its CLI."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> None:
        self.env = dict(env or {})
        self.timeout_s = timeout_s

    def _run(self, cmd: Sequence[str], stdin: str | None = None, cwd: str | None = None) -> str:
        full_env = dict(os.environ)
        full_env.update(self.env)
        try:
            proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True,
                                  env=full_env, timeout=self.timeout_s, check=False, cwd=cwd)
        except FileNotFoundError:
            raise SlurmError(cmd, 127, f"{cmd[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(cmd, 124, f"no answer within {self.timeout_s:g} s") from None
        if proc.returncode != 0:
            raise SlurmError(cmd, proc.returncode, proc.stderr or proc.stdout)
        return proc.stdout

    def nodes(self) -> list[Node]:
        data = json.loads(self._run(["sinfo", "--json"]))
        out: dict[str, Node] = {}
        for entry in data.get("sinfo", data.get("nodes", [])):
            for name, node in _sinfo_nodes(entry):
                out[name] = node
        return [out[k] for k in sorted(out, key=_natural)]

    def jobs(self) -> list[Job]:
        data = json.loads(self._run(["squeue", "--all", "--json"]))
        # a federation sibling's revoked copy has "job_id": null (22.05)
        return [_job(j) for j in data.get("jobs", []) if j.get("job_id") is not None]

    def submit(self, args: Sequence[str], script: str | None = None) -> int:
        out = self._run(["sbatch", *args], stdin=script)
        m = _JOB_ID.search(out)
        if not m:
            raise SlurmError(["sbatch", *args], 0, f"unexpected sbatch output: {out!r}")
        return int(m.group(1))

    def scontrol(self, *args: str) -> str:
        return self._run(["scontrol", *args])

    def show_job(self, job_id: int) -> dict[str, str]:
        return parse_scontrol_record(self.scontrol("show", "job", "-o", str(job_id)))

    def shrink_in_place(self, job_id: int, nodes: int) -> str:
        """From inside job ``job_id``: give up nodes so that it keeps
        ``nodes`` (``scontrol update NumNodes=N``; only the job itself may do
        that without a requeue). Returns the resize script Slurm writes (the
        ``export``/``unset`` lines that make the job's environment match).

        :raises SlurmError: scontrol refused, or wrote no resize script."""
        cmd = ["scontrol", "update", f"JobId={job_id}", f"NumNodes={nodes}"]
        with tempfile.TemporaryDirectory(prefix="singularity-resize-") as tmp:
            self._run(cmd, cwd=tmp)
            try:
                return (Path(tmp) / f"slurm_job_{job_id}_resize.sh").read_text()
            except OSError as exc:
                raise SlurmError(cmd, 0, f"wrote no resize script: {exc.strerror}") from None

    def hostnames(self, nodelist: str) -> list[str]:
        names = self.scontrol("show", "hostnames", nodelist).split()
        if not names:
            raise SlurmError(["scontrol", "show", "hostnames", nodelist], 0,
                             f"node list {nodelist!r} names no node")
        return names

    def node_address(self, name: str) -> str:
        fields = parse_scontrol_record(self.scontrol("show", "node", "-o", name))
        addr = fields.get("NodeAddr", "").strip()
        if not addr:
            raise SlurmError(["scontrol", "show", "node", "-o", name], 0,
                             f"node {name!r} has no NodeAddr")
        return addr

    def cancel(self, *job_ids: int, signal: str | None = None, full: bool = False) -> None:
        if not job_ids:
            return
        cmd = ["scancel"] + ([f"--signal={signal}"] if signal else []) + (["--full"] if full else [])
        self._run(cmd + [str(j) for j in job_ids])


    def running_steps(self, job_id: int) -> list[tuple[str, float]]:
        out = self._run(["squeue", "-h", "-s", "-j", str(job_id), "-o", "%i %M"])
        steps = []
        for line in out.splitlines():
            step, _, used = line.strip().partition(" ")
            if step.partition(".")[2].isdigit():
                steps.append((step, parse_elapsed(used.strip())))
        return steps

    def ensure_accounts(self, members: Mapping[str, Sequence[str]],
                        gpu_limits: Mapping[str, int | None],
                        default_accounts: Mapping[str, str]) -> list[str]:
        """Make the accounts exist in slurmdbd with an association for each of
        their users (with ``AccountingStorageEnforce=associations`` a job
        runs only under an account the user has one with), the account's
        ``GrpTRES=gres/gpu=N`` (``-1``: none) and each user's default
        account. Idempotent; returns what was added or changed.
        :raises SlurmError: sacctmgr failed."""
        done = []
        cmds = [(["sacctmgr", "-i", "add", "account", ",".join(members)], "accounts")]
        for account, users in members.items():
            if users:
                cmds.append((["sacctmgr", "-i", "add", "user", ",".join(users),
                              f"account={account}"], f"users of {account}"))
        for account, limit in gpu_limits.items():
            cmds.append((["sacctmgr", "-i", "modify", "account", "where", f"name={account}",
                          "set", f"GrpTRES=gres/gpu={-1 if limit is None else limit}"],
                         f"GrpTRES of {account}"))
        for user, account in default_accounts.items():
            cmds.append((["sacctmgr", "-i", "modify", "user", "where", f"name={user}", "set",
                          f"DefaultAccount={account}"], f"default account of {user}"))
        for cmd, what in cmds:
            try:
                out = self._run(cmd)
            except SlurmError as exc:
                if "Nothing new added" in exc.stderr or "Nothing modified" in exc.stderr or \
                        exc.returncode == 1 and not exc.stderr.strip():
                    continue
                raise
            if "Nothing new added" not in out and "Nothing modified" not in out:
                done.append(what)
        return done

    def accounting_enabled(self) -> bool:
        """Whether the cluster stores accounting in slurmdbd. :raises SlurmError:"""
        return "accounting_storage/slurmdbd" in self.scontrol("show", "config")

    def job_runs(self, job_id: int) -> list[JobRun]:
        fields = "JobID,Start,End,ElapsedRaw,State,ExitCode,NodeList,AllocTRES,Partition,WorkDir"
        out = self._run(["sacct", "-D", "-X", "-n", "-P", "-j", str(job_id), "-o", fields])
        return [parse_sacct_run(line) for line in out.splitlines() if line.strip()]

    def submit_line(self, job_id: int) -> str:
        """The command line that submitted the job (sacct's SubmitLine); ""
        when accounting does not know the job.

        :raises SlurmError: sacct failed."""
        out = self._run(["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "SubmitLine%4096"])
        return next((line for line in out.splitlines() if line.strip()), "")

    def batch_script(self, job_id: int) -> str:
        """The job's batch script, while slurmctld still holds the job.

        :raises SlurmError: scontrol failed (the job is gone, or not ours)."""
        return self._run(["scontrol", "write", "batch_script", str(job_id), "-"])


def parse_sacct_run(line: str) -> JobRun:
    """One ``sacct -P`` line with the fields ``job_runs`` asks for."""
    jid, start, end, elapsed, state, code, nodes, tres, part, workdir = (line.split("|") + [""] * 10)[:10]
    return JobRun(int(jid.split("_")[0].split(".")[0]), start, end,
                  int(elapsed) if elapsed.isdigit() else 0, SlurmState.parse(state),
                  code, nodes, gres.gpus(tres, "sacct AllocTRES"), part, workdir)


def parse_elapsed(text: str) -> float:
    """squeue's time used (``S``, ``M:SS``, ``H:MM:SS``, ``D-HH:MM:SS``) in
    seconds; 0 for anything else (``INVALID``, empty)."""
    days, _, clock = text.rpartition("-")
    try:
        seconds = 0
        for part in clock.split(":"):
            seconds = seconds * 60 + int(part)
        return float(seconds + 86400 * (int(days) if days else 0))
    except ValueError:
        return 0.0


def parse_scontrol_record(text: str) -> dict[str, str]:
    """``Key=Value Key2=Value with spaces`` (one ``-o`` line) -> dict.

    Values may contain spaces (``Comment``, ``Command``): a new key starts only
    at `` Word=`` where Word is a known key shape (capitalised, no spaces).
    """
    line = text.strip().splitlines()[0] if text.strip() else ""
    fields: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s[A-Za-z][A-Za-z0-9_:/]*=|$)", line):
        fields[m.group(1)] = m.group(2)
    return fields


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _sinfo_nodes(entry: dict) -> list[tuple[str, Node]]:
    """One sinfo --json entry -> its nodes (22.05 groups nodes per line)."""
    names = entry.get("nodes", {}).get("nodes") if isinstance(entry.get("nodes"), dict) else None
    if names is None:
        names = [entry["name"]] if "name" in entry else []
    state = entry.get("node", {}).get("state") if isinstance(entry.get("node"), dict) else entry.get("state")
    if isinstance(state, list):
        state = "+".join(state)
    state = str(state or "unknown").lower()
    gpus_text = entry.get("gres", {}).get("total") if isinstance(entry.get("gres"), dict) else entry.get("gres")
    cpus = entry.get("cpus", {}).get("total") if isinstance(entry.get("cpus"), dict) else entry.get("cpus", 0)
    part = entry.get("partition", {}).get("name") if isinstance(entry.get("partition"), dict) else entry.get("partition")
    return [(n, Node(n, state, gres.gpus(gpus_text, "sinfo gres"), int(cpus or 0),
                     (part,) if part else ()))
            for n in names]


def _epoch(value: object) -> float:
    """A number of squeue's (22.05: plain; later: ``{"number": N}``); 0 if none."""
    if isinstance(value, dict):
        value = value.get("number")
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


def requested_gpus(j: dict) -> int:
    """GPUs a squeue --json job asks for in all. ``tres_req_str`` has the
    whole job's total after an update; a requeued job's ``node_count`` still
    shows its previous allocation until it starts again, so the per-node
    request is multiplied by it only when there is no total.

    :raises SlurmOutputError: a field that is no GRES/TRES spelling."""
    total = gres.parse(str(j.get("tres_req_str") or ""), "squeue tres_req_str")
    if any(g.name == "gpu" for g in total):
        return gres.count(str(j.get("tres_req_str")), "gpu", "squeue tres_req_str")
    per_node = gres.gpus(str(j.get("tres_per_node") or ""), "squeue tres_per_node")
    if per_node:
        return per_node * int(j.get("node_count") or 1)
    return gres.gpus(str(j.get("tres_per_job") or ""), "squeue tres_per_job")


def placement(j: dict) -> tuple[tuple[str, int], ...]:
    """``(node, GPUs)`` of a running squeue --json job: ``gres_detail``
    (``gpu:2(IDX:0-1)``, one per allocated node) paired with
    ``job_resources.allocated_nodes``. :raises SlurmOutputError:"""
    detail = j.get("gres_detail") or []
    res = j.get("job_resources") or {}
    names = [n.get("nodename") for n in res.get("allocated_nodes", []) if isinstance(n, dict)]
    out = []
    for name, text in zip(names, detail):
        g = gres.gpus(str(text), "squeue gres_detail")
        if name and g:
            out.append((str(name), g))
    return tuple(out)


def _job(j: dict) -> Job:
    """One squeue --json job as the typed record. A GRES field this layer
    cannot read makes a job of no GPUs (which the daemon leaves alone),
    with a warning, rather than a failed pass over every job."""
    state = SlurmState.parse(str(j.get("job_state", "")))
    try:
        gpus = requested_gpus(j)
        where = placement(j) if state.running else ()
    except SlurmOutputError as exc:
        log.warning("[job %s] %s; taken as a job without GPUs", j.get("job_id"), exc)
        gpus, where = 0, ()
    return Job(
        job_id=int(j["job_id"]),
        name=str(j.get("name", "")),
        state=state,
        partition=str(j.get("partition", "")),
        account=str(j.get("account", "")),
        user=str(j.get("user_name", "")),
        nodes=str(j.get("nodes", "")),
        comment=str(j.get("comment", "") or ""),
        reason=str(j.get("state_reason", "") or ""),
        restart_count=int(j.get("restart_cnt", 0) or 0),
        gpus=gpus,
        admin_comment=str(j.get("admin_comment") or ""),
        submit_time=_epoch(j.get("submit_time")),
        start_time=_epoch(j.get("start_time")),
        eligible_time=_epoch(j.get("eligible_time")),
        priority=int(_epoch(j["priority"])) if j.get("priority") is not None else None,
        placement=where,
        node_count=int(j.get("node_count") or 0),
        federation_origin=str(j.get("federation_origin") or ""),
        federation_siblings_viable=tuple(
            s for s in str(j.get("federation_siblings_viable") or "").split(",") if s),
    )
