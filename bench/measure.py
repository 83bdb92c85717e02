"""Peak memory and wall time of a block of work, the same way on every device.

CUDA: the caching allocator's ``max_memory_allocated`` / ``max_memory_reserved`` (exact, reset at
entry). CPU: the process's peak resident set size (RSS counts the whole process: weights, data and
Python; ``delta`` is the growth over the value at entry). On Linux the kernel's own high-water mark
is reset at entry (``/proc/self/clear_refs``) and read at exit (``VmHWM``): exact, where a sampling
thread can miss a spike shorter than its interval. Elsewhere a thread samples RSS every 5 ms (its
cost on the training loop was within noise: results/perf.md).
"""

from __future__ import annotations

import contextlib
import threading
import time

import psutil
import torch

MIB = 1024 * 1024


CPU_PEAK = "kernel"  # or "sampled": the thread, also where the kernel's mark cannot be reset


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
    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mib = self.reserved_mib = self.delta_mib = 0.0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._proc = psutil.Process()
            self._start = self._peak = self._proc.memory_info().rss
            if not (CPU_PEAK == "kernel" and _reset_high_water_mark()):
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved_mib = torch.cuda.max_memory_reserved(self.device) / MIB
        else:
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
            else:
                self._peak = max(self._peak, _high_water_mark())
            peak = max(self._peak, self._proc.memory_info().rss)
            self.reserved_mib = peak / MIB
        self.peak_mib = peak / MIB
        self.delta_mib = (peak - self._start) / MIB


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
