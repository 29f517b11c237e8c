"""An unmodified job under the keeper, outside Slurm: dumped at SIGTERM,
restored by the next run, its output continuing without a gap or repeat;
an interrupted dump and a damaged image never replace the good one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from keeper_harness import counted, counter_script, start, wait_until
from slurm_singularity import contract
from slurm_singularity.transparent.api import MANIFEST

COUNT = 60


def images(ckpt):
    """The images and temporary dumps in the job's ``transparent/`` (not
    the chunk store)."""
    d = ckpt / "transparent"
    return sorted(p.name for p in d.iterdir() if p.name != "chunks") if d.exists() else []


def chunks_of(ckpt, image, prefix):
    """The chunk files of the image's files whose names start with ``prefix``."""
    manifest = json.loads((ckpt / "transparent" / image / MANIFEST).read_text())
    return [ckpt / "transparent" / "chunks" / h for f in manifest["files"]
            if f["name"].startswith(prefix) for h, _ in f["chunks"]]


def test_a_shell_loop_dumped_and_restored_three_times_counts_on_without_gaps(criu_ready, work):
    ckpt = work / "ckpt"
    script = counter_script(work, COUNT)
    for n, at in enumerate((5, 20, 35)):
        run = start(work, script, job_id=101, ckpt=ckpt, tag=f"run{n}")
        wait_until(lambda: len(counted(work)) >= at, 30, f"count {at}")
        assert run.preempt() == contract.REQUEUE_EXIT_CODE, run.stderr()
    last = start(work, script, job_id=101, ckpt=ckpt, tag="last")
    assert last.proc.wait(timeout=60) == 0, last.stderr()
    assert counted(work) == list(range(1, COUNT + 1))
    ticks = [int(line.split()[1]) for n in ("run0", "run1", "run2", "last")
             for line in (work / f"{n}.out").read_text().splitlines()]
    assert ticks == list(range(1, COUNT + 1))
    assert "restored in" in last.stderr()
    events = [json.loads(line)["event"] for line in
              (ckpt / "transparent-history.jsonl").read_text().splitlines()]
    assert events == ["start"] + ["dump", "restore"] * 3 + ["exit"]
    assert images(ckpt) == [], "a finished job's images are removed"
    assert not (ckpt / "transparent" / "chunks").exists(), "and its chunks"


def test_a_tampered_image_is_refused_and_the_job_does_not_run_it(criu_ready, work):
    ckpt = work / "ckpt"
    script = counter_script(work, COUNT)
    run = start(work, script, job_id=102, ckpt=ckpt, tag="run0")
    wait_until(lambda: len(counted(work)) >= 5, 30, "count 5")
    assert run.preempt() == contract.REQUEUE_EXIT_CODE, run.stderr()
    (image,) = images(ckpt)
    core = chunks_of(ckpt, image, "core-")[0]
    data = bytearray(core.read_bytes())
    data[-1] ^= 0xFF
    core.write_bytes(bytes(data))
    before = len(counted(work))
    again = start(work, script, job_id=102, ckpt=ckpt, tag="run1")
    wait_until(lambda: "image refused" in again.stderr(), 30, "the refusal")
    assert "changed after the dump" in again.stderr() and "core-" in again.stderr()
    assert "restoring" not in again.stderr()
    again.proc.send_signal(signal.SIGKILL)
    again.proc.wait(timeout=30)
    assert counted(work)[:before] == list(range(1, before + 1))


def test_a_manifest_edited_to_another_job_fails_its_signature(criu_ready, work):
    ckpt = work / "ckpt"
    script = counter_script(work, COUNT)
    run = start(work, script, job_id=103, ckpt=ckpt, tag="run0")
    wait_until(lambda: len(counted(work)) >= 3, 30, "count 3")
    assert run.preempt() == contract.REQUEUE_EXIT_CODE
    (image,) = images(ckpt)
    mpath = ckpt / "transparent" / image / MANIFEST
    manifest = json.loads(mpath.read_text())
    manifest["job_id"] = 104
    mpath.write_text(json.dumps(manifest))
    other = start(work, script, job_id=104, ckpt=ckpt, tag="run1")
    wait_until(lambda: "image refused" in other.stderr(), 30, "the refusal")
    assert "signature does not verify" in other.stderr()
    other.proc.send_signal(signal.SIGKILL)
    other.proc.wait(timeout=30)


def test_kill_9_during_a_dump_keeps_the_previous_good_image(criu_ready, work):
    ckpt = work / "ckpt"
    big = work / "big.py"
    big.write_text(f"""import time
blob = bytearray(400 * 1024 * 1024)
for i in range(len(blob) // 4096):
    blob[i * 4096] = i % 251
n = 0
while True:
    n += 1
    with open("{work}/count.txt", "a") as f:
        print(n, file=f)
    time.sleep(0.05)
""")
    script = work / "big.sh"
    script.write_text(f"#!/bin/bash\nexec /usr/bin/python3 {big}\n")
    script.chmod(0o755)
    run = start(work, script, job_id=105, ckpt=ckpt, tag="run0")
    wait_until(lambda: len(counted(work)) >= 3, 60, "count 3")
    assert run.preempt(timeout=120) == contract.REQUEUE_EXIT_CODE, run.stderr()
    good = images(ckpt)
    assert len(good) == 1
    second = start(work, script, job_id=105, ckpt=ckpt, tag="run1")
    wait_until(lambda: "restored in" in second.stderr(), 60, "the restore")
    n_before = len(counted(work))
    second.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: any(n.startswith(".tmp-") for n in images(ckpt)), 30,
               "the dump to begin", every=0.005)
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait(timeout=30)
    time.sleep(1)
    assert [n for n in images(ckpt) if not n.startswith(".tmp-")] == good, images(ckpt)
    third = start(work, script, job_id=105, ckpt=ckpt, tag="run2")
    wait_until(lambda: "restored in" in third.stderr(), 60, "the restore")
    assert good[0] in third.stderr()
    wait_until(lambda: len(counted(work)) > n_before + 5, 30, "progress after the restore")
    third.proc.send_signal(signal.SIGKILL)
    third.proc.wait(timeout=30)
    os.sync()


def test_a_keeper_killed_without_warning_resumes_from_the_last_periodic_dump(criu_ready, work):
    ckpt = work / "ckpt"
    script = counter_script(work, 400)
    run = start(work, script, job_id=106, ckpt=ckpt, tag="run0",
                env={contract.CKPT_EVERY_S: "1"})
    wait_until(lambda: "periodic dump" in run.stderr(), 30, "a periodic dump")
    wait_until(lambda: len(counted(work)) >= 30, 30, "count 30")
    run.proc.send_signal(signal.SIGKILL)          # no dump at the end
    run.proc.wait(timeout=30)
    time.sleep(1)
    stopped = len(counted(work))
    time.sleep(1)
    assert len(counted(work)) == stopped, "the tree outlived its keeper"
    again = start(work, script, job_id=106, ckpt=ckpt, tag="run1")
    wait_until(lambda: "restored in" in again.stderr(), 30, "the restore")
    wait_until(lambda: len(counted(work)) >= stopped + 20, 30, "progress")
    again.proc.send_signal(signal.SIGKILL)
    again.proc.wait(timeout=30)
    values = counted(work)
    resumed_at = values[stopped]
    # it lost at most the steps since its last dump, and went on from there
    assert 1 < resumed_at <= stopped, (resumed_at, stopped)
    assert values[stopped:stopped + 20] == list(range(resumed_at, resumed_at + 20))


def test_a_disk_full_during_a_dump_keeps_the_previous_good_image_and_no_stray_chunk(
        criu_ready, work):
    ckpt = work / "ckpt"
    ckpt.mkdir(mode=0o700)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                              str(ckpt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {mounted.stderr.strip()}")
    try:
        script = counter_script(work, 400)
        run = start(work, script, job_id=107, ckpt=ckpt, tag="run0")
        wait_until(lambda: len(counted(work)) >= 5, 30, "count 5")
        assert run.preempt() == contract.REQUEUE_EXIT_CODE, run.stderr()
        good = images(ckpt)
        at_dump = len(counted(work))
        second = start(work, script, job_id=107, ckpt=ckpt, tag="run1")
        wait_until(lambda: "restored in" in second.stderr(), 30, "the restore")
        filler = ckpt / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        wait_until(lambda: len(counted(work)) >= at_dump + 10, 30, "progress")
        assert second.preempt() == contract.REQUEUE_EXIT_CODE
        assert "dump failed" in second.stderr(), second.stderr()
        assert images(ckpt) == good, "the failed dump replaced or left something"
        # and no stray chunk: the store holds the good image's chunks only
        assert set(os.listdir(ckpt / "transparent" / "chunks")) == {
            p.name for p in chunks_of(ckpt, good[0], "")}
        filler.unlink()
        third = start(work, script, job_id=107, ckpt=ckpt, tag="run2")
        wait_until(lambda: "restored in" in third.stderr(), 30, "the restore")
        assert good[0] in third.stderr()
        third.proc.send_signal(signal.SIGKILL)
        third.proc.wait(timeout=30)
    finally:
        subprocess.run(["umount", "-l", str(ckpt)], capture_output=True)


def test_a_missing_chunk_is_refused_naming_the_file_and_the_job_starts_afresh(
        criu_ready, work):
    ckpt = work / "ckpt"
    script = counter_script(work, COUNT)
    run = start(work, script, job_id=109, ckpt=ckpt, tag="run0")
    wait_until(lambda: len(counted(work)) >= 5, 30, "count 5")
    assert run.preempt() == contract.REQUEUE_EXIT_CODE, run.stderr()
    (image,) = images(ckpt)
    chunks_of(ckpt, image, "pages-")[0].unlink()
    again = start(work, script, job_id=109, ckpt=ckpt, tag="run1")
    wait_until(lambda: "image refused" in again.stderr(), 30, "the refusal")
    refusal = next(line for line in again.stderr().splitlines() if "image refused" in line)
    assert "pages-" in refusal and "missing from the store" in refusal, refusal
    assert "restoring" not in again.stderr()
    wait_until(lambda: (work / "run1.out").exists() and "tick 1" in
               (work / "run1.out").read_text(), 30, "a fresh start")
    again.proc.send_signal(signal.SIGKILL)
    again.proc.wait(timeout=30)
