"""A plain LightningModule (an MLP with dropout, AdamW, a per-step LR
schedule, `self.log`) trained with `Trainer(strategy=SingularityStrategy())`
under singularity-run; prints `final step=N params_sha256=...` on device 0.
`--bad WHAT` makes it use one thing the strategy does not support."""
import argparse
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from slurm_singularity.runtime.integrations.lightning import SingularityStrategy


class Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(8), torch.zeros(1))] * 64)


class Regressor(pl.LightningModule):
    def __init__(self, step_sleep: float = 0.0, bad: str = ""):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
        self.step_sleep, self.bad = step_sleep, bad
        self.automatic_optimization = bad not in ("manual", "two-optimizers")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        if self.bad == "two-optimizers":
            return [opt, torch.optim.SGD(self.parameters(), lr=0.1)]
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        interval = "epoch" if self.bad == "epoch-scheduler" else "step"
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}

    def train_dataloader(self):
        if self.bad == "iterable":
            return DataLoader(Stream(), batch_size=4)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 8, generator=g)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(256, 1, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--bad", default="", choices=["", "manual", "two-optimizers", "iterable",
                                                 "epoch-scheduler", "accumulate", "no-max-steps"])
    args = p.parse_args()
    torch.manual_seed(0)
    model = Regressor(args.step_sleep, args.bad)
    strategy = SingularityStrategy(seed=0)
    trainer = pl.Trainer(strategy=strategy, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         max_steps=-1 if args.bad == "no-max-steps" else args.steps,
                         accumulate_grad_batches=2 if args.bad == "accumulate" else 1)
    trainer.fit(model)
    if strategy.job.is_main:
        rt = strategy.runtime_trainer
        print(f"final step={rt.step} global_step={trainer.global_step} "
              f"params_sha256={rt.params_sha256()}", flush=True)


if __name__ == "__main__":
    main()
