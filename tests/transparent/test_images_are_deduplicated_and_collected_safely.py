"""The chunk store under the keeper, with CRIU: four ranks holding the same
parameters are stored once, a later dump writes only what changed, the
restored ranks hold their parameters intact, and a garbage collection
killed with SIGKILL halfway leaves the newest image restorable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from keeper_harness import start, wait_until
from slurm_singularity import contract, paths

RANKS, MB = 4, 24


def ranks_job(work, *, churn: bool = False):
    """W processes holding the same random "parameters" (each its own),
    each writing the sha256 of its copy to its beat file; with ``churn``,
    each also holds 32 MB of its own that it replaces every 0.2 s."""
    job = work / "ranks.py"
    job.write_text(f"""import hashlib, os, random, time
for rank in range(1, {RANKS}):
    if os.fork() == 0:
        break
else:
    rank = 0
# every rank makes its parameters the same way from the same seed, as DDP
# ranks running the same code do
params = bytearray(random.Random(7).randbytes({MB} << 20))
while True:
    own = os.urandom(32 << 20) if {churn} else b""
    with open("{work}/beat-%d" % rank, "w") as f:
        f.write(hashlib.sha256(params).hexdigest())
    time.sleep(0.2)
""")
    script = work / "ranks.sh"
    script.write_text(f"#!/bin/bash\nexec /usr/bin/python3 {job}\n")
    script.chmod(0o755)
    return script


def beats(work):
    out = []
    for r in range(RANKS):
        try:
            out.append((work / f"beat-{r}").read_text())
        except FileNotFoundError:
            out.append("")
    return out


def dumps(ckpt):
    return [e for e in map(json.loads, (ckpt / "transparent-history.jsonl").read_text()
                           .splitlines()) if e["event"] == "dump"]


def test_ranks_with_the_same_parameters_are_stored_once_and_a_later_dump_writes_little(
        criu_ready, work):
    ckpt = work / "ckpt"
    script = ranks_job(work)
    run = start(work, script, job_id=401, ckpt=ckpt, tag="run0")
    wait_until(lambda: all(len(b) == 64 for b in beats(work)), 60, "all ranks")
    (digest,) = set(beats(work))
    assert run.preempt(timeout=120) == contract.REQUEUE_EXIT_CODE, run.stderr()
    since = time.time()                    # a rank may hold its beat file open: keep it
    again = start(work, script, job_id=401, ckpt=ckpt, tag="run1")
    wait_until(lambda: all((work / f"beat-{r}").stat().st_mtime > since
                           and len(beats(work)[r]) == 64 for r in range(RANKS)),
               60, "the restored ranks")
    assert set(beats(work)) == {digest}, "a restored rank's parameters changed"
    assert again.preempt(timeout=120) == contract.REQUEUE_EXIT_CODE, again.stderr()
    first, later = dumps(ckpt)
    assert first["raw_bytes"] > RANKS * MB << 20
    # one copy of the parameters (a quarter of the raw images) and a little more
    assert first["bytes"] <= 0.35 * first["raw_bytes"], first
    assert later["bytes"] <= 0.05 * later["raw_bytes"], later
    stored = sum(p.stat().st_size for p in (ckpt / "transparent" / "chunks").iterdir())
    assert stored <= 0.4 * first["raw_bytes"]


def dumped_and_restored(work, job_id):
    """A churning ranks job dumped once (image-000001) and restored by a
    second run, which is returned running."""
    ckpt = work / "ckpt"
    script = ranks_job(work, churn=True)
    run = start(work, script, job_id=job_id, ckpt=ckpt, tag="run0")
    wait_until(lambda: all(len(b) == 64 for b in beats(work)), 60, "all ranks")
    assert run.preempt(timeout=120) == contract.REQUEUE_EXIT_CODE, run.stderr()
    second = start(work, script, job_id=job_id, ckpt=ckpt, tag="run1")
    wait_until(lambda: "restored in" in second.stderr(), 60, "the restore")
    time.sleep(0.5)
    return ckpt, script, second


PRUNE_SLOWLY = """import os, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from slurm_singularity.transparent import images
unlink = os.unlink
def slow_unlink(path, *a, **kw):
    unlink(path, *a, **kw)
    time.sleep(0.05)
os.unlink = slow_unlink
images.prune(Path(sys.argv[2]), sys.argv[3], 1)
"""


def test_a_garbage_collection_killed_halfway_leaves_the_newest_image_restorable(
        criu_ready, work):
    ckpt, script, second = dumped_and_restored(work, 402)
    assert second.preempt(timeout=120) == contract.REQUEUE_EXIT_CODE, second.stderr()
    tdir = ckpt / "transparent"
    assert sorted(p.name for p in tdir.iterdir()) == ["chunks", "image-000001", "image-000002"]
    chunks = tdir / "chunks"
    before = len(os.listdir(chunks))
    gc = subprocess.Popen([sys.executable, "-c", PRUNE_SLOWLY, str(paths.REPO_ROOT), str(tdir),
                           "image-000002"])
    wait_until(lambda: len(os.listdir(chunks)) <= before - 5, 60, "some chunks removed")
    gc.send_signal(signal.SIGKILL)
    gc.wait(timeout=30)
    left = len(os.listdir(chunks))
    assert left < before
    third = start(work, script, job_id=402, ckpt=ckpt, tag="run2")
    wait_until(lambda: "restored in" in third.stderr(), 60, "the restore")
    assert "image-000002" in third.stderr() and "image refused" not in third.stderr()
    # the restore finished the collection: only the restored image and its chunks remain
    manifest = json.loads((tdir / "image-000002" / "manifest.json").read_text())
    kept = {h for f in manifest["files"] for h, _ in f["chunks"]}
    wait_until(lambda: sorted(p.name for p in tdir.iterdir()) == ["chunks", "image-000002"]
               and set(os.listdir(chunks)) == kept, 30, "retention after the restore")
    third.proc.send_signal(signal.SIGKILL)
    third.proc.wait(timeout=30)


def test_kill_9_while_the_store_writes_a_dumps_chunks_keeps_the_previous_good_image(
        criu_ready, work):
    ckpt, script, second = dumped_and_restored(work, 403)
    tdir, chunks = ckpt / "transparent", ckpt / "transparent" / "chunks"
    before = set(os.listdir(chunks))
    second.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: set(os.listdir(chunks)) - before, 60, "the dump's first new chunk",
               every=0.002)
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait(timeout=30)
    published = sorted(n for n in os.listdir(tdir) if n.startswith("image-"))
    assert published == ["image-000001"], (published, second.stderr())
    since = time.time()
    third = start(work, script, job_id=403, ckpt=ckpt, tag="run2")
    wait_until(lambda: "restored in" in third.stderr(), 60, "the restore")
    assert "image-000001" in third.stderr() and "image refused" not in third.stderr()
    wait_until(lambda: all((work / f"beat-{r}").stat().st_mtime > since
                           for r in range(RANKS)), 60, "the restored ranks")
    # the interrupted dump's manifest directory and chunks are gone after the restore
    manifest = json.loads((tdir / "image-000001" / "manifest.json").read_text())
    kept = {h for f in manifest["files"] for h, _ in f["chunks"]}
    wait_until(lambda: sorted(os.listdir(tdir)) == ["chunks", "image-000001"]
               and set(os.listdir(chunks)) == kept, 30, "the leftovers removed")
    third.proc.send_signal(signal.SIGKILL)
    third.proc.wait(timeout=30)
