"""Transparent mode on the real local Slurm: an unmodified job (a shell loop
that knows nothing of this project) is preempted by premium jobs three
times, its process tree dumped by CRIU and restored on another node each
time, and its output continues without a gap or a repeat.

The job asks for ``--signal=B:USR1@5``: Slurm 22.05 sends a preempted job
nothing until its partition's GraceTime ends unless it asked for a signal
(``preempt_send_user_signal``); ``B:`` sends it to the batch task alone,
which hands it to the keeper."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_preemption import premium_burst, wait_until

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
COUNT = 300


def counter_script(tmp_path: Path, count: int = COUNT) -> Path:
    script = tmp_path / "count.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --transparent --sla=basic -N1 --gres=gpu:8 --signal=B:USR1@5
i=0
while [ $i -lt {count} ]; do
  i=$((i+1)); echo $i >> {tmp_path}/count.txt; echo "tick $i"; sleep 0.1
done
echo done
""")
    return script


def counted(tmp_path: Path) -> list[int]:
    try:
        return [int(x) for x in (tmp_path / "count.txt").read_text().split()]
    except FileNotFoundError:
        return []


def history(ckpt: Path) -> list[dict]:
    path = ckpt / "transparent-history.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_a_shell_loop_preempted_three_times_counts_on_without_gaps_or_repeats(
        slurm_cluster, tmp_path):
    os.chmod(tmp_path, 0o755)
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "job.out"
    r = slurm_cluster.run("sbatch", "--parsable", f"--ckpt-dir={ckpt}", "-o", str(out),
                          "--open-mode=append", str(counter_script(tmp_path)), check=True)
    job = int(r.stdout.strip())
    for n, at in enumerate((10, 100, 200)):
        wait_until(lambda: len(counted(tmp_path)) >= at, 240, f"count {at}")
        premium = premium_burst(slurm_cluster)
        wait_until(lambda: sum(h["event"] == "dump" for h in history(ckpt)) > n, 120,
                   f"dump {n + 1}")
        # the next run must restore on another node than the one that dumped
        wait_until(lambda: "JobState=PENDING" in slurm_cluster.run(
            "scontrol", "show", "job", str(job)).stdout, 60, "the requeue")
        slurm_cluster.run("scontrol", "update", f"JobId={job}",
                          f"ExcNodeList={history(ckpt)[-1]['node']}", check=True)
        slurm_cluster.wait_job(premium, timeout=120)
        slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        wait_until(lambda: sum(h["event"] == "restore" for h in history(ckpt)) > n, 300,
                   f"restore {n + 1}")
    rec = slurm_cluster.wait_job(job, timeout=300)
    assert rec["JobState"] == "COMPLETED", (rec, out.read_text()[-2000:])
    assert counted(tmp_path) == list(range(1, COUNT + 1)), out.read_text()[-2000:]
    text = out.read_text()
    ticks = [int(l.split()[1]) for l in text.splitlines() if l.startswith("tick ")]
    assert ticks == list(range(1, COUNT + 1)), text[-2000:]
    events = [h["event"] for h in history(ckpt)]
    assert events == ["start"] + ["dump", "restore"] * 3 + ["exit"], events
    dumps = [h for h in history(ckpt) if h["event"] == "dump"]
    assert all(d["pause_s"] < 2 for d in dumps), dumps
    show = slurm_cluster.run(str(BIN / "singularity-admin"), "job", "show", str(job), "--json")
    runs = json.loads(show.stdout)["transparent"]
    assert [r["ended"] for r in runs] == ["preempted"] * 3 + ["exit 0"], show.stdout
    assert [r["began"].split()[0] for r in runs] == ["start"] + ["restore"] * 3
    nodes = [h["node"] for h in history(ckpt)]
    for dump_node, restore_node in zip(nodes[1::2], nodes[2::2]):
        assert dump_node != restore_node, nodes


def test_a_transparent_job_grown_to_two_nodes_by_an_admin_is_refused_at_step_start(
        slurm_cluster, tmp_path):
    # sbatch refuses --transparent -N2 (tests/transparent/
    # test_multi_node_jobs_are_refused_at_submit.py); root's scontrol update
    # passes job_submit.lua, and the step start still says why.
    os.chmod(tmp_path, 0o755)
    script = tmp_path / "mn.sh"
    script.write_text("#!/bin/bash\n#SBATCH --transparent -N1\nhostname > ran.txt\n")
    out = tmp_path / "mn.out"
    r = slurm_cluster.run("sbatch", "--parsable", "--hold", "-o", str(out), "-D", str(tmp_path),
                          str(script), check=True)
    job = r.stdout.strip()
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "NumNodes=2-2", check=True)
    slurm_cluster.run("scontrol", "release", job, check=True)
    rec = slurm_cluster.wait_job(int(job), timeout=120)
    assert rec["JobState"] == "FAILED", rec
    assert rec["NumNodes"] == "2", rec
    assert "supports single-node jobs only" in out.read_text()
    assert not (tmp_path / "ran.txt").exists()


def test_an_srun_step_in_a_transparent_job_is_refused_saying_why(slurm_cluster, tmp_path):
    os.chmod(tmp_path, 0o755)
    script = tmp_path / "st.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --transparent -N1\nsrun touch {tmp_path}/ran.txt\n")
    out = tmp_path / "st.out"
    r = slurm_cluster.run("sbatch", "--parsable", "-o", str(out), "-D", str(tmp_path),
                          str(script), check=True)
    slurm_cluster.wait_job(int(r.stdout.strip()), timeout=120)
    assert "srun steps cannot run in a transparent job" in out.read_text()
    assert not (tmp_path / "ran.txt").exists()
