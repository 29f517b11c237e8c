"""Transparent mode: pause per preemption, restore time, bytes per dump,
and the step time of a job with the mode on vs off.

A job of W processes of ~MB each (one parent, W-1 forked children, each
holding its own copy of the same "replicated parameters", as DDP ranks do)
runs under the keeper exactly as the SPANK plugin starts it; the bench
preempts it (SIGTERM to the keeper) and starts it again, REPS times.
Reported: the pause (SIGTERM to the keeper's exit: freeze, dump, store,
publish), split by the keeper's own phase times (CRIU, the chunk store,
retention), the restore (keeper start to every rank running again), and the
bytes written per dump against the raw images' sum, for the first dump and
for the later ones (the parameters do not change between dumps here, so a
later dump writes only what changed: the stacks, the beat counters).

Step time: a loop that does real work per step (sha256 of 1 MiB, 4 times)
runs STEPS steps under the keeper (mode on, no dump) and started directly
(mode off), alternating, STEP_REPS times each; the median step of each run,
then the median over runs. Goals of issue 15: pause <= 2 s, bytes written
<= 0.5 x raw, step time on / off <= 1.01.

Needs root and a working CRIU (``make setup``); prints one JSON line last.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "transparent"))

from keeper_harness import start, wait_until  # noqa: E402

W = int(os.environ.get("BENCH_TRANSPARENT_RANKS", "4"))
MB = int(os.environ.get("BENCH_TRANSPARENT_MB", "300"))
REPS = int(os.environ.get("BENCH_TRANSPARENT_REPS", "3"))
STEPS = int(os.environ.get("BENCH_TRANSPARENT_STEPS", "300"))
STEP_REPS = int(os.environ.get("BENCH_TRANSPARENT_STEP_REPS", "5"))

STEP_JOB = """import hashlib, os, sys, time
buf = os.urandom(1 << 20)
out = []
for step in range({steps}):
    t = time.perf_counter()
    for _ in range(4):
        buf = hashlib.sha256(buf).digest() * (1 << 15)
    out.append(time.perf_counter() - t)
out.sort()
with open(sys.argv[1], "w") as f:
    f.write(str(out[len(out) // 2]))
"""

JOB = f"""import os, time
params = bytearray(os.urandom({MB} * 1024 * 1024))        # the same bytes in every rank
for rank in range(1, {W}):
    if os.fork() == 0:
        params = bytearray(params)                        # each rank its own copy
        break
else:
    rank = 0
beat = "{{work}}/beat-%d" % rank
while True:
    with open(beat, "w") as f:
        f.write(str(time.time()))
    time.sleep(0.05)
"""


def step_times(work: Path) -> dict:
    """Median step time with the mode on (under the keeper) and off."""
    job = work / "steps.py"
    job.write_text(STEP_JOB.replace("{steps}", str(STEPS)))
    on, off = [], []
    for rep in range(STEP_REPS):
        for mode, into in (("on", on), ("off", off)) if rep % 2 == 0 else \
                (("off", off), ("on", on)):
            result = work / f"step-{mode}-{rep}"
            script = work / f"step-{mode}-{rep}.sh"
            script.write_text(f"#!/bin/bash\nexec /usr/bin/python3 {job} {result}\n")
            script.chmod(0o755)
            if mode == "on":
                run = start(work, script, job_id=901 + rep, ckpt=work / f"ckpt-step-{rep}",
                            tag=f"step{rep}")
                code = run.proc.wait(timeout=600)
                assert code == 0, run.stderr()
            else:
                code = subprocess.run([str(script)], timeout=600).returncode
                assert code == 0
            into.append(float(result.read_text()))
    ratio = statistics.median(on) / statistics.median(off)
    return {"step_on_s": [round(x, 5) for x in on], "step_off_s": [round(x, 5) for x in off],
            "step_ratio_on_off": round(ratio, 4)}


def main() -> int:
    if os.geteuid() != 0:
        print(json.dumps({"bench": "transparent", "ok": False, "error": "needs root"}))
        return 0
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-transparent-"))
    try:
        (work / "job.py").write_text(JOB.replace("{work}", str(work)))
        script = work / "job.sh"
        script.write_text(f"#!/bin/bash\nexec /usr/bin/python3 {work / 'job.py'}\n")
        script.chmod(0o755)
        ckpt = work / "ckpt"
        beats = [work / f"beat-{r}" for r in range(W)]

        def all_beating(since: float) -> bool:
            return all(b.exists() and b.stat().st_mtime > since for b in beats)

        pauses, restores = [], []
        t = time.time()
        run = start(work, script, job_id=900, ckpt=ckpt, tag="r0")
        wait_until(lambda: all_beating(t), 300, "the ranks to start", every=0.05)
        for rep in range(REPS):
            time.sleep(1)
            t0 = time.monotonic()
            code = run.preempt(timeout=600)
            pauses.append(time.monotonic() - t0)
            assert code == 75, run.stderr()
            t1, wall = time.monotonic(), time.time()
            run = start(work, script, job_id=900, ckpt=ckpt, tag=f"r{rep + 1}")
            wait_until(lambda: all_beating(wall), 300, "the restored ranks", every=0.02)
            restores.append(time.monotonic() - t1)
        run.proc.kill()
        run.proc.wait(timeout=60)
        dumps = [json.loads(line) for line in
                 (ckpt / "transparent-history.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "dump"]
        first, later = dumps[0], dumps[1:] or dumps
        first_ratio = first["bytes"] / first["raw_bytes"]
        later_ratio = statistics.median(d["bytes"] / d["raw_bytes"] for d in later)
        pause = statistics.median(pauses)
        steps = step_times(work)
        print(json.dumps({
            "bench": "transparent", "value": round(pause, 3), "unit": "s: pause per preemption",
            "goal": "pause <= 2 s, bytes written <= 0.5 x raw, step time on/off <= 1.01",
            "ok": pause <= 2.0 and max(first_ratio, later_ratio) <= 0.5
            and steps["step_ratio_on_off"] <= 1.01,
            "pause_s": [round(p, 3) for p in pauses],
            "criu_s": [d["pause_s"] for d in dumps],
            "store_s": [d.get("store_s") for d in dumps],
            "verify_prune_s": [d.get("verify_prune_s") for d in dumps],
            "files_stored_during_criu": [d.get("files_stored_during_criu") for d in dumps],
            "staging": sorted({d.get("staging", "") for d in dumps}),
            "restore_s": [round(r, 3) for r in restores],
            "raw_bytes_per_dump": first["raw_bytes"],
            "bytes_written_first_dump": first["bytes"],
            "bytes_written_later_dumps": [d["bytes"] for d in dumps[1:]],
            "bytes_ratio_first": round(first_ratio, 4),
            "bytes_ratio_later": round(later_ratio, 4),
            **steps, "ranks": W, "mb_per_rank": MB, "repetitions": REPS,
            "load_average_at_start": round(load, 2),
            "load_average_at_end": round(os.getloadavg()[0], 2)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
