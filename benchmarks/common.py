"""What the benchmarks share: timing in interleaved rounds, the bytes autograd saves
for backward, and the spelling of shapes and GPU names.

The benchmarks run as scripts (`python benchmarks/benchmark.py`: this folder is then
first on sys.path) and are loaded by path from the tests; each puts this folder on
sys.path before `import common`.
"""
import argparse
import gc
import re
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor


# --------------------------------------------------------------------------- timing

class Clock:
    """Seconds per call of a block of calls.

    Wall time, with the CUDA queue drained before and after on a CUDA device; or,
    with cuda_events=True, the GPU's time between CUDA events recorded before the
    first call and after the last (no host synchronization inside the block)."""

    def __init__(self, device, cuda_events: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if cuda_events and not self.cuda:
            raise ValueError(f"Clock: cuda_events needs a CUDA device, got {self.device}")
        self.cuda_events = cuda_events

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def block(self, fn: Callable[[], object], calls: int) -> float:
        if self.cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) / calls


def interleaved(closures: Dict[str, Callable[[], object]], clock: Clock, rounds: int,
                block_seconds: float, *, max_calls: Optional[int] = None,
                progress=None) -> Dict[str, List[float]]:
    """Per-call seconds of every closure, one value per round.

    Warm-up first (every closure until it has run for block_seconds), then the
    number of calls per block is fixed per closure so that a block lasts about
    block_seconds (at most max_calls calls); each round runs every closure's
    block, the order reversed every other round, so that a load change on a
    shared machine hits every closure alike. The garbage collector runs between
    rounds only. progress, if given, is updated by 1 per round (tqdm)."""
    calls = {}
    for name, fn in closures.items():
        fn()
        elapsed, count = 0.0, 0
        while elapsed < block_seconds or count < 2:
            t = clock.block(fn, 1)
            elapsed, count = elapsed + t, count + 1
        calls[name] = max(1, round(block_seconds / max(elapsed / count, 1e-9)))
        if max_calls is not None:
            calls[name] = min(calls[name], max_calls)
    times = {name: [] for name in closures}
    names = list(closures)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one closure's block would bias it
    try:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(clock.block(closures[name], calls[name]))
            gc.collect()
            if progress is not None:
                progress.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    """{name: median} of interleaved()'s per-round values."""
    return {name: statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------- memory

def saved_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> Tuple[object, int]:
    """fn()'s result, and the bytes of the distinct storages that autograd saves for
    backward while fn runs (torch.autograd.graph.saved_tensors_hooks), each storage
    counted once, less the storages of `exclude` (the inputs and parameters, which
    autograd only references)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return result, sum(size for ptr, size in storages.items() if ptr not in excluded)


# --------------------------------------------------------------------------- names

def parse_shape(text: str) -> Tuple[int, int, int, int]:
    """"32x784x256x10" (or with ×) -> (n, d, h, q), positive integers."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected a shape NxDxHxQ of positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def gpu_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia-h200": the GPU's part of the result files' names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
