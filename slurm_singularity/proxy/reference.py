"""A small reference transformer LM and its training step, used by the
proxy's tests and benchmark to compare a run through the proxy with a run
without it.

It uses the operators the brief names (embedding, linear, layer_norm,
softmax attention with a causal mask, gelu, dropout, cross_entropy) and
AdamW, with data that depends only on the step number, so a worker that
restarts at step ``s`` sees the same batch an uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LMConfig:
    """Shape of the reference model and its batches."""

    vocab: int = 64
    dim: int = 32
    heads: int = 2
    layers: int = 2
    seq: int = 16
    batch: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab", "dim", "heads", "layers", "seq", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"LMConfig.{name} must be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"LMConfig.dim={self.dim} is not divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LMConfig.dropout={self.dropout} must be in [0, 1)")


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.out = nn.Linear(4 * cfg.dim, cfg.dim)
        self.register_buffer("mask", torch.triu(torch.ones(cfg.seq, cfg.seq, dtype=torch.bool), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.cfg.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        att = att.masked_fill(self.mask[:t, :t], float("-inf")).softmax(-1)
        att = F.dropout(att, self.cfg.dropout, self.training)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + F.dropout(self.proj(y), self.cfg.dropout, self.training)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.seq, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab)
        self.register_buffer("positions", torch.arange(cfg.seq))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(self.positions[: idx.shape[1]])
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def batch(cfg: LMConfig, step: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of ``step``: a function of the step only."""
    g = torch.Generator().manual_seed(seed + step)
    data = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def make(cfg: LMConfig, seed: int = 0) -> tuple[TinyLM, torch.optim.Optimizer]:
    """The model (initialised on the CPU from ``seed``) and its AdamW."""
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    return model, optimizer(model)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, foreach=False)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    """Forward, backward and the part before the optimizer; returns the loss
    (not read, so nothing waits)."""
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
    return loss


def param_sha256(model: nn.Module) -> str:
    """sha256 over the bytes of every parameter, in ``named_parameters`` order
    (values are read back from the proxy when they live there)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
