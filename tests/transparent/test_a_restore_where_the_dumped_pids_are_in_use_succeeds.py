"""A restore on a node where the dumped processes' PIDs are in use: the
tree runs in a PID namespace of its own (tree.py), so its PIDs are the
namespace's and a fresh namespace has them free. Held here by real sleeping
processes on the node, and by a second transparent job running at the same
time (whose tree has the same namespace PIDs)."""

from __future__ import annotations

import os
import re
import subprocess

from keeper_harness import counted, counter_script, start, wait_until
from slurm_singularity import contract
from slurm_singularity.transparent import images


def dumped_pids(ckpt) -> list[int]:
    (manifest,) = images.list_manifests(ckpt / "transparent")
    return sorted(int(m.group(1)) for f in manifest.files
                  if (m := re.fullmatch(r"core-(\d+)\.img", f.name)))


def hold(pid: int) -> subprocess.Popen | None:
    """A sleeping process with PID ``pid`` on the node (None: something
    else already has it)."""
    for _ in range(200):
        if os.path.exists(f"/proc/{pid}"):
            return None
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(["sleep", "600"])
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    raise AssertionError(f"could not take PID {pid} (the node is too busy)")


def test_a_tree_restored_while_its_pids_are_held_on_the_node_counts_on(
        criu_ready, work, unprivileged_users):
    user = unprivileged_users[0]
    os.chown(work, user.uid, user.gid)
    ckpt = work / "ckpt"
    script = counter_script(work, 120)
    run = start(work, script, job_id=401, uid=user.uid, gid=user.gid, ckpt=ckpt, tag="run0")
    wait_until(lambda: len(counted(work)) >= 10, 30, "count 10")
    assert run.preempt() == contract.REQUEUE_EXIT_CODE, run.stderr()
    pids = dumped_pids(ckpt)
    assert pids, "the image names no process"
    holders = [h for h in (hold(pid) for pid in pids) if h is not None]
    for pid in pids:
        assert os.path.exists(f"/proc/{pid}"), f"PID {pid} is not in use on the node"
    other_dir = work / "other"
    other_dir.mkdir()
    os.chown(other_dir, user.uid, user.gid)
    other = start(other_dir, counter_script(other_dir, 100000), job_id=402, uid=user.uid,
                  gid=user.gid, ckpt=other_dir / "ckpt", tag="other")
    try:
        wait_until(lambda: len(counted(other_dir)) >= 3, 30, "the other job's count")
        last = start(work, script, job_id=401, uid=user.uid, gid=user.gid, ckpt=ckpt,
                     tag="last")
        assert last.proc.wait(timeout=60) == 0, last.stderr()
        assert "restored in" in last.stderr(), last.stderr()
        assert counted(work) == list(range(1, 121))
        assert all(h.poll() is None for h in holders), "a holder of the PIDs was disturbed"
        assert other.proc.poll() is None, other.stderr()
    finally:
        other.proc.kill()
        other.proc.wait(timeout=30)
        for h in holders:
            h.kill()
            h.wait()
