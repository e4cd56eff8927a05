"""The measuring code shared by the benchmark scripts (``bench_grpo.py``, ``bench_wrapper.py``).

- ``offline()``: the environment of every measurement (offline hub, no wandb, quiet tokenizers) and
  the repository on ``sys.path`` (the scripts run without ``pip install -e .``).
- ``Runner``: each call runs one function in a fresh process forked from a fork server that imported
  torch and transformers once, so no measurement inherits a heap, thread pool or CUDA state.
- ``alternating``: the order of the sides rotates every repeat (a b, b a, a b, ...) so drift cancels.
- ``kept_steps``, ``median``, ``quartiles``, ``paired_ratio``: the first step of a run is warm-up and
  dropped; medians over what is kept.
- ``PeakMemory``: peak memory of a block above the memory at its start (CPU: resident set, from the
  kernel's high-water mark and a sampling thread; CUDA: allocated bytes).
- ``format_table``: aligned text columns.

Standard library only at import time: the orchestrating process never imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.M)


def offline() -> None:
    """Offline hub, wandb off, quiet tokenizers; the repository importable (before importing ``pipeline``)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("WANDB_MODE", "disabled"), ("WANDB_SILENT", "true")):  # fmt: skip
        os.environ.setdefault(key, value)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------- processes
class Runner:
    """``runner(fn, *args)``: ``fn(*args)`` in a fresh process (a fork-server child), its result returned.

    ``fn`` must be a module-level function (it is pickled by name); ``preload`` lists the modules the
    fork server imports once (missing ones are skipped).
    """

    def __init__(self, preload: Sequence[str]) -> None:
        start = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self.ctx = multiprocessing.get_context(start)
        if start == "forkserver":
            self.ctx.set_forkserver_preload(list(preload))

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        with ProcessPoolExecutor(max_workers=1, mp_context=self.ctx) as pool:  # one task: a fresh process
            return pool.submit(fn, *args).result()


def set_threads(threads: int | None) -> None:
    """torch intra-op threads of a measuring process (0 or None: torch's default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- order and statistics
def alternating(items: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """``(repeat, item)`` with the order rotating every repeat: a b, b a, a b, ... (drift cancels)."""
    for r in range(repeats):
        k = r % len(items)
        for item in [*items[k:], *items[:k]]:
            yield r, item


def kept_steps(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps of every run but its first one (warm-up: allocations, lazy initialisation)."""
    return [step for run in runs for step in run["steps"][1:]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")  # within the data: never below the fastest step
    return q[0], q[2]


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over repeats of ``time / base time`` in the same repeat (cancels drift slower than a repeat)."""
    return median([t / b for t, b in zip(times, base, strict=True)])


def format_table(rows: list[Sequence[str]], aligns: str) -> list[str]:
    """Rows of cells (the first one the header) as lines; ``aligns`` has one ``<`` or ``>`` per column."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths)).rstrip() for r in rows]


# ---------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def has_proc() -> bool:
    return os.path.exists("/proc/self/statm")


def libc() -> ctypes.CDLL | None:
    """glibc (``malloc_trim``, ``mallopt``), or ``None`` elsewhere: then memory is measured as is."""
    with contextlib.suppress(OSError, TypeError):
        lib = ctypes.CDLL(ctypes.util.find_library("c"))
        if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt"):
            return lib
    return None


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Fix glibc's mmap threshold at its default, before any allocation (the dynamic one depends on
    earlier frees). Not for whole training runs: every KV-cache ``torch.cat`` of generation would go to
    mmap/munmap and page faults, doubling generation time on CPU."""
    lib = libc()
    if lib is not None:
        lib.mallopt(_M_MMAP_THRESHOLD, nbytes)


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(_HWM.search(f.read()).group(1)) * 1024


class _RssSampler(threading.Thread):
    def __init__(self, period_s: float) -> None:
        super().__init__(daemon=True)
        self.period_s, self.peak, self.stop = period_s, rss_bytes(), threading.Event()

    def run(self) -> None:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            while not self.stop.is_set():
                self.peak = max(self.peak, int(os.pread(fd, 64, 0).split()[1]) * page)
                time.sleep(self.period_s)
        finally:
            os.close(fd)


class PeakMemory:
    """``with PeakMemory(device, sample_ms) as mem:`` the peak memory of the block above its start.

    CPU: ``malloc_trim`` first (freed heap pages would hide new allocations), then the resident set
    size; the peak is the larger of a thread reading ``/proc/self/statm`` every ``sample_ms`` and the
    kernel's high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` when possible
    (``exact``). CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start.
    ``stop()`` ends the measured region early (idempotent; the block's end calls it).
    """

    def __init__(self, device: str, sample_ms: float) -> None:
        self.device, self.sample_ms = str(device), sample_ms
        self.cuda = self.device.startswith("cuda")
        self.exact, self.stopped = False, False
        self.before = 0
        self.baseline_mb, self.peak_delta_mb = 0.0, float("nan")

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            lib = libc()
            if lib is not None:
                lib.malloc_trim(0)
            self.before = rss_bytes()
            with contextlib.suppress(OSError):  # reset the kernel's RSS high-water mark (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.exact = _hwm_bytes() <= self.before + 2**20
            self.sampler = _RssSampler(self.sample_ms / 1000)
            self.sampler.start()
        self.baseline_mb = self.before / 2**20
        return self

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.sampler.stop.set()
            self.sampler.join()
            peak = max(self.sampler.peak, _hwm_bytes() if self.exact else 0)
        self.peak_delta_mb = max(0, peak - self.before) / 2**20

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def held_mb(self) -> float:
        """Memory held now above the start (after ``gc`` and ``malloc_trim`` on CPU)."""
        gc.collect()
        if self.cuda:
            import torch

            return (torch.cuda.memory_allocated(self.device) - self.before) / 2**20
        lib = libc()
        if lib is not None:
            lib.malloc_trim(0)
        return (rss_bytes() - self.before) / 2**20

    def describe(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated - allocated at the start"
        return f"RSS peak - RSS at the start (/proc/self/statm every {self.sample_ms:g} ms" + (
            ", and VmHWM)" if self.exact else ")"
        )
