"""Every constant of the simulator's job model, in one place, with its source.

The numbers below are PLACEHOLDERS until the runtime's benchmarks
(``bench/splice.py``, ``bench/checkpoint.py``) publish measured values; they
are the figures Singularity (Shukla et al., 2022) reports for its own
mechanisms, rounded up. Changing one changes every scheduler alike.
"""

from __future__ import annotations

#: Replica splicing overhead: a job with D < W devices progresses at
#: ``(D / W) / SPLICE_OVERHEAD`` of its full rate (1.0 at D == W). Placeholder:
#: Singularity reports ~3% for time-slicing replicas on one device.
SPLICE_OVERHEAD = 1.03

#: Seconds a job spends writing its checkpoint when it is preempted or resized
#: (no progress; its devices are counted busy). Placeholder: "a few seconds".
CHECKPOINT_S = 5.0

#: Seconds a job spends restoring its checkpoint when it starts again or
#: resumes at a new size (no progress). Placeholder: "a few seconds".
RESTORE_S = 5.0

#: Events closer together than this (seconds) are handled in one scheduling
#: pass, as the daemon would see them in one observation. 0 = only events at
#: the same instant share a pass.
COALESCE_S = 0.0

#: Elastic range given to a trace job that asks for W GPUs and has none of
#: its own: MIN is the smallest divisor D of W with W / D <= this, MAX is W.
ELASTIC_MAX_SPLICE = 8

#: Tiresias (Gu et al., NSDI'19) discretized 2D-LAS: queue thresholds on
#: attained service in GPU-seconds (queue 0 below the first, ...). The paper
#: uses two queues; the threshold is its order of magnitude for Philly-like jobs.
TIRESIAS_THRESHOLDS_GPU_S = (3600.0 * 4,)

#: Slurm's backfill looks at most this many jobs past the first blocked one
#: per pass (``SchedulerParameters=bf_max_job_test``; 500 is Slurm's default).
SLURM_BF_MAX_JOB_TEST = 500

#: Interval (simulated seconds) of the time series that the plots draw.
SAMPLE_EVERY_S = 3600.0
