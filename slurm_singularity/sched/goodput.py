"""A job's speed-up curve: how fast a data-parallel job runs on D of its W GPUs.

Elasticity is only worth its checkpoints if GPUs are not all alike to a job:
with a linear model (rate ``D/W``) shrinking a job never raises the
cluster's throughput, so under contention elasticity can only fill idle GPUs
and every resize is a loss. Real jobs scale sub-linearly (Pollux's
"goodput", OSDI '21; AFS, NSDI '21): part of a step is the gradient
all-reduce, which costs more across nodes than inside one. The planner
(which gives GPUs where they buy the most progress) and the simulator
(which charges jobs by it) share this one curve, so what the planner
assumes and what the simulator's jobs do differ only by each job's own sync
fraction, which the planner does not know (it uses ``default_sync_fraction``,
as the daemon must: Slurm does not tell it a job's curve).

The model, per step, relative to the job's rigid step on W devices (the
trace's duration is the job's time at W, so rigid schedulers are unchanged):

    step(D) / step(W) = k (1 - f) splice_overhead(k) + f sync(D) / sync(W)

with ``k = W / D`` logical ranks spliced per device, ``f`` the job's share
of a rigid step spent in the all-reduce, and ``sync(D)`` a ring all-reduce's
time per byte: ``2 (D - 1) / D`` divided by the bus bandwidth, intra-node
for ``D <= GPUS_PER_NODE``, inter-node above (``sync(1) = 0``: one device
reduces locally). ``rate = step(W) / step(D)``: 1 at D = W, rising in D
(``SYNC_FRACTION_MAX`` keeps it so), its efficiency per GPU falling.
"""

from __future__ import annotations

from functools import lru_cache

#: Step time of ``k = W / D`` logical ranks spliced on one device, relative
#: to ``k`` micro-batches of plain gradient accumulation, grows by this per
#: extra rank: ``splice_overhead(k) = 1 + SPLICE_COST_PER_RANK * (k - 1)``.
#: MEASURED by ``bench/splice.py`` at k = 8 (see ``sched/sim/constants.py``,
#: which cites the figures).
SPLICE_COST_PER_RANK = 0.012 / 7

#: GPUs of one node (the all-reduce of up to this many devices stays inside
#: a node). ASSUMPTION: Philly's and the simulator's nodes have 8 GPUs.
GPUS_PER_NODE = 8

#: Bus bandwidth of an intra-node ring all-reduce, bytes/s. ASSUMPTION: no
#: bench of the project measures it (the development machine has no GPU);
#: 100 GB/s is NCCL's all_reduce_perf bus bandwidth order on 8 NVLink GPUs.
#: Only its ratio to ``INTER_NODE_BUS_BYTES_PER_S`` matters to the model.
INTRA_NODE_BUS_BYTES_PER_S = 100e9

#: Bus bandwidth of an inter-node ring all-reduce, bytes/s. ASSUMPTION:
#: 100 Gb/s InfiniBand EDR per node (Philly's 2017 fabric), 12.5 GB/s; no
#: bench measures it.
INTER_NODE_BUS_BYTES_PER_S = 12.5e9

#: Sync fraction of a rigid step (all-reduce time / step time at W), drawn
#: per job uniformly in these ranges by W: one node (2..8 GPUs) and several
#: (> 8); 0 for W = 1. ASSUMPTION: the traces do not say; Pollux's and
#: AFS's profiles put communication at 5-25% of a step inside a node and
#: 15-45% across nodes for the models of 2017-2020.
SYNC_FRACTION_ONE_NODE = (0.05, 0.25)

#: Sync fraction range of a job of more than one node's GPUs (see above). ASSUMPTION.
SYNC_FRACTION_MULTI_NODE = (0.15, 0.45)

#: Largest sync fraction: above ~0.53 a job of 16 would run faster on 8 (one
#: node) than on 16, and the rate would not rise with D. ASSUMPTION (a bound
#: of the model, checked by tests/sched/test_goodput.py).
SYNC_FRACTION_MAX = 0.45


def splice_overhead(k: float) -> float:
    """Slow-down of a job running ``k = W / D`` ranks per device (1.0 at k = 1)."""
    return 1.0 + SPLICE_COST_PER_RANK * max(0.0, k - 1.0)


def sync_time(devices: int) -> float:
    """Seconds per byte of a ring all-reduce over ``devices`` (0 for one)."""
    if devices <= 1:
        return 0.0
    bw = INTRA_NODE_BUS_BYTES_PER_S if devices <= GPUS_PER_NODE else INTER_NODE_BUS_BYTES_PER_S
    return 2.0 * (devices - 1) / devices / bw


def sync_range(world_size: int) -> tuple[float, float]:
    """The range a job of ``world_size`` draws its sync fraction from."""
    if world_size <= 1:
        return (0.0, 0.0)
    return SYNC_FRACTION_ONE_NODE if world_size <= GPUS_PER_NODE else SYNC_FRACTION_MULTI_NODE


def default_sync_fraction(world_size: int) -> float:
    """The sync fraction the planner assumes (the middle of ``sync_range``):
    neither the daemon nor the planner knows a job's own."""
    lo, hi = sync_range(world_size)
    return (lo + hi) / 2.0


def draw_sync_fraction(world_size: int, job_id: int, seed: int) -> float:
    """A job's sync fraction, drawn uniformly in ``sync_range(world_size)``
    from ``(seed, job_id)`` alone (a hash, so every scheduler's run of one
    seed sees the same curves, whatever the order of events)."""
    lo, hi = sync_range(world_size)
    if hi <= 0:
        return 0.0
    h = (job_id * 0x9E3779B1 + (seed + 1) * 0x85EBCA77) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    return lo + (hi - lo) * (h / 0x100000000)


@lru_cache(maxsize=65536)
def rate(world_size: int, devices: int, sync_fraction: float) -> float:
    """Work seconds per second of a job of ``world_size`` on ``devices``
    (1.0 at ``devices == world_size``; 0 with none)."""
    if devices <= 0:
        return 0.0
    if devices >= world_size:
        return 1.0                # exactly: a rigid job runs the trace's duration
    k = world_size / devices
    f = sync_fraction
    rigid_sync = sync_time(world_size)
    sync = f * sync_time(devices) / rigid_sync if rigid_sync > 0 else 0.0
    return 1.0 / (k * (1.0 - f) * splice_overhead(k) + sync)


def planner_rate(world_size: int, devices: int) -> float:
    """``rate`` with the default sync fraction: the curve the planner plans with."""
    return rate(world_size, devices, default_sync_fraction(world_size))


def efficient_size(ladder: tuple[int, ...], world_size: int, share: float) -> int:
    """The smallest size of ``ladder`` (ascending) from which each step up
    still buys, per GPU added, at least ``share`` of the rate per GPU of the
    size below it (``planner_rate``); ``ladder[-1]`` when ``share`` is 0.
    Walks down from the top: the GPUs of a step that buys less are worth
    more to a job that waits."""
    size = ladder[-1]
    if share <= 0:
        return size
    for lower in reversed(ladder[:-1]):
        below = planner_rate(world_size, lower)
        gain = (planner_rate(world_size, size) - below) / (size - lower)
        if gain >= share * below / lower:
            break
        size = lower
    return size


def grow_gain_s(world_size: int, cur: int, nxt: int, window_s: float) -> float:
    """Work seconds a grow from ``cur`` to ``nxt`` devices gains over
    ``window_s`` seconds (``planner_rate``)."""
    return (planner_rate(world_size, nxt) - planner_rate(world_size, cur)) * window_s
