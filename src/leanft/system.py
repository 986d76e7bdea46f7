"""What a process runs on, and its peak memory while it works: a run's metrics and every benchmark report them."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from .models import default_device


def machine(device: str | torch.device | None = None) -> str:
    """What a measurement ran on (GPU name, or CPU model and threads): tables never mix two of them.
    ``device`` defaults to the one leanft trains on (CUDA when available)."""
    kind = torch.device(device).type if device is not None else default_device().type
    if kind == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads"


def release_freed_memory() -> None:
    """Hand the heap that Python and torch freed back to the system (glibc's ``malloc_trim``), so that a
    step measured by resident memory cannot hide in pages an earlier computation left behind."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class RssSampler:
    """Highest resident memory of this process while it runs (polled every 2 ms in a thread): the
    lifetime peak (``ru_maxrss``) would include model loading, which is not what a step costs."""

    def __init__(self) -> None:
        self.peak, self.running = rss_mb(), True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, rss_mb())


def peak_memory(device: torch.device) -> Callable[[], tuple[float, str]]:
    """Start watching memory now; the returned function gives the peak since (MB) and how it was taken:
    CUDA max allocated, or the sampled peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return lambda: (torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated")
    sampler = RssSampler()
    return lambda: (sampler.stop(), "peak RSS after loading")


def save(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
