"""Helpers the test files share (fixtures and make_inputs are in conftest.py)."""
import importlib.util
import sys
import traceback

import pytest
import torch


class SavedTensors:
    """Every tensor autograd packs for backward while the block runs
    (torch.autograd.graph.saved_tensors_hooks), in the order packed, kept alive here."""

    def __init__(self):
        self.tensors = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self.tensors.append(t)
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def storages(self):
        """{data_ptr: nbytes} of the distinct storages: views of one buffer count once."""
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in self.tensors}

    def owned_bytes(self, *references):
        """Bytes of the saved storages that are not those of the given inputs / parameters
        (which autograd only references): the activations the op allocated and keeps."""
        referenced = {t.untyped_storage().data_ptr() for t in references if t is not None}
        return sum(size for ptr, size in self.storages().items() if ptr not in referenced)


def load_module(name, path):
    """Imports the file at path (a script, not a package module) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_scenarios(rank, world, scenarios, *args):
    """Runs each scenario(rank, world, *args) on this rank, as run_local's target:
    {scenario name: None (passed) or its traceback}; stops at the first failure."""
    results = {}
    for scenario in scenarios:
        try:
            scenario(rank, world, *args)
            results[scenario.__name__] = None
        except Exception:
            results[scenario.__name__] = traceback.format_exc()
            break
    return results


def check_scenario(results_by_rank, name):
    """Fails with the traceback of the rank where scenario `name` failed (or of the
    scenario that failed before it, so that it never ran)."""
    for rank, results in enumerate(results_by_rank):
        if name not in results:
            first = next(n for n, tb in results.items() if tb is not None)
            pytest.fail(f"rank {rank}: not run, rank {rank} failed earlier in {first}:\n{results[first]}")
        if results[name] is not None:
            pytest.fail(f"rank {rank} of {len(results_by_rank)}:\n{results[name]}")


# The half-precision dtypes every device's operator takes (accumulating in float32).
HALF_TYPES = [torch.float16, torch.bfloat16]
# Relative error that rounding alone explains: for the half types two units in
# the last place (2 * 2^-(mantissa bits)), one for the rounding of the result,
# one for that of what it was computed from; for float32 1e-6 (about 8 units).
ROUNDING = {torch.float32: 1e-6, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (0 when both are all zero)."""
    expected = expected.double()
    scale = expected.abs().max().item()
    error = (actual.double() - expected).abs().max().item()
    return error / scale if scale > 0 else error


def error_bound(eager, truth, dtype):
    """How far from the float64 truth a result in `dtype` may be: 3x as far as
    torch's own ops in that dtype get on the same rounded inputs (their error is
    the dtype's rounding compounded over the same chain of products and
    activations; 3x leaves room for a different but equally valid summation order),
    plus the rounding of the result itself (ROUNDING), so that a bound never
    reaches 0 where torch happens to be exact."""
    return 3 * relative_error(eager, truth) + ROUNDING[dtype]
