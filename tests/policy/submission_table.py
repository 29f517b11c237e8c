"""One table of submissions with what the default policy must do with each;
the rules (job explain), the generated job_submit.lua and the real cluster
are all checked against it."""

from __future__ import annotations

from dataclasses import dataclass

from slurm_singularity.policy.rules import Submission


@dataclass(frozen=True)
class Case:
    name: str
    #: sbatch options (also parsed by job explain)
    argv: tuple[str, ...]
    #: what job_submit.lua sees
    sub: Submission
    #: expected: partition, or None if rejected
    partition: str | None
    #: substring of the rejection message, or of the job tag when accepted
    expect: str
    #: rejected already by the SPANK plugin in sbatch (syntax)
    by_plugin: bool = False


CASES = (
    Case("unknown tier", ("--sla=gold",), Submission(sla="gold"), None,
         "--sla=gold: unknown tier", by_plugin=True),
    Case("elastic min above max", ("--elastic=8:2", "--gres=gpu:4"),
         Submission(elastic="8:2", tres_per_node="gres:gpu:4"), None,
         "--elastic=8:2: MIN must not exceed MAX", by_plugin=True),
    Case("elastic not numbers", ("--elastic=2:x",), Submission(elastic="2:x"), None,
         "--elastic=2:x: expected MIN:MAX", by_plugin=True),
    Case("world size zero", ("--world-size=0",), Submission(world_size="0"), None,
         "--world-size=0: expected a whole number", by_plugin=True),
    Case("proxy maybe", ("--proxy=maybe",), Submission(proxy="maybe"), None,
         "--proxy=maybe: expected on or off", by_plugin=True),
    Case("deterministic maybe", ("--deterministic=maybe",), Submission(deterministic="maybe"),
         None, "--deterministic=maybe: expected on or off", by_plugin=True),
    Case("relative checkpoint dir", ("--ckpt-dir=ckpt",), Submission(ckpt_dir="ckpt"), None,
         "--ckpt-dir=ckpt: expected an absolute path", by_plugin=True),
    Case("world size not a multiple of the elastic range",
         ("--world-size=6", "--elastic=4:8", "--gres=gpu:4"),
         Submission(world_size="6", elastic="4:8", tres_per_node="gres:gpu:4"), None,
         "--world-size=6: must be a multiple of 4"),
    Case("tier the account may not use", ("--sla=premium",), Submission(sla="premium"), None,
         "--sla=premium: account default may not use this tier"),
    Case("unknown account", ("--account=nobody",), Submission(account="nobody"), None,
         "--account=nobody: not an account of the policy"),
    Case("more GPUs than the quota", ("--gres=gpu:8", "--nodes=5"),
         Submission(tres_per_node="gres:gpu:8", min_nodes=5), None,
         "the job may hold 40 GPUs but account default has a gpu_quota of 32"),
    Case("GPUs counted on the largest node count", ("--gres=gpu:2", "--nodes=1-2",
                                                    "--elastic=2:2"),
         Submission(tres_per_node="gres:gpu:2", min_nodes=1, max_nodes=2, elastic="2:2"), None,
         "--elastic=2:2: the job asks for 4 GPUs"),
    Case("GPUs outside the elastic range", ("--elastic=2:4", "--gres=gpu:8"),
         Submission(elastic="2:4", tres_per_node="gres:gpu:8"), None,
         "--elastic=2:4: the job asks for 8 GPUs"),
    Case("partition contradicting the tier", ("--sla=basic", "--partition=standard"),
         Submission(sla="basic", partition="standard"), None,
         "--partition=standard is tier standard, which contradicts --sla=basic"),
    Case("splice factor above the policy's", ("--world-size=64", "--gres=gpu:2"),
         Submission(world_size="64", tres_per_node="gres:gpu:2"), None,
         "more than 16 ranks"),
    Case("plain job", (), Submission(), "standard",
         "singularity:sla=standard,elastic=1:1,ws=1"),
    Case("basic elastic job", ("--sla=basic", "--elastic=2:8", "--world-size=8",
                               "--gres=gpu:8"),
         Submission(sla="basic", elastic="2:8", world_size="8", tres_per_node="gres:gpu:8"),
         "basic", "singularity:sla=basic,elastic=2:8,ws=8"),
    Case("elastic job without world size", ("--sla=basic", "--elastic=2:8", "--gres=gpu:4"),
         Submission(sla="basic", elastic="2:8", tres_per_node="gres:gpu:4"),
         "basic", "singularity:sla=basic,elastic=2:8,ws=8"),
    Case("premium through the research account",
         ("--sla=premium", "--account=research", "--gpus=4"),
         Submission(sla="premium", account="research", tres_per_job="gres:gpu:4"),
         "premium", "singularity:sla=premium,elastic=4:4,ws=4"),
    Case("tier from the partition", ("--partition=basic", "--gres=gpu:2", "--world-size=4"),
         Submission(partition="basic", tres_per_node="gres:gpu:2", world_size="4"),
         "basic", "singularity:sla=basic,elastic=2:2,ws=4"),
    Case("GPUs per node times nodes", ("--gres=gpu:2", "--nodes=2", "--elastic=2:4"),
         Submission(tres_per_node="gres:gpu:2", min_nodes=2, elastic="2:4"),
         "standard", "singularity:sla=standard,elastic=2:4,ws=4"),
    Case("checkpoint dir and proxy", ("--ckpt-dir=/tmp/ck", "--proxy=on", "--gres=gpu:1"),
         Submission(ckpt_dir="/tmp/ck", proxy="on", tres_per_node="gres:gpu:1"),
         "standard", "singularity:sla=standard,elastic=1:1,ws=1"),
    Case("transparent on two nodes", ("--transparent", "--nodes=2"),
         Submission(transparent="", min_nodes=2), None,
         "--transparent with 2 nodes: transparent mode runs on one node only"),
    Case("transparent on two to four nodes", ("--transparent", "-N", "2-4"),
         Submission(transparent="", min_nodes=2, max_nodes=4), None,
         "--transparent with 4 nodes: transparent mode runs on one node only"),
    Case("transparent on one node", ("--transparent", "--nodes=1"),
         Submission(transparent="", min_nodes=1), "standard",
         "singularity:sla=standard,elastic=1:1,ws=1,transparent=1"),
    Case("not deterministic", ("--deterministic=off", "--gres=gpu:2"),
         Submission(deterministic="off", tres_per_node="gres:gpu:2"),
         "standard", "singularity:sla=standard,elastic=2:2,ws=2"),
)
