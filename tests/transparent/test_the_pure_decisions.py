"""Transparent mode's pure decisions, without CRIU or root: which image is
tried first, what retention removes, who may restore a manifest, and that
the manifest's signed bytes cover every field but the MAC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slurm_singularity.transparent.api import (
    FileEntry, ImageRefused, Manifest, Settings, image_name, next_seq, parse_criu_version,
    refusal, restore_order, to_remove, transparent_requested, user_environment)
from slurm_singularity.transparent import criu


def manifest(**kw) -> Manifest:
    base = dict(job_id=7, uid=1001, gid=1001, seq=3, time=1.5, pause_s=0.2, reason="preempt",
                node="n2", pipes=("pipe:[1]", "pipe:[2]"),
                files=(FileEntry("core-1.img", 10, 10, (("ab" * 32, 10),)),))
    return Manifest(**{**base, **kw})


def test_images_are_tried_newest_first_and_temporary_dumps_never():
    names = [image_name(2), ".tmp-1-ab", image_name(10), image_name(1), "junk"]
    assert restore_order(names) == [image_name(10), image_name(2), image_name(1)]
    assert next_seq(names) == 11
    assert next_seq([]) == 1


def test_retention_keeps_the_newest_good_image_and_drops_interrupted_dumps():
    names = [image_name(1), image_name(2), image_name(3), ".tmp-9-xx"]
    assert sorted(to_remove(names, image_name(3), keep=1)) == sorted(
        [image_name(2), image_name(1), ".tmp-9-xx"])
    assert to_remove(names, image_name(3), keep=2) == [image_name(1), ".tmp-9-xx"]


def test_a_manifest_of_another_user_or_job_is_refused_with_the_reason():
    assert refusal(manifest(), job_id=7, uid=1001) is None
    assert "uid 1002" in refusal(manifest(uid=1002), job_id=7, uid=1001)
    assert "job 8" in refusal(manifest(job_id=8), job_id=7, uid=1001)


def test_the_signed_bytes_change_with_every_field_and_round_trip():
    m = manifest()
    assert Manifest.from_dict(m.to_dict()) == m
    for change in (dict(uid=0), dict(job_id=8), dict(seq=4), dict(node="n3"),
                   dict(files=(FileEntry("core-1.img", 10, 10, (("cd" * 32, 10),)),))):
        assert manifest(**change).signed_bytes() != m.signed_bytes(), change
    assert manifest(mac="x").signed_bytes() == m.signed_bytes()


@pytest.mark.parametrize("bad, field", [
    ({"format": "other"}, "manifest"),
    ({"files": [{"name": "../etc/passwd", "size": 1, "raw_size": 1, "chunks": []}]}, "files"),
    ({"files": [{"name": "pages-1.img", "size": 1, "raw_size": 1,
                 "chunks": [["../../etc/shadow", 1]]}]}, "bad chunk"),
    ({"files": [{"name": "pages-1.img", "size": 1, "raw_size": 9,
                 "chunks": [["ab" * 32, 1]]}]}, "raw_size"),
    ({"pipes": ["pipe:[1]"]}, "pipes"),
])
def test_a_malformed_manifest_is_refused_naming_the_field(bad, field):
    with pytest.raises(ImageRefused, match=field):
        Manifest.from_dict({**manifest().to_dict(), **bad})


def test_settings_refuse_bad_values_naming_the_field():
    ok = dict(job_id=1, uid=1, gid=1, ckpt_dir=Path("/x"))
    for bad, field in ((dict(job_id=0), "job_id"), (dict(ckpt_dir=Path("x")), "ckpt_dir"),
                       (dict(ckpt_every_s=0.5), "ckpt_every_s"), (dict(keep=0), "keep")):
        with pytest.raises(ValueError, match=field):
            Settings(**{**ok, **bad})


def test_the_command_gets_use_libuv_0_whatever_the_job_set():
    assert user_environment({"USE_LIBUV": "1", "A": "b"}) == {"USE_LIBUV": "0", "A": "b"}


def test_criu_versions_are_read_from_its_output():
    assert parse_criu_version("Version: 4.2\nGitID: v4.2\n") == (4, 2)
    assert parse_criu_version("Version: 3.17.1\n") == (3, 17)
    assert parse_criu_version("nonsense") is None


def test_criu_runs_as_the_user_with_only_the_capabilities_it_needs():
    args = criu.as_user(1001, 1002, criu.dump_args(Path("/c"), 5, "/d", leave_running=True))
    assert args[:3] == ["/usr/bin/setpriv", "--reuid=1001", "--regid=1002"]
    assert "--unprivileged" in args and "--leave-running" in args
    assert f"--ambient-caps={criu.CAPS}" in args and "sys_admin" not in criu.CAPS


def test_job_explain_shows_transparent_mode_from_the_script(tmp_path):
    assert transparent_requested([], "#!/bin/bash\n#SBATCH --transparent -N1\n")
    assert not transparent_requested(["--sla=basic"], "echo --transparent\n")
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --transparent --sla=basic -N1\npython t.py\n")
    out = subprocess.run([str(Path(sys.executable).parent / "singularity-admin"), "job",
                          "explain", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "transparent     yes" in out.stdout
    assert "not protected" not in out.stdout
