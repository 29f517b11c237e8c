"""Run the transparent keeper as the SPANK plugin does, without Slurm.

The plugin execs ``python -I -c ... --job-id N --uid U --gid G --env-fd F --
script`` as root with a clean environment and the job's environment on a
descriptor; a test does the same, so the keeper, CRIU, the images and the
job's processes are all real. A "preemption" is SIGTERM to the keeper, as
slurmstepd sends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from slurm_singularity import paths

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, also for bench/
from waiting import wait_until  # noqa: E402,F401 - the tests and bench/transparent.py import it from here

KEEPER_CODE = ("import sys; r = sys.argv.pop(1); r and sys.path.insert(0, r); "
               "from slurm_singularity.transparent.keeper import main; "
               "sys.exit(main(sys.argv[1:]))")


@dataclass
class Run:
    proc: subprocess.Popen
    out: Path
    err: Path

    def preempt(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.err.read_text()


def start(work: Path, script: Path, *, job_id: int, uid: int = 0, gid: int = 0,
          ckpt: Path, env: dict[str, str] | None = None, tag: str = "run") -> Run:
    job_env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "SLURM_JOB_ID": str(job_id),
               "SINGULARITY_CKPT_DIR": str(ckpt), **(env or {})}
    r, w = os.pipe()
    os.write(w, b"".join(f"{k}={v}".encode() + b"\0" for k, v in job_env.items()))
    os.close(w)
    out, err = work / f"{tag}.out", work / f"{tag}.err"
    with open(out, "ab") as o, open(err, "ab") as e:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", KEEPER_CODE, str(paths.REPO_ROOT), "--job-id",
             str(job_id), "--uid", str(uid), "--gid", str(gid), "--env-fd", str(r), "--",
             str(script)],
            env={"PATH": "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"}, cwd=work,
            stdout=o, stderr=e, pass_fds=(r,))
    os.close(r)
    return Run(proc, out, err)


def counter_script(work: Path, count: int, sleep: float = 0.05) -> Path:
    """An unmodified job: a shell loop that appends a counter to a file."""
    script = work / "count.sh"
    script.write_text(f"""#!/bin/bash
i=0
while [ $i -lt {count} ]; do
  i=$((i+1)); echo $i >> {work}/count.txt; echo "tick $i"; sleep {sleep}
done
""")
    script.chmod(0o755)
    return script


def counted(work: Path) -> list[int]:
    try:
        return [int(x) for x in (work / "count.txt").read_text().split()]
    except FileNotFoundError:
        return []
