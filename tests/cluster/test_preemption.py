"""Preemption without loss on the real local Slurm: a basic job running the
training runtime is preempted by premium jobs (Slurm's own partition-priority
preemption: SIGTERM, grace time, requeue), resumes where it stopped each
time, and ends with the parameters of an uninterrupted run. A job whose
checkpoint misses the grace time loses only the steps since its previous
checkpoint, and `job show` says so. A plain script is requeued as Slurm
would do, and `job explain` warns that its work is not protected."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_singularity import paths
from slurm_singularity.runtime.history import read_history
from waiting import wait_until  # noqa: F401 - other cluster tests import it from here

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
TRAIN = paths.REPO_ROOT / "examples" / "train_lm.py"
FINAL = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64})")
STEPS = 36


def reference_sha(tmp_path: Path, steps: int) -> str:
    """The uninterrupted run, outside Slurm, on 2 emulated devices."""
    r = subprocess.run([str(BIN / "singularity-run"), "--devices", "2", "--world-size", "8",
                        "--ckpt-dir", str(tmp_path / "ref"), str(TRAIN), "--steps", str(steps)],
                       capture_output=True, text=True, timeout=300)
    m = FINAL.search(r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(2)


def submit_training(cluster, tmp_path: Path, extra_env: str = "", ckpt_every: int = 0,
                    step_sleep: float = 0.25, sbatch: str = "",
                    steps: int = STEPS) -> tuple[int, Path, Path]:
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "train.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --sla=basic --elastic=1:4 --world-size=8 -N1 --gres=gpu:4 {sbatch}
{extra_env}
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps {steps} \\
     --step-sleep {step_sleep} --ckpt-every {ckpt_every}
""")
    out = tmp_path / "train.out"
    r = cluster.run("sbatch", "--parsable", f"--ckpt-dir={ckpt}", "-o", str(out),
                    "--open-mode=append", str(script), check=True)
    return int(r.stdout.strip()), out, ckpt


def premium_burst(cluster, seconds: float = 2) -> int:
    """A premium job that needs the whole cluster: it preempts any basic job."""
    r = cluster.run("sbatch", "--parsable", "--sla=premium", "--account=research", "-N4",
                    "--gres=gpu:8", "-o", "/dev/null", "--wrap", f"sleep {seconds}", check=True)
    return int(r.stdout.strip())


def steps_done(out: Path) -> int:
    try:
        found = re.findall(r"^step (\d+) ", out.read_text(), re.M)
    except FileNotFoundError:
        return -1
    return int(found[-1]) if found else -1


def ckpt_in_progress(ckpt: Path) -> bool:
    return ckpt.is_dir() and any(".tmp." in p.name for p in ckpt.iterdir())


def test_a_basic_job_preempted_three_times_ends_as_if_uninterrupted(slurm_cluster, tmp_path):
    want = reference_sha(tmp_path, STEPS)
    job, out, ckpt = submit_training(slurm_cluster, tmp_path, ckpt_every=4)
    # 1: early in the run; 2: while it writes a periodic checkpoint; 3: late
    for n, moment in enumerate(("early", "during checkpoint", "late")):
        runs_before = out.read_text().count("restored step") if out.exists() else 0
        if moment == "during checkpoint":
            wait_until(lambda: ckpt_in_progress(ckpt), 120, "a periodic checkpoint being written",
                       every=0.01)
        else:
            target = {"early": 3, "late": 24}[moment]
            wait_until(lambda: steps_done(out) >= target, 180, f"step {target}")
        premium = premium_burst(slurm_cluster)
        slurm_cluster.wait_job(premium, timeout=120)
        if n < 2:
            # it must come back and make progress before the next preemption
            wait_until(lambda: out.read_text().count("restored step") > runs_before, 120,
                       "the job to restore its checkpoint")
    rec = slurm_cluster.wait_job(job, timeout=300)
    assert rec["JobState"] == "COMPLETED", rec
    m = FINAL.search(out.read_text())
    assert m and int(m.group(1)) == STEPS, out.read_text()[-2000:]
    assert m.group(2) == want, "preempted run differs from the uninterrupted one"

    history = read_history(ckpt)
    assert [h.stop.value for h in history] == ["preempted"] * 3 + ["finished"]
    # no step computed twice: each run starts where the previous one checkpointed
    for prev, nxt in zip(history, history[1:]):
        assert prev.checkpoint_written and prev.steps_lost == 0
        assert nxt.first_step == prev.last_step
    # sacct shows the requeues (slurmctld sends accounting to slurmdbd
    # asynchronously: give the last record a moment to arrive)
    want_states = ["REQUEUED"] * 3 + ["COMPLETED"]
    deadline = time.monotonic() + 30
    runs = slurm_cluster.client.job_runs(job)
    while [r.state for r in runs] != want_states and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = slurm_cluster.client.job_runs(job)
    assert [r.state for r in runs] == want_states, runs
    show = subprocess.run([str(BIN / "singularity-admin"), "job", "show", str(job),
                           "--ckpt-dir", str(ckpt), "--json"], env=slurm_cluster.env,
                          capture_output=True, text=True)
    rows = json.loads(show.stdout)["runs"]
    assert [r["stopped"] for r in rows] == ["preempted"] * 3 + ["finished"]
    assert sum(r["steps_lost"] for r in rows) == 0


def test_a_job_that_asks_for_usr1_gets_it_at_preemption_instead_of_sigterm(
        slurm_cluster, tmp_path):
    """The other way Slurm can warn a job: `--signal=USR1@600` with
    SlurmctldParameters=preempt_send_user_signal (in the template) delivers
    USR1 at preemption time instead of SIGTERM. The runtime, told
    SINGULARITY_PREEMPT_SIGNAL=USR1, checkpoints on it and says which
    signal it got (the last one before the agreed step boundary)."""
    steps = 16
    want = reference_sha(tmp_path, steps)
    job, out, ckpt = submit_training(slurm_cluster, tmp_path, sbatch="--signal=USR1@600",
                                     extra_env="export SINGULARITY_PREEMPT_SIGNAL=USR1",
                                     steps=steps, ckpt_every=1000)
    wait_until(lambda: steps_done(out) >= 3, 180, "step 3")
    slurm_cluster.wait_job(premium_burst(slurm_cluster), timeout=120)
    rec = slurm_cluster.wait_job(job, timeout=300)
    assert rec["JobState"] == "COMPLETED", rec
    text = out.read_text()
    assert "preempted (SIGUSR1 here)" in text, text[-3000:]
    m = FINAL.search(text)
    assert m and int(m.group(1)) == steps and m.group(2) == want, text[-2000:]
    history = read_history(ckpt)
    assert [h.stop.value for h in history] == ["preempted", "finished"], history
    assert history[0].checkpoint_written and history[1].first_step == history[0].last_step


def test_a_checkpoint_that_misses_the_grace_time_loses_only_steps_since_the_previous_one(
        slurm_cluster, tmp_path):
    # the second run's checkpoints take 300 s; basic's grace time is cut to 2 s
    slow = 'if [ "${SLURM_RESTART_COUNT:-0}" = 1 ]; then export SINGULARITY_CKPT_DELAY_S=300; fi'
    slurm_cluster.run("scontrol", "update", "PartitionName=basic", "GraceTime=2", check=True)
    try:
        job, out, ckpt = submit_training(slurm_cluster, tmp_path, extra_env=slow, ckpt_every=8)
        wait_until(lambda: steps_done(out) >= 4, 180, "step 4")
        slurm_cluster.wait_job(premium_burst(slurm_cluster), timeout=120)   # graceful
        wait_until(lambda: ckpt_in_progress(ckpt), 180, "the slow checkpoint of run 2")
        slurm_cluster.wait_job(premium_burst(slurm_cluster), timeout=120)   # kills it
        rec = slurm_cluster.wait_job(job, timeout=300)
    finally:
        slurm_cluster.run("scontrol", "update", "PartitionName=basic", "GraceTime=30")
    assert rec["JobState"] == "COMPLETED", rec
    history = read_history(ckpt)
    first_ckpt = history[0].last_step
    assert history[0].stop.value == "preempted" and history[0].checkpoint_written
    # run 2 left no record (killed); run 3 resumed from run 1's checkpoint
    assert len(history) == 2 and history[1].first_step == first_ckpt, history
    show = subprocess.run([str(BIN / "singularity-admin"), "job", "show", str(job),
                           "--ckpt-dir", str(ckpt)], env=slurm_cluster.env,
                          capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    assert "killed" in show.stdout and f"since the previous checkpoint (step {first_ckpt})" \
        in show.stdout, show.stdout


def test_a_plain_script_is_requeued_and_explain_warns_it_is_unprotected(slurm_cluster, tmp_path):
    script = tmp_path / "plain.sh"
    out = tmp_path / "plain.out"
    script.write_text("#!/bin/bash\necho started\nsleep 300\n")
    explain = subprocess.run([str(BIN / "singularity-admin"), "job", "explain", "--sla=basic",
                              "--gres=gpu:1", str(script)], capture_output=True, text=True)
    assert explain.returncode == 0
    assert "warning: the job does not run singularity-run" in explain.stdout
    r = slurm_cluster.run("sbatch", "--parsable", "--sla=basic", "--gres=gpu:1", "-o", str(out),
                          "--open-mode=append", str(script), check=True)
    job = int(r.stdout.strip())
    wait_until(lambda: out.exists() and "started" in out.read_text(), 60, "the plain job to start")
    slurm_cluster.wait_job(premium_burst(slurm_cluster), timeout=120)
    wait_until(lambda: out.read_text().count("started") >= 2, 120, "the plain job to restart")
    assert int(slurm_cluster.client.show_job(job)["Restarts"]) >= 1
    slurm_cluster.run("scancel", str(job))
