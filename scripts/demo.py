"""The rest of the showcase, run by scripts/demo.sh against the demo
cluster (SLURM_CONF already points at it). Each capability of the project
adds a scene here."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm_singularity.slurm.cli import CliSlurmClient

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def show(cmd: list[str]) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    sys.stdout.write(r.stderr)
    return r


def wait(client: CliSlurmClient, job_id: int, timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = client.show_job(job_id)
        if rec.get("JobState") in FINAL:
            return rec
        time.sleep(0.5)
    raise SystemExit(f"demo: job {job_id} did not finish within {timeout:g} s")


def scene_gpu_job(client: CliSlurmClient, work: Path) -> None:
    step("A GPU job: Slurm hands it 3 emulated GPUs")
    out = work / "gpu.out"
    job = client.submit(["--gres=gpu:3", "-o", str(out),
                         "--wrap", "echo on $SLURMD_NODENAME CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"])
    rec = wait(client, job)
    print(f"job {job}: {rec['JobState']}, partition {rec.get('Partition')}")
    print(out.read_text().strip())


BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "train_lm.py"
FINAL_LINE = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64})")


def reference(work: Path, world: int, steps: int) -> str:
    """The uninterrupted run, outside Slurm, on 2 emulated devices."""
    # one checkpoint directory per length: two scenes run W=8 for different
    # numbers of steps, and a run resumes whatever checkpoint it finds
    r = subprocess.run([str(BIN / "singularity-run"), "--devices", "2", "--world-size", str(world),
                        "--ckpt-dir", str(work / f"ref-{world}-{steps}"),
                        str(TRAIN), "--steps", str(steps)],
                       capture_output=True, text=True)
    m = FINAL_LINE.search(r.stdout)
    if not m:
        raise SystemExit(f"demo: the reference run failed:\n{r.stderr[-2000:]}")
    return m.group(2)


def training_script(work: Path, name: str, sbatch: str, steps: int, step_sleep: float) -> Path:
    script = work / f"{name}.sh"
    script.write_text(f"""#!/bin/bash
{sbatch}
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps {steps} --step-sleep {step_sleep}
""")
    return script


def final_sha(out: Path) -> str:
    m = FINAL_LINE.search(out.read_text())
    return m.group(2) if m else "(none)"


def scene_tiers(work: Path) -> None:
    step("Tiers: the policy decides at submit time (job_submit.lua, generated from it)")
    show([str(BIN / "singularity-admin"), "job", "explain", "--sla=basic", "--elastic=2:8",
          "--world-size=8", "--gres=gpu:8"])
    print("A bad elastic range is refused by sbatch itself, naming the option:")
    show(["sbatch", "--sla=basic", "--elastic=8:2", "--gres=gpu:8", "--wrap", "true"])
    print("A tier the account may not use is refused by the policy:")
    show(["sbatch", "--sla=premium", "--gres=gpu:1", "--wrap", "true"])


def scene_preemption(client: CliSlurmClient, work: Path) -> None:
    step("Preemption without loss: premium jobs preempt a basic training job twice")
    steps = 40
    want = reference(work, 8, steps)
    out = work / "basic.out"
    script = training_script(work, "basic", "#SBATCH --sla=basic --world-size=8 -N1 --gres=gpu:4",
                             steps, 0.25)
    job = client.submit([f"--ckpt-dir={work / 'ckpt-basic'}", "-o", str(out),
                         "--open-mode=append", str(script)])
    print(f"basic job {job}: W=8 logical ranks on 4 GPUs, {steps} steps")
    for n in range(2):
        time.sleep(12 if n == 0 else 25)
        prem = client.submit(["--sla=premium", "--account=research", "-N4", "--gres=gpu:8",
                              "-o", "/dev/null", "--wrap", "sleep 3"])
        print(f"premium job {prem} needs the whole cluster: Slurm preempts the basic job")
        wait(client, prem)
    rec = wait(client, job)
    print(f"basic job {job}: {rec['JobState']} after {rec.get('Restarts')} requeue(s)")
    show([str(BIN / "singularity-admin"), "job", "show", str(job), "--ckpt-dir",
          str(work / "ckpt-basic")])
    print(f"params_sha256, preempted run:     {final_sha(out)}")
    print(f"params_sha256, uninterrupted run: {want}")
    print("equal: " + ("yes" if final_sha(out) == want else "NO"))


def scene_elastic(client: CliSlurmClient, work: Path) -> None:
    step("Elastic: the scheduler daemon grows a job into idle GPUs, shrinks it for premium, "
         "grows it back")
    steps = 90
    want = reference(work, 16, steps)
    log = open(work / "schedd.log", "w")
    schedd = subprocess.Popen([str(BIN / "singularity-schedd"), "--period", "0.5"],
                              stdout=log, stderr=log)
    try:
        out = work / "elastic.out"
        script = training_script(
            work, "elastic", "#SBATCH --sla=basic --elastic=8:16 --world-size=16 -N1 --gres=gpu:8",
            steps, 0.4)
        job = client.submit([f"--ckpt-dir={work / 'ckpt-elastic'}", "-o", str(out),
                             "--open-mode=append", str(script)])
        print(f"elastic basic job {job}: W=16 on 8..16 GPUs")
        time.sleep(20)
        prem = client.submit(["--sla=premium", "--account=research", "-N3", "--gres=gpu:8",
                              "-o", "/dev/null", "--wrap", "sleep 10"])
        print(f"premium job {prem} needs 24 of the 32 GPUs for 10 s")
        time.sleep(8)
        show([str(BIN / "singularity-admin"), "status"])
        wait(client, prem)
        rec = wait(client, job, timeout=600)
        print(f"elastic job {job}: {rec['JobState']}")
    finally:
        schedd.terminate()
        schedd.wait(10)
        log.close()
    print("The daemon's decisions, each with its reason from the policy:")
    for line in (work / "schedd.log").read_text().splitlines():
        if any(f"] {kind} " in line for kind in ("start", "grow", "shrink", "preempt")):
            print("  " + line.split("daemon: ", 1)[-1][:160])
    show([str(BIN / "singularity-admin"), "job", "show", str(job), "--ckpt-dir",
          str(work / "ckpt-elastic")])
    print(f"params_sha256, resized run:       {final_sha(out)}")
    print(f"params_sha256, uninterrupted run: {want}")
    print("equal: " + ("yes" if final_sha(out) == want else "NO"))


TICKS = 150


def ticks(out: Path) -> list[int]:
    try:
        text = out.read_text()
    except FileNotFoundError:
        return []
    return [int(line.split()[1]) for line in text.splitlines()
            if line.startswith("tick ") and line.split()[1].isdigit()]


def transparent_history(ckpt: Path) -> list[dict]:
    path = ckpt / "transparent-history.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def steps_in(out: Path) -> int:
    found = re.findall(r"^step (\d+) ", out.read_text(), re.M) if out.exists() else []
    return int(found[-1]) if found else -1


def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: waited {timeout:g} s for {what}, in vain")
        time.sleep(0.2)


def scene_transparent(client: CliSlurmClient, work: Path) -> None:
    step("Transparent mode: a program that knows nothing of this project survives a "
         "preemption (CRIU)")
    from slurm_singularity.transparent import criu
    from slurm_singularity.transparent.api import SetupError
    try:
        criu.find()
    except SetupError as exc:
        print(f"skipped: no working CRIU here ({exc})")
        return
    out, ckpt = work / "transparent.out", work / "ckpt-transparent"
    script = work / "counter.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --transparent --sla=basic -N1 --gres=gpu:8 --signal=B:USR1@5
exec python3 -u -c '
import time
for i in range(1, {TICKS} + 1):
    print("tick", i, flush=True)
    time.sleep(0.2)
'
""")
    print(f"$ cat {script.name}\n{script.read_text().rstrip()}")
    job = client.submit([f"--ckpt-dir={ckpt}", "-o", str(out), "--open-mode=append",
                         str(script)])
    print(f"transparent job {job}: counts to {TICKS}, one line every 0.2 s")
    until(lambda: len(ticks(out)) >= 25, 120, "25 ticks")
    show([str(BIN / "singularity-admin"), "status"])
    prem = client.submit(["--sla=premium", "--account=research", "-N4", "--gres=gpu:8",
                          "-o", "/dev/null", "--wrap", "sleep 3"])
    print(f"premium job {prem} needs the whole cluster: Slurm preempts the transparent job")
    until(lambda: any(h["event"] == "dump" for h in transparent_history(ckpt)), 60, "dump")
    dump = next(h for h in transparent_history(ckpt) if h["event"] == "dump")
    print(f"dumped on {dump['node']} after tick {ticks(out)[-1]}, "
          f"paused {dump.get('pause_s', 0):.2f} s")
    wait(client, prem)
    # Slurm 22.05 holds a requeued job back a while (BeginTime): start it now,
    # on another node than the one it was dumped on
    client.scontrol("update", f"JobId={job}", f"ExcNodeList={dump['node']}", "StartTime=now")
    until(lambda: any(h["event"] == "restore" for h in transparent_history(ckpt)), 120,
          "restore")
    restore = next(h for h in transparent_history(ckpt) if h["event"] == "restore")
    print(f"restored on {restore['node']}; the count goes on")
    rec = wait(client, job)
    print(f"transparent job {job}: {rec['JobState']} after {rec.get('Restarts')} requeue(s)")
    show([str(BIN / "singularity-admin"), "job", "show", str(job), "--ckpt-dir", str(ckpt)])
    got = ticks(out)
    print(f"output: ticks {got[0] if got else '-'}..{got[-1] if got else '-'}, "
          f"{len(got)} lines")
    print("continuous: " + ("yes" if got == list(range(1, TICKS + 1)) else "NO"))


def scene_federation(work: Path, fed_dir: Path, port: int) -> None:
    step("A federation: the placer moves a running basic job to another cluster, so that a "
         "premium job starts where it must without preempting it")
    from slurm_singularity import paths
    from slurm_singularity.cluster import federation

    policy = work / "daemon-policy.toml"      # Slurm preempts nothing: the daemons decide
    policy.write_text((paths.TEMPLATES_DIR / "policy.toml").read_text().replace(
        'preemption = "slurm"', 'preemption = "daemon"'))
    admin = str(BIN / "singularity-admin")
    r = show([admin, "cluster", "up", "--state-dir", str(fed_dir), "--federation", "demofed",
              "--clusters", "east:2x8,west:2x8", "--ctld-port", str(port), "--policy",
              str(policy)])
    if r.returncode:
        raise SystemExit("demo: the federation did not come up")
    try:
        east = CliSlurmClient(federation.load_spec(fed_dir).member("east").env())
        steps = 30
        want = reference(work, 8, steps)
        out = work / "fed-train.out"
        script = work / "fed-train.sh"
        script.write_text(f"""#!/bin/bash
#SBATCH --sla=basic --elastic=8:8 --world-size=8 -N1 --gres=gpu:8
export SINGULARITY_CKPT_DIR={fed_dir}/$SLURM_CLUSTER_NAME/storage/ckpt/job-$SLURM_JOB_ID
echo "cluster $SLURM_CLUSTER_NAME"
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps {steps} --step-sleep 0.3 \\
     --ckpt-every 4
""")
        job = east.submit(["--clusters=east", "-o", str(out), "--open-mode=append", str(script)])
        print(f"basic job {job} on east: W=8 on 8 GPUs, {steps} steps, a checkpoint every 4 "
              f"in east's storage")
        until(lambda: steps_in(out) >= 6, 180, "the basic job's step 6")
        log_path = work / "placer.log"
        with open(log_path, "w") as log:
            placer = subprocess.Popen([str(BIN / "singularity-schedd"), "--federation",
                                       str(fed_dir), "--period", "1", "--min-run", "5"],
                                      stdout=log, stderr=log)
        try:
            prem = east.submit(["--clusters=east", "--sla=premium", "--account=research", "-N2",
                                "--gres=gpu:8", "-o", "/dev/null", "--wrap", "sleep 20"])
            print(f"premium job {prem} needs all of east (2 x 8 GPUs); west is idle")
            until(lambda: FINAL_LINE.search(out.read_text()), 240, "the basic job's end")
        finally:
            placer.terminate()
            placer.wait(10)
        print("The placer's decision and the move's steps:")
        for line in log_path.read_text().splitlines():
            if f"[job {job}]" in line:
                print("  " + line.split("federation: ", 1)[-1][:170])
        for line in out.read_text().splitlines():
            if line.startswith("cluster ") or line.startswith("[device 0/") and (
                    "checkpointed step" in line or "restored step" in line):
                print("  job output: " + line[:150])
        rec = east.show_job(prem)
        print(f"premium job {prem}: submitted {rec.get('SubmitTime')}, started on east "
              f"{rec.get('StartTime')}")
        print(f"params_sha256, moved run:         {final_sha(out)}")
        print(f"params_sha256, uninterrupted run: {want}")
        print("equal: " + ("yes" if final_sha(out) == want else "NO"))
    finally:
        print("Stopping the federation (the single cluster above keeps running):")
        show([admin, "cluster", "down", "--state-dir", str(fed_dir)])


SCENES = ("gpu", "tiers", "preemption", "elastic", "transparent", "federation")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--scenes", default=",".join(SCENES),
                        help=f"comma list of scenes to play (default: all of {','.join(SCENES)})")
    parser.add_argument("--federation-port", type=int, default=26817,
                        help="first slurmctld port of the federation scene (default 26817)")
    args = parser.parse_args()
    scenes = args.scenes.split(",")
    if unknown := set(scenes) - set(SCENES):
        parser.error(f"--scenes: unknown {', '.join(sorted(unknown))} (scenes: {', '.join(SCENES)})")
    client = CliSlurmClient()
    work = Path(tempfile.mkdtemp(prefix="singularity-demo-", dir=args.state_dir))
    os.chmod(work, 0o755)
    if "gpu" in scenes:
        scene_gpu_job(client, work)
    if "tiers" in scenes:
        scene_tiers(work)
    if "preemption" in scenes:
        scene_preemption(client, work)
    if "elastic" in scenes:
        scene_elastic(client, work)
    if "transparent" in scenes:
        scene_transparent(client, work)
    if "federation" in scenes:
        scene_federation(work, Path(args.state_dir).absolute().parent / "demo-federation",
                         args.federation_port)
    step("Done")
    print(f"The cluster keeps running. Explore it with:\n"
          f"  eval $(.venv/bin/singularity-admin cluster env --state-dir {args.state_dir})\n"
          f"Stop it with:\n"
          f"  .venv/bin/singularity-admin cluster down --state-dir {args.state_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
