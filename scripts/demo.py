"""The rest of the showcase, run by scripts/demo.sh against the demo
cluster (SLURM_CONF already points at it). Each capability of the project
adds a scene here."""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    client = CliSlurmClient()
    work = Path(tempfile.mkdtemp(prefix="singularity-demo-", dir=args.state_dir))
    scene_gpu_job(client, work)
    step("Done")
    print(f"The cluster keeps running. Explore it with:\n"
          f"  eval $(.venv/bin/singularity-admin cluster env --state-dir {args.state_dir})\n"
          f"Stop it with:\n"
          f"  .venv/bin/singularity-admin cluster down --state-dir {args.state_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
