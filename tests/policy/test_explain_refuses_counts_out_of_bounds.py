"""`job explain` reads sbatch options the way sbatch does; a count that sbatch
itself would refuse (a negative or absurd GPU count, a node count past any
cluster) is refused by name, never read as 0 GPUs or silently ignored."""

from __future__ import annotations

import pytest

from slurm_singularity.policy.sbatch_args import SbatchArgsError, parse_sbatch_args


@pytest.mark.parametrize("argv, words", [
    (["--gres=gpu:-3"], "--gres=gpu:-3: a GPU count must be a whole number between 0 and"),
    (["--gres=gpu:a100:1e3"], "--gres=gpu:a100:1e3: a GPU count"),
    (["--gpus=9999999"], "--gpus=9999999: a GPU count"),
    (["-G", "-1"], "--gpus=-1: a GPU count"),
    (["--nodes=99999999999"], "--nodes=99999999999: expected a whole number between 1 and"),
    (["--nodes=1-99999999999"], "--nodes=99999999999: expected a whole number"),
    (["--ntasks=0"], "--ntasks=0: expected a whole number between 1 and"),
])
def test_counts_out_of_bounds_are_refused_naming_the_option(argv, words):
    with pytest.raises(SbatchArgsError, match=None) as err:
        parse_sbatch_args(argv)
    assert words in str(err.value)


@pytest.mark.parametrize("argv, tres", [
    (["--gres=gpu:a100:4,foo:1"], "gres:gpu:a100:4,gres:foo:1"),
    (["--gres=gpu"], "gres:gpu"),
    (["--gres=gpu:0"], "gres:gpu:0"),
])
def test_well_formed_gpu_requests_still_parse(argv, tres):
    assert parse_sbatch_args(argv)[0].tres_per_node == tres
