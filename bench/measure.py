"""Peak memory and wall time of a block of work, the same way on every device.

CUDA: the caching allocator's ``max_memory_allocated`` / ``max_memory_reserved`` (exact, reset at
entry). CPU: the process's peak resident set size (RSS counts the whole process: weights, data and
Python; ``delta`` is the growth over the value at entry). On Linux the kernel's own high-water mark
is reset at entry (``/proc/self/clear_refs``) and read at exit (``VmHWM``): exact, where a sampling
thread can miss a spike shorter than its interval. Elsewhere a thread samples RSS every 5 ms (its
cost on the training loop was within noise: results/perf.md).

On CPU the process's peak is not a figure of the block alone: memory that earlier work freed stays in
the C allocator (glibc returns little of it to the kernel), so the RSS at entry, and with it the peak,
depends on what ran before, and that freed memory is reused without showing as growth (a frozen cell
right after a vpm-lora cell read 889 MiB with 0 MiB growth). So at entry, before the baseline is read,
unreachable Python objects are collected and glibc hands its free pages back (``malloc_trim``):
``delta`` is then the block's own growth over the process baseline, comparable between blocks run in
any order (``released`` says whether that could be done; without glibc it cannot).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
import time

import psutil
import torch

MIB = 1024 * 1024


CPU_PEAK = "kernel"  # or "sampled": the thread, also where the kernel's mark cannot be reset


_LIBC: list = []


def release_freed_memory() -> bool:
    """Collect unreachable Python objects and return the C allocator's free pages to the kernel, so the
    RSS read next holds live memory only; False where the allocator cannot (not glibc)."""
    gc.collect()
    if not _LIBC:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc.malloc_trim if hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    if _LIBC[0] is None:
        return False
    _LIBC[0](0)
    return True


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _high_water_mark() > 0
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak memory of a block, and its growth over the baseline at entry. :meth:`paused` blocks (the
    validation checkpoints inside a training loop) are left out, like :class:`Stopwatch` leaves them out
    of the time: their own peak, and what they leave allocated (the modules the first evaluation of a
    process imports, tens of MiB), are not the block's."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mib = self.reserved_mib = self.delta_mib = self.baseline_mib = 0.0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.released = self.device.type == "cuda"  # CPU: whether freed memory left the process before the baseline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampling = True
        self._best = self._offset = self._reserved = 0  # over the segments between pauses; what pauses left allocated

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self.released = release_freed_memory()
            self._proc = psutil.Process()
            self._start = self._peak = self._proc.memory_info().rss
            if not (CPU_PEAK == "kernel" and _reset_high_water_mark()):
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._sampling:
                self._peak = max(self._peak, self._proc.memory_info().rss)

    def _now(self) -> int:
        """Memory held right now (after releasing freed memory on CPU, as at entry)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.released:
            release_freed_memory()
        return self._proc.memory_info().rss

    def _close_segment(self) -> None:
        """Fold the peak since entry or the last pause into the block's peak, less what pauses left behind."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self._reserved = max(self._reserved, torch.cuda.max_memory_reserved(self.device))
        else:
            self._sampling = False
            if self._thread is None:
                self._peak = max(self._peak, _high_water_mark())
            peak = max(self._peak, self._proc.memory_info().rss)
            self._reserved = max(self._reserved, peak - self._offset)
        self._best = max(self._best, peak - self._offset)

    @contextlib.contextmanager
    def paused(self):
        self._close_segment()
        before = self._now()
        try:
            yield
        finally:
            after = self._now()
            self._offset += max(0, after - before)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                self._peak = after
                if self._thread is None:
                    _reset_high_water_mark()
                self._sampling = True

    def __exit__(self, *exc) -> None:
        self._close_segment()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak_mib = self._best / MIB
        self.reserved_mib = self._reserved / MIB
        self.delta_mib = (self._best - self._start) / MIB
        self.baseline_mib = self._start / MIB


class Stopwatch:
    """Wall time that waits for queued GPU work before reading the clock; :meth:`paused` blocks (the
    validation checkpoints inside a training loop) are left out."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds = 0.0
        self._excluded = 0.0

    @contextlib.contextmanager
    def paused(self):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._excluded += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._t0 - self._excluded


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; peft's modules_to_save copies count once each, as they train."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
