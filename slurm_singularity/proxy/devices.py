"""Which devices a proxy can own, and what they report.

pynvml is the one way we look at GPUs without creating a CUDA context: a
proxy must be the only process with a context on its device, so discovery
and monitoring must not make one. Without GPUs (this project's test machines)
the proxy's device is emulated by the CPU.
"""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger(__name__)


def _nvml():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "pynvml is deprecated"
        import pynvml
    return pynvml


def gpu_count() -> int:
    """GPUs that NVML sees; 0 when NVML or a driver is missing."""
    try:
        pynvml = _nvml()
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # no driver, no library: no GPUs
        log.debug("[node] NVML unavailable: %s", err)
        return 0


def gpu_report(index: int) -> dict[str, object]:
    """Memory and utilization of GPU ``index`` from NVML; empty if none."""
    try:
        pynvml = _nvml()
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            name = pynvml.nvmlDeviceGetName(h)
            return {"name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_used": int(mem.used), "memory_total": int(mem.total),
                    "utilization_pct": int(util.gpu)}
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:
        log.debug("[node] NVML report for GPU %s failed: %s", index, err)
        return {}
