"""Every constant of the simulator's job model, in one place, with its source.

Each cost says which benchmark of ``bench/`` measured it and the figure, so a
reader can re-measure it on their own machine and see what moves
(``tests/sched/test_sim_constants.py`` checks that every constant names its
provenance). Where nothing measures a quantity, the constant says
``ASSUMPTION`` and why its value was chosen; where it is Slurm's own setting
it says ``SLURM`` and where the value comes from (the project's templates, or
Slurm 22.05's documented default). Changing one changes every scheduler
alike: no scheduler gets a cost model of its own.

The benchmarks ran on the project's 2-core development machine (local disk,
CPU only, shared with other work), so the checkpoint bandwidth is a local
disk's; a site with a parallel file system measures its own with
``bench/checkpoint.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .. import goodput

# -- checkpoint and restore ---------------------------------------------------

#: Fixed part of a durable checkpoint, seconds (serialize, checksum, fsync,
#: rename, metadata, directory fsync). MEASURED by ``bench/checkpoint.py``
#: (2026-11-30): 39.7 MB durable in 44.8 ms, 154.7 MB in 117.8 ms (medians of
#: 25 and 9 rounds); the line through both points has this intercept.
CHECKPOINT_FIXED_S = 0.0196

#: Checkpoint write bandwidth, bytes/s. MEASURED by ``bench/checkpoint.py``:
#: the slope of the same two points (154.7 MB in 117.8 ms, 39.7 MB in 44.8 ms).
CHECKPOINT_BYTES_PER_S = 1.575e9

#: Bytes of one replica's state (parameters + optimizer state) of a trace job;
#: with replica splicing a checkpoint holds one replica whatever W is
#: (``bench/checkpoint.py``: checkpoint bytes / replica bytes = 1.0016).
#: ASSUMPTION: the traces do not say; 2 GB is a 125M-parameter model trained
#: with Adam (16 bytes per parameter), larger than most of Philly's 2017
#: models (ResNet-50 with momentum: 0.2 GB).
STATE_BYTES = 2.0e9

#: Seconds from a requeued job's start to its first new training step
#: (process start, imports, rendezvous, restore). MEASURED by
#: ``bench/preempt.py``: 2.83 s with the runtime's restore, 2.85 s from step 0
#: (the restore of that job's state is within noise); the restore of a
#: ``STATE_BYTES`` state is charged on top (``restore_s``).
RESTART_S = 2.83

#: Seconds from a preemption signal to the GPUs being free, besides the
#: checkpoint itself (signal delivery, agreement at a step boundary, exit,
#: slurmd's clean-up). MEASURED by ``bench/preempt.py``: premium submitted
#: -> premium running 2.35 s, of which the checkpoint write was 0.015 s.
HANDOVER_S = 2.33

# -- Slurm ----------------------------------------------------------------------

#: Seconds a job requeued by Slurm is not eligible to start again.
#: MEASURED by ``bench/preempt.py``: requeue wait 10.6 s (Slurm 22.05 sets
#: ``EligibleTime`` to the requeue plus ``cred_expire``; the templates set
#: ``cred_expire=10``, Slurm's default 120 would make it ~121 s).
SLURM_REQUEUE_S = 10.6

#: Seconds between Slurm's scheduling passes. SLURM: the templates set
#: ``SchedulerParameters=sched_interval=2,bf_interval=2``
#: (``templates/slurm.conf.j2``).
SLURM_PERIOD_S = 2.0

#: Slurm's backfill looks at most this many jobs past the first blocked one
#: per pass. SLURM: ``bf_max_job_test``, default 500 (the templates keep it).
SLURM_BF_MAX_JOB_TEST = 500

#: Multifactor priority weight of fair-share. SLURM: the templates leave ``PriorityType``
#: unset, which is ``priority/basic`` (first come, first served); the
#: baseline instead enables ``priority/multifactor`` with the weights of the
#: example configuration in Slurm's multifactor documentation
#: (``PriorityWeightFairshare=10000``, ``PriorityWeightAge=1000``), the
#: fair-share a site that cares about it turns on. Job size, QOS and
#: partition weights are 0 (partition order comes from ``PriorityTier``).
SLURM_WEIGHT_FAIRSHARE = 10000.0

#: SLURM: ``PriorityWeightAge``, 1000 as in the same example (see above).
SLURM_WEIGHT_AGE = 1000.0

#: Age at which the age factor reaches 1, seconds. SLURM: ``PriorityMaxAge``
#: default 7-0 (7 days).
SLURM_MAX_AGE_S = 7 * 86400.0

#: Half-life of the recorded usage that fair-share compares, seconds. SLURM:
#: ``PriorityDecayHalfLife`` default 7-0 (7 days).
SLURM_DECAY_HALF_LIFE_S = 7 * 86400.0

#: Seconds between recomputations of every pending job's priority. SLURM:
#: ``PriorityCalcPeriod`` default 5 minutes.
SLURM_PRIORITY_CALC_S = 300.0

#: A job's time limit (what EASY backfill plans with) as a multiple of its
#: run time at full size. ASSUMPTION: Philly has no user limits; users
#: overestimate (Tsafrir et al., TPDS 2007, report median estimates 2-5x the
#: run time), so 2 is a generous, backfill-friendly choice for the baseline.
SLURM_TIME_LIMIT_FACTOR = 2.0

# -- the scheduler-hook daemon -------------------------------------------------

#: Seconds between the daemon's passes (observe -> plan -> act).
#: CONFIGURED: ``singularity-schedd --period`` default 2 s
#: (``cli/schedd.py``); issue 19's load test saw a pass every ~2.5 s with
#: 500 jobs.
DAEMON_PERIOD_S = 2.0

#: Seconds a step must have run before the daemon signals it.
#: CONFIGURED: ``step_settle_s`` = 3.0 in ``sched/executor.py`` (found by
#: ``make demo``: a step signalled earlier died before its handlers existed).
DAEMON_SETTLE_S = 3.0

#: Seconds from the daemon's decision to the job running at its new size,
#: besides the checkpoint. MEASURED by ``bench/resize.py``: median of six
#: resizes 1.99 s (shrink 2.41 s, grow 1.08 s); a plain ``scontrol requeue``
#: cycle takes 11.26 s.
DAEMON_RESIZE_S = 1.99

# -- replica splicing -----------------------------------------------------------

#: Step time of ``k = W / D`` logical ranks spliced on one device, relative
#: to ``k`` micro-batches of plain gradient accumulation, grows by this per
#: extra rank: ``splice_overhead(k) = 1 + SPLICE_COST_PER_RANK * (k - 1)``.
#: MEASURED by ``bench/splice.py`` at k = 8: 23.8 ms vs 23.5 ms a step, ratio
#: 1.012 (a second run 0.975,
#: pair medians 0.988-0.993, on a quiet machine): 0.012 / 7 per extra rank.
#: CPU only; on a GPU the figure is still to be taken. (Defined in
#: ``sched/goodput.py``, the speed-up curve the planner shares.)
SPLICE_COST_PER_RANK = goodput.SPLICE_COST_PER_RANK

# -- sub-linear scaling (sched/goodput.py: the curve, shared with the planner) --

#: GPUs per node of the all-reduce model. ASSUMPTION (``sched/goodput.py``):
#: Philly's nodes have 8 GPUs.
GPUS_PER_NODE = goodput.GPUS_PER_NODE

#: Intra-node all-reduce bus bandwidth, bytes/s. ASSUMPTION
#: (``sched/goodput.py``): 100 GB/s, NVLink-class; no bench measures it.
INTRA_NODE_BUS_BYTES_PER_S = goodput.INTRA_NODE_BUS_BYTES_PER_S

#: Inter-node all-reduce bus bandwidth, bytes/s. ASSUMPTION
#: (``sched/goodput.py``): 100 Gb/s InfiniBand EDR, 12.5 GB/s.
INTER_NODE_BUS_BYTES_PER_S = goodput.INTER_NODE_BUS_BYTES_PER_S

#: Sync (all-reduce) fraction of a rigid step of a one-node job (2-8 GPUs),
#: drawn uniformly per job from the seed. ASSUMPTION (``sched/goodput.py``).
SYNC_FRACTION_ONE_NODE = goodput.SYNC_FRACTION_ONE_NODE

#: The same for a job of more than 8 GPUs. ASSUMPTION (``sched/goodput.py``).
SYNC_FRACTION_MULTI_NODE = goodput.SYNC_FRACTION_MULTI_NODE

# -- the simulator itself -------------------------------------------------------

#: Elastic range given to a trace job that asks for W GPUs and has none of
#: its own: MIN is the smallest divisor D of W with W / D <= this, MAX is W.
#: ASSUMPTION: the traces have no elastic ranges; 8 stays below the
#: default policy's ``elastic.max_splice_factor`` (16).
ELASTIC_MAX_SPLICE = 8

#: Tiresias' queue limits on attained service, GPU-seconds: Q0 below the
#: first, Q1 below the second, Q2 above. FROM THE ARTIFACT:
#: SymbioticLab/Tiresias ``simulator/jobs.py`` (``num_queue = 3``,
#: ``queue_limit = [3250, 7200, 18000]``; the last limit is never used, a job
#: leaves only a queue that is not the last), schedule ``dlas-gpu``.
TIRESIAS_THRESHOLDS_GPU_S = (3250.0, 7200.0)

#: Tiresias' starvation knob: a job pending for this many times its executed
#: time goes back to Q0 (0 = never). FROM THE ARTIFACT: ``sim_runs.sh`` runs
#: ``dlas-gpu``, which is ``dlas_sim_jobs(gputime=True, solve_starvation=0)``;
#: ``tiresias:K`` runs its ``dlas-gpu-K`` variants.
TIRESIAS_PROMOTE_KNOB = 0.0

#: Interval (simulated seconds) of the time series that the plots draw.
#: ASSUMPTION (plot resolution only).
SAMPLE_EVERY_S = 3600.0


def checkpoint_s(state_bytes: float = STATE_BYTES) -> float:
    """Seconds to a durable checkpoint of ``state_bytes`` (``bench/checkpoint.py``)."""
    return CHECKPOINT_FIXED_S + state_bytes / CHECKPOINT_BYTES_PER_S


def restore_s(state_bytes: float = STATE_BYTES) -> float:
    """Seconds from a restarted job's start to its first step: ``RESTART_S``
    plus reading ``state_bytes`` at the checkpoint bandwidth (ASSUMPTION:
    reading is no slower than the measured durable write)."""
    return RESTART_S + state_bytes / CHECKPOINT_BYTES_PER_S


splice_overhead = goodput.splice_overhead


class Scaling(enum.Enum):
    """How a job's rate depends on its devices (``Costs.scaling``); no lifecycle."""

    #: ``sched/goodput.py``'s curve, each job with its own sync fraction.
    SUBLINEAR = "sublinear"
    #: Rate ``D/W`` over the splice overhead: every sync fraction 0 (the
    #: ablation that shows what the sub-linear model is worth).
    LINEAR = "linear"


@dataclass(frozen=True)
class Costs:
    """What the engine charges a scheduler's decisions (one per scheduler)."""

    #: Seconds between scheduling passes: events are handled at the next
    #: multiple of it (0: at the event's own time).
    period_s: float = DAEMON_PERIOD_S
    #: Seconds a job's step must have run before it can be signalled; a
    #: preemption or resize of a younger step waits until then.
    settle_s: float = DAEMON_SETTLE_S
    #: Seconds a preempted or shrunk job keeps the GPUs it gives up, besides
    #: its checkpoint (a job killed without one keeps them this long).
    handover_s: float = HANDOVER_S
    #: Seconds a job restarted by the scheduler waits beyond its restore
    #: (the daemon's requeue-to-running latency; Slurm's own requeue wait is
    #: ``SLURM_REQUEUE_S``, kept by the slurm scheduler as an eligibility time).
    restart_s: float = DAEMON_RESIZE_S
    #: Bytes of one replica's state (checkpoint and restore size).
    state_bytes: float = STATE_BYTES
    #: The job model's speed-up curve (``Scaling``): every scheduler of a
    #: comparison gets the same; ``linear`` is an ablation.
    scaling: Scaling = Scaling.SUBLINEAR

    def __post_init__(self) -> None:
        if not isinstance(self.scaling, Scaling):
            raise ValueError(f"Costs.scaling: must be a Scaling "
                             f"({', '.join(s.value for s in Scaling)}), got {self.scaling!r}")
        for name in ("period_s", "settle_s", "handover_s", "restart_s", "state_bytes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1e12:
                raise ValueError(f"Costs.{name}: must be a number in [0, 1e12), got {value!r}")

    @property
    def checkpoint_s(self) -> float:
        return checkpoint_s(self.state_bytes)

    @property
    def restore_s(self) -> float:
        return restore_s(self.state_bytes)


#: Every scheduler that runs as this project's daemon would (singularity,
#: tiresias, las-tiers) pays these.
DAEMON_COSTS = Costs()

#: Slurm alone: passes at ``sched_interval``, no settle time (Slurm signals
#: at once), no extra restart latency (its requeue wait is an eligibility time).
SLURM_COSTS = Costs(period_s=SLURM_PERIOD_S, settle_s=0.0, restart_s=0.0)
