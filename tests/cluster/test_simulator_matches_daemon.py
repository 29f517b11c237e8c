"""The simulator's planner is the daemon's planner: a short trace replayed by
the simulator and played for real on the local cluster under
singularity-schedd gives the same sequence of decisions.

The trace (seconds; 4 nodes x 8 GPUs):
  t=0   job 1 basic, W=32, elastic 8:32, submitted asking for 8 GPUs
  t=8   job 3 standard, rigid 8 GPUs, runs long (same account, at its
        gpu_quota of 32 once job 1 has grown: job 1 is shrunk for it)
  t=25  job 2 premium, rigid 16 GPUs, runs 20 s
Compared: every grow, shrink and preempt, and every start at another size
than the job asked for (a start at the asked size is Slurm's own doing),
as (kind, job, from, to), up to t=60 (the daemon gets 20 s of slack: its
resizes take seconds where the simulator's take none). The simulator takes
no decision between t=60 and the end of the long jobs."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from slurm_singularity.policy.api import Tier
from slurm_singularity.policy.load import load_policy
from slurm_singularity.sched.api import ActionKind
from slurm_singularity.sched.sim.run import SimSpec, simulate
from slurm_singularity.sched.sim.trace import TraceJob
from test_schedd import ELASTIC_JOB, daemon_policy, running_schedd

pytestmark = pytest.mark.cluster

HORIZON_S = 60.0     # decisions compared: the simulator's up to here ...
SLACK_S = 20.0       # ... the daemon's up to here (a real resize takes seconds)
ACTION = re.compile(r"\[job (\d+)\] (start|grow|shrink|preempt) (\d+) -> (\d+)")

#: trace id -> (submit s, tier, W, min, max, asked GPUs, duration s at full size, account)
TRACE = {
    1: (0.0, Tier.BASIC, 32, 8, 32, 8, 100000.0, "default"),
    3: (8.0, Tier.STANDARD, 8, 8, 8, 8, 100000.0, "default"),
    2: (25.0, Tier.PREMIUM, 16, 16, 16, 16, 20.0, "research"),
}


def _decision(kind: str, job: int, frm: int, to: int) -> tuple[str, int, int, int] | None:
    asked = TRACE[job][5]
    if kind == "start" and to == asked:
        return None
    return (kind, job, frm, to)


def simulated(policy: Path) -> list[tuple[str, int, int, int]]:
    jobs = [TraceJob(job_id=i, submit_s=t, duration_s=dur, world_size=w, account=acct,
                     tier=tier, min_devices=lo, max_devices=hi)
            for i, (t, tier, w, lo, hi, _, dur, acct) in TRACE.items()]
    seen: list[tuple[str, int, int, int]] = []

    def record(state, actions) -> None:
        if state.now > HORIZON_S:
            return
        for a in actions:
            if a.kind is ActionKind.LEAVE:
                continue
            d = _decision(a.kind.value, a.job_id, a.devices_from, a.devices_to)
            if d:
                seen.append(d)

    spec = SimSpec(trace=Path("(in the test)"), scheduler="singularity", gpus=32,
                   policy=load_policy(policy), gpus_per_node=8)
    simulate(spec, jobs=sorted(jobs, key=lambda j: j.submit_s), record=record)
    return seen


def test_the_simulator_and_the_daemon_take_the_same_decisions(slurm_cluster, tmp_path):
    # the default quota of 32: account default's basic job grows to all 32
    # GPUs, and its standard job gets in by shrinking it (the account's own
    # lower-tier work makes room for it)
    want = simulated(daemon_policy(tmp_path))
    assert want, "the simulator took no decision at all"

    ids: dict[int, int] = {}
    with running_schedd(slurm_cluster, tmp_path) as schedd:
        script = tmp_path / "elastic.sh"
        script.write_text(ELASTIC_JOB.format(ckpt_s=0, code=75))
        t0 = time.monotonic()
        for trace_id, (at, tier, w, lo, hi, asked, dur, acct) in sorted(
                TRACE.items(), key=lambda kv: kv[1][0]):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            nodes, per_node = (1, asked) if asked <= 8 else (asked // 8, 8)
            common = ["sbatch", "--parsable", f"--sla={tier.value}", f"--account={acct}",
                      f"-N{nodes}", f"--gres=gpu:{per_node}", "-o", "/dev/null"]
            if hi > lo:
                cmd = common + [f"--elastic={lo}:{hi}", f"--world-size={w}", str(script)]
            else:
                cmd = common + ["--wrap", f"sleep {min(dur, 300):g}"]
            ids[trace_id] = int(slurm_cluster.run(*cmd, check=True).stdout.strip())
        time.sleep(max(0.0, t0 + HORIZON_S + SLACK_S - time.monotonic()))

    back = {slurm_id: trace_id for trace_id, slurm_id in ids.items()}
    got = []
    for m in ACTION.finditer(schedd.text()):
        job = back.get(int(m.group(1)))
        if job is None:
            continue
        kind, frm, to = m.group(2), int(m.group(3)), int(m.group(4))
        if kind == "grow" and frm == TRACE[job][5] and not any(g[1] == job for g in got):
            # Slurm started the job at its asked size a moment before the
            # daemon's first look at it: the same decision as starting it at `to`
            kind, frm = "start", 0
        d = _decision(kind, job, frm, to)
        if d:
            got.append(d)
    assert got == want, f"daemon {got} != simulator {want}\n{schedd.text()[-3000:]}"
