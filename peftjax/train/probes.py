"""Process memory probes for run summaries: peak and current RSS, and a reset of the kernel's peak counter so
that each phase of a run (load, first step with compilation, steady training) is measured on its own.

Device memory is XLA's to report: :func:`peftjax.train.step.step_memory` reads the compiled step's allocation.
"""
from __future__ import annotations

import resource
from pathlib import Path


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes; None where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or since the last :func:`reset_peak_rss`."""
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is not available)."""
    return _proc_status_bytes("VmRSS") or 0


def release_freed_memory() -> None:
    """Hand memory freed by Python and XLA back to the OS (glibc keeps freed heap pages resident otherwise), so
    that RSS measures live memory: the dense base a quantized model was made from, for one."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may then include freed memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs`` 5) so a phase can be measured on its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def warm_up_compiler() -> None:
    """Compile and run one small jitted function, so that the XLA compiler's one-time start-up memory (about 200 MiB
    on a CPU) is part of the process baseline (``rss_start_bytes``) and not charged to whichever phase compiles
    first: quantizing a base on load compiles, reading a float32 base does not, and both train afterwards."""
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))))


def device_peak_bytes() -> int | None:
    """The accelerator allocator's peak bytes in use (``memory_stats()["peak_bytes_in_use"]`` of this process's
    first device: a GPU's or TPU's); None on a CPU, whose runtime keeps no such statistics."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")
