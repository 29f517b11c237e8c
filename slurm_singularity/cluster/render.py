"""Render every file the local cluster's Slurm reads from the Jinja2
templates in ``templates/``.

Pure apart from reading the templates: ``render_cluster_files`` returns
file name -> text, and ``local.py`` writes them. The partitions, preemption
settings and job_submit.lua come from the policy (``policy.render``), so the
cluster always runs the policy that ``policy apply`` would install.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import jinja2

from .. import contract, paths
from ..policy.api import Policy
from .api import ClusterSpec


#: Lifetime of a job step credential, seconds. Slurm 22.05 also makes a
#: requeued job wait this long before it may start again (EligibleTime =
#: requeue time + about cred_expire); the default of 120 s left preempted
#: jobs idle on free GPUs, so the local cluster uses a short one.
CRED_EXPIRE_S = 10


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)


def render_cluster_files(spec: ClusterSpec, policy: Policy, spank_plugin: Path | None,
                         db_password: str = "") -> dict[str, str]:
    """slurm.conf, gres.conf, cgroup.conf, plugstack.conf and the policy's
    files (policy.conf, job_submit.lua) for ``spec``; slurmdbd.conf (with
    ``db_password``, slurmdbd's MariaDB password) when it has accounting."""
    from ..policy.render import render_policy_files

    policy_files = render_policy_files(policy, spec.node_range)
    values = dict(
        cluster_name=spec.cluster_name,
        hostname=socket.gethostname(),
        ctld_port=spec.ctld_port,
        slurmd_base_port=spec.slurmd_base_port,
        slurmd_port_range=(str(spec.slurmd_base_port) if spec.nodes == 1 else
                           f"[{spec.slurmd_base_port}-{spec.slurmd_base_port + spec.nodes - 1}]"),
        munge_socket=spec.munge_socket,
        state_dir=spec.state_dir,
        conf_dir=spec.conf_dir,
        dev_dir=spec.state_dir / "dev",
        node_range=spec.node_range,
        nodes=spec.node_names,
        cpus_per_node=spec.cpus_per_node,
        memory_mb_per_node=spec.memory_mb_per_node,
        gpus_per_node=spec.gpus_per_node,
        requeue_exit_code=contract.REQUEUE_EXIT_CODE,
        cred_expire_s=CRED_EXPIRE_S,
        job_submit="job_submit.lua" in policy_files,
        spank_plugin=spank_plugin,
        spank_python=sys.executable,     # runs the step's device proxies
        dbd_port=spec.dbd_port if spec.accounting else 0,
        mysql_port=spec.mysql_port,
        db_password=db_password,
    )
    env = environment()
    files = {name: env.get_template(f"{name}.j2").render(**values)
             for name in ("slurm.conf", "gres.conf", "cgroup.conf", "plugstack.conf")}
    if spec.accounting and spec.owns_services:
        files["slurmdbd.conf"] = env.get_template("slurmdbd.conf.j2").render(**values)
    if spec.gpus_per_node == 0:
        files["gres.conf"] = "# no emulated GPUs\n"
        files["slurm.conf"] = files["slurm.conf"].replace(" Gres=gpu:0", "")
    files.update(policy_files)
    return files
