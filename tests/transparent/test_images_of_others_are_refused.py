"""Images and checkpoint directories of another user, as real unprivileged
users (tests/users.py): a job cannot restore an image it did not dump, and
its processes never run with credentials other than its user's."""

from __future__ import annotations

import os
import shutil

from keeper_harness import counted, counter_script, start, wait_until
from slurm_singularity import contract


def test_a_job_pointed_at_another_users_checkpoint_directory_is_refused(
        criu_ready, work, unprivileged_users):
    u1, u2 = unprivileged_users
    os.chown(work, u1.uid, u1.gid)
    ckpt = work / "ckpt"
    script = counter_script(work, 200)
    run = start(work, script, job_id=301, uid=u1.uid, gid=u1.gid, ckpt=ckpt, tag="u1")
    wait_until(lambda: len(counted(work)) >= 3, 30, "count 3")
    assert run.preempt() == contract.REQUEUE_EXIT_CODE, run.stderr()
    stolen = start(work, script, job_id=301, uid=u2.uid, gid=u2.gid, ckpt=ckpt, tag="u2")
    assert stolen.proc.wait(timeout=30) != 0
    assert "refused" in stolen.stderr() and str(ckpt) in stolen.stderr()
    assert "restoring" not in stolen.stderr()


def test_another_users_image_planted_in_ones_own_directory_is_refused(
        criu_ready, work, unprivileged_users):
    u1, u2 = unprivileged_users
    d1, d2 = work / "u1", work / "u2"
    for d, u in ((d1, u1), (d2, u2)):
        d.mkdir(mode=0o755)
        os.chown(d, u.uid, u.gid)
    script = counter_script(work, 200)
    os.chmod(work, 0o777)
    run = start(d1, script, job_id=302, uid=u1.uid, gid=u1.gid, ckpt=d1 / "ckpt", tag="u1")
    wait_until(lambda: len(counted(work)) >= 3, 30, "count 3")
    assert run.preempt() == contract.REQUEUE_EXIT_CODE, run.stderr()
    # root (the only one who can) plants u1's signed image among u2's images
    first = start(d2, script, job_id=302, uid=u2.uid, gid=u2.gid, ckpt=d2 / "ckpt", tag="u2a")
    wait_until(lambda: (d2 / "ckpt" / "transparent").exists(), 30, "u2's image directory")
    first.proc.kill()
    first.proc.wait(timeout=30)
    shutil.copytree(d1 / "ckpt" / "transparent" / "image-000001",
                    d2 / "ckpt" / "transparent" / "image-000001")
    planted = start(d2, script, job_id=302, uid=u2.uid, gid=u2.gid, ckpt=d2 / "ckpt", tag="u2")
    wait_until(lambda: "image refused" in planted.stderr(), 30, "the refusal")
    assert f"belongs to uid {u1.uid}, not to the job's user (uid {u2.uid})" in planted.stderr()
    assert "restoring" not in planted.stderr()
    planted.proc.kill()
    planted.proc.wait(timeout=30)


def test_a_history_file_linked_to_a_file_of_roots_is_never_written_by_root(
        criu_ready, work, unprivileged_users):
    u1, _ = unprivileged_users
    os.chown(work, u1.uid, u1.gid)
    ckpt = work / "ckpt"
    ckpt.mkdir(mode=0o700)
    os.chown(ckpt, u1.uid, u1.gid)
    victim = work / "roots-file"
    victim.write_text("root's\n")
    os.chmod(victim, 0o644)
    # as if the user linked it in (root does it: protected_hardlinks forbids the user)
    os.link(victim, ckpt / "transparent-history.jsonl")
    script = counter_script(work, 200)
    run = start(work, script, job_id=303, uid=u1.uid, gid=u1.gid, ckpt=ckpt, tag="u1")
    wait_until(lambda: len(counted(work)) >= 3, 30, "count 3")
    assert run.preempt() == contract.REQUEUE_EXIT_CODE, run.stderr()
    assert victim.read_text() == "root's\n"
    assert victim.stat().st_uid == 0
    assert "not the user's plain file" in run.stderr()
