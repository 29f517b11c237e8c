"""Issue 19, item 10: the local cluster's MariaDB runs with grant tables
(slurmdbd logs in with a password kept in 0600 files), its data directory is
0700, so a local user can neither connect nor read or rewrite accounting,
while munged's socket is open to every user (sbatch works as sing-u1)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("login", ["root", "slurm", "sing-u1", ""])
def test_a_local_user_cannot_connect_to_the_accounting_database(slurm_cluster,
                                                                unprivileged_users, login):
    u1 = unprivileged_users[0]
    r = u1.run("mariadb", "--no-defaults", "-h", "127.0.0.1", "-P",
               str(slurm_cluster.spec.mysql_port), "-u", login,
               "-e", "UPDATE slurm_acct_singtest.acct_table SET deleted=1")
    assert r.returncode != 0, f"sing-u1 reached MariaDB as {login!r}: {r.stdout}"
    assert "Access denied" in r.stderr, r.stderr


def test_the_database_files_and_password_are_private(slurm_cluster, unprivileged_users):
    u1 = unprivileged_users[0]
    sd = slurm_cluster.spec.state_dir
    for path in (sd / "mysql", sd / "db.secret", sd / "etc" / "slurmdbd.conf",
                 sd / "munge" / "munge.key"):
        r = u1.run("cat" if path.name != "mysql" else "ls", str(path))
        assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r.stdout)


def test_a_local_user_can_talk_to_the_cluster(slurm_cluster, unprivileged_users):
    r = unprivileged_users[1].run("sinfo", "-h", "-o", "%P", env=slurm_cluster.env)
    assert r.returncode == 0, r.stderr
    assert "basic" in r.stdout
