"""Step timing and peak memory for training logs and benchmarks."""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_memory_mb(device) -> float:
    """CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size (ru_maxrss)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def synchronize(device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class StepTimer:
    """Wall time between consecutive optimizer steps (device-synchronised)."""

    def __init__(self, device):
        self.device = device
        self._last: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self._last = time.perf_counter()

    def lap(self) -> float:
        synchronize(self.device)
        now = time.perf_counter()
        dt = now - self._last if self._last is not None else float("nan")
        self._last = now
        return dt


class SavedTensorMeter:
    """Bytes of tensors autograd saves for backward (activation memory), peak over a window.

    Used on CPU, where there is no allocator peak counter: ``with meter: loss = forward()``.
    Counts each storage once; parameters (and views of them) are not counted.
    """

    def __init__(self):
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()
        self._ctx = None

    def reset(self) -> None:
        self.current = 0
        self._seen.clear()

    def _pack(self, t: torch.Tensor):
        # weights saved for backward are not activations
        if isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter):
            return t
        try:
            key = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if key not in self._seen:
            self._seen.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._ctx = None
