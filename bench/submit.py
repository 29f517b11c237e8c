"""Submission throughput with the generated job_submit.lua vs without it.

Brings up its own one-node local cluster (own ports and state directory),
then alternates rounds of sequential ``sbatch --hold`` submissions with
``JobSubmitPlugins=lua`` and with the plugin removed from slurm.conf
(``scontrol reconfigure`` between rounds), several repetitions, and
compares the median submissions per second. Goal: ratio >= 0.95.

Every submission passes through the SPANK plugin in both modes, so the
difference is the Lua rules alone (running under slurmctld's lock). The
wall-clock rate is dominated by starting sbatch and is noisy on a shared
machine, so the JSON also carries slurmctld's own average time per
submission RPC (``sdiag``, reset before each round) for both modes.
Last line: the JSON verdict.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm_singularity.cluster import local
from slurm_singularity.cluster.api import ClusterSpec
from slurm_singularity.policy import default_policy_path
from slurm_singularity.policy.load import load_policy

ROUNDS = int(os.environ.get("BENCH_SUBMIT_ROUNDS", "14"))        # per mode
PER_ROUND = int(os.environ.get("BENCH_SUBMIT_JOBS", "50"))      # submissions per round
GOAL = 0.95
CTLD_PORT = int(os.environ.get("BENCH_SUBMIT_CTLD_PORT", "36817"))
SBATCH_ARGS = ["--parsable", "--hold", "-o", "/dev/null", "--sla=basic", "--elastic=1:2",
               "--world-size=2", "--gres=gpu:1", "--wrap", "true"]


def _run(env: dict[str, str], *cmd: str) -> str:
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _set_job_submit(spec: ClusterSpec, env: dict[str, str], on: bool) -> None:
    conf = spec.slurm_conf
    lines = conf.read_text().splitlines()
    out = [ln for ln in lines if not ln.strip().startswith("JobSubmitPlugins=")]
    if on:
        out.append("JobSubmitPlugins=lua")
    conf.write_text("\n".join(out) + "\n")
    _run(env, "scontrol", "reconfigure")
    want = "lua" if on else "(null)"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        shown = [ln for ln in _run(env, "scontrol", "show", "config").splitlines()
                 if ln.startswith("JobSubmitPlugins")]
        if shown and shown[0].split("=", 1)[1].strip() in (want, "") and \
                (on or "lua" not in shown[0]):
            return
        time.sleep(0.2)
    raise RuntimeError(f"JobSubmitPlugins did not become {want}")


_RPC = re.compile(r"REQUEST_SUBMIT_BATCH_JOB\s*\(\s*\d+\)\s*count:(\d+)\s*ave_time:(\d+)")


def _rpc_us(env: dict[str, str]) -> float | None:
    """slurmctld's average microseconds per batch submission since the last reset."""
    m = _RPC.search(_run(env, "sdiag"))
    return float(m.group(2)) if m and int(m.group(1)) > 0 else None


def _round(env: dict[str, str], with_lua: bool) -> tuple[float, float | None]:
    ids = []
    _run(env, "sdiag", "--reset")
    start = time.perf_counter()
    for _ in range(PER_ROUND):
        out = _run(env, "sbatch", *SBATCH_ARGS)
        ids.append(out.strip().split(";")[0])
    elapsed = time.perf_counter() - start
    rpc = _rpc_us(env)
    _run(env, "scancel", *ids)
    if with_lua:   # the job got what the policy says: the Lua really ran
        rec = _run(env, "scontrol", "show", "job", ids[0])
        if "singularity:sla=basic" not in rec:
            raise RuntimeError("job_submit.lua did not run: no job tag in AdminComment")
    return PER_ROUND / elapsed, rpc


def _median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    spec = ClusterSpec(state_dir=state, nodes=1, gpus_per_node=2, ctld_port=CTLD_PORT,
                       slurmd_base_port=CTLD_PORT + 100, cluster_name="benchsub")
    print(f"bench submit: bringing up a 1-node cluster in {state}", file=sys.stderr)
    local.up(spec, load_policy(default_policy_path()))
    env = {**os.environ, **spec.env()}
    rates: dict[bool, list[float]] = {True: [], False: []}
    rpcs: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(2):                  # warm-up, one of each
            for mode in (True, False):
                _set_job_submit(spec, env, mode)
                _round(env, mode)
        for i in range(ROUNDS):
            for mode in ((True, False) if i % 2 == 0 else (False, True)):
                _set_job_submit(spec, env, mode)
                rate, rpc = _round(env, mode)
                rates[mode].append(rate)
                if rpc is not None:
                    rpcs[mode].append(rpc)
                print(f"round {i + 1}: {'lua ' if mode else 'none'} {rate:7.1f} submissions/s, "
                      f"slurmctld {rpc} us per submission", file=sys.stderr, flush=True)
    finally:
        local.down(state)
    value = statistics.median(rates[True])
    baseline = statistics.median(rates[False])
    ratio = value / baseline
    print(json.dumps({"bench": "submit", "value": round(value, 2), "baseline": round(baseline, 2),
                      "ratio": round(ratio, 3), "unit": "submissions/s", "goal": GOAL,
                      "ok": ratio >= GOAL, "rounds": ROUNDS, "per_round": PER_ROUND,
                      "lua_rates": [round(r, 1) for r in rates[True]],
                      "none_rates": [round(r, 1) for r in rates[False]],
                      "ctld_us_per_submit_lua": _median_or_none(rpcs[True]),
                      "ctld_us_per_submit_none": _median_or_none(rpcs[False])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
