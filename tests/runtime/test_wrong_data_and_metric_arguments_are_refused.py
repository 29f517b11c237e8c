"""Issue 17, items 3 and 4: what the trainer cannot use as data is refused
when it is built, naming what was passed and what is accepted; a DataLoader
it can use trains as its dataset would; wrong metric calls name the metric."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from slurm_singularity.runtime.api import JobShape, RuntimeSetupError
from slurm_singularity.runtime.job import Job

W = 4


def job() -> Job:
    return Job(shape=JobShape(W, 1), device=torch.device("cpu"), deterministic=True,
               ckpt_dir=None)


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(64, 3, generator=gen), torch.randn(64, 1, generator=gen))


def train(dataset, steps: int = 5, **kwargs) -> str:
    model, opt = model_and_optimizer()
    trainer = job().trainer(model, opt, dataset, batch_size=2, **kwargs)
    for step in trainer.steps(steps):
        for x, y in step.batches():
            F.mse_loss(model(x), y).backward()
    return trainer.params_sha256()


def refusal(dataset, **kwargs) -> str:
    model, opt = model_and_optimizer()
    with pytest.raises(RuntimeSetupError) as caught:
        job().trainer(model, opt, dataset, batch_size=2, **kwargs)
    return str(caught.value)


def test_a_generator_is_refused_naming_it_and_what_the_trainer_accepts():
    message = refusal(x for x in range(10))
    assert "dataset=<generator object" in message
    assert "map-style dataset" in message and "IterableDataset" in message
    assert "DataLoader" in message


def test_a_dataloader_with_a_sampler_of_its_own_is_refused_naming_the_sampler():
    loader = DataLoader(data(), batch_size=2,
                        sampler=DistributedSampler(data(), num_replicas=W, rank=0))
    message = refusal(loader)
    assert "sampler=DistributedSampler" in message and "shards the dataset" in message


def test_a_dataloader_whose_batch_size_differs_from_the_trainers_is_refused_naming_both():
    message = refusal(DataLoader(data(), batch_size=8, shuffle=True))
    assert "batch_size=8" in message and "batch_size=2" in message


def test_a_dataloader_and_a_collate_given_twice_are_refused():
    message = refusal(DataLoader(data(), batch_size=2), collate=lambda items: items)
    assert "collate_fn in the DataLoader" in message


def test_a_dataloader_gives_the_trainer_its_batch_size_and_without_it_the_trainer_asks():
    model, opt = model_and_optimizer()
    assert job().trainer(model, opt, DataLoader(data(), batch_size=3)).batch_size == 3
    with pytest.raises(RuntimeSetupError, match="batch_size .* is required"):
        job().trainer(model, opt, data())


def test_a_dataloader_without_workers_trains_exactly_as_its_dataset_and_shuffle_would():
    assert train(DataLoader(data(), batch_size=2, shuffle=True)) == train(data())
    assert train(DataLoader(data(), batch_size=2)) == train(data(), shuffle=False)
    assert train(data(), shuffle=False) != train(data())


def test_a_metric_reduced_with_an_unknown_op_or_outside_its_place_names_the_problem():
    model, opt = model_and_optimizer()
    trainer = job().trainer(model, opt, data(), batch_size=2)
    steps = trainer.steps(1)
    step = next(steps)
    with pytest.raises(RuntimeSetupError, match="outside a turn"):
        step.record("loss", 1.0)
    for x, y in step.batches():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        with pytest.raises(RuntimeSetupError, match="before the loop"):
            step.reduce("loss")
        with pytest.raises(RuntimeSetupError, match="not one value"):
            step.record("loss", model(x))
        step.record("loss", loss)
    with pytest.raises(RuntimeSetupError, match="op='median' is not one of 'mean'"):
        step.reduce("loss", op="median")
    with pytest.raises(RuntimeSetupError, match="metric 'acc' was not recorded by logical "
                                                 r"rank\(s\) 0, 1, 2, 3"):
        step.reduce("acc")
    assert step.reduce("loss", op="max") >= step.reduce("loss", op="mean")


class Three(torch.utils.data.IterableDataset):
    """Three samples: logical rank 0 of 4 gets one, rank 3 none."""

    def __iter__(self):
        samples = data()
        for i in range(3):
            yield samples[i]


def test_an_iterable_dataset_too_short_for_one_micro_batch_names_the_rank_and_the_counts():
    model, opt = model_and_optimizer()
    trainer = job().trainer(model, opt, Three(), batch_size=2)
    with pytest.raises(RuntimeSetupError, match="IterableDataset gives logical rank 0 of 4 1 "
                                                 "samples in epoch 1, fewer than batch_size=2"):
        for step in trainer.steps(1):
            for x, y in step.batches():
                F.mse_loss(model(x), y).backward()
