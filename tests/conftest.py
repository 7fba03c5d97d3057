"""Shared fixtures: the devices this run has, and random MLP inputs."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

# torch.compile's on-disk caches are keyed without our op schemas: a cache
# left by an earlier build could replay a graph calling an older schema. Each
# run compiles into a fresh directory (unless the caller chose one).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlp_ext_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import mlp_ext

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    settings = None

if settings is not None:
    # tests/test_properties.py. "ci" (the default): the same examples every run
    # (derandomized), few enough for the whole file to run in about a minute
    # on 2 cores. "long": a local search, `pytest tests/test_properties.py
    # --hypothesis-profile=long`. No example database (it would write
    # .hypothesis/ into the checkout); a failure prints its example and the
    # @reproduce_failure blob that replays it.
    settings.register_profile(
        "ci", derandomize=True, max_examples=200, deadline=None, database=None,
        print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile(
        "long", max_examples=5000, deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow])


def pytest_configure(config):
    # "ci" unless --hypothesis-profile names one (hypothesis's plugin loads that
    # in its own pytest_configure, before or after this one: same result).
    if settings is not None:
        settings.load_profile(config.getoption("--hypothesis-profile", None) or "ci")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=mlp_ext.ACTIVATIONS)
def activation(request):
    return request.param


def make_inputs(n=5, d=4, h=6, q=3, *, bias=True, dtype=torch.float64, device="cpu",
                batch_shape=None, requires_grad=True, generator=None):
    """Fresh random (x, w1, w2, b1, b2); x has shape (*batch_shape, d) or (n, d)."""
    shape = (*batch_shape, d) if batch_shape is not None else (n, d)

    def rand(*size):
        t = torch.randn(*size, dtype=dtype, device=device, generator=generator)
        return t.requires_grad_(requires_grad)

    x, w1, w2 = rand(*shape), rand(h, d), rand(q, h)
    b1, b2 = (rand(h), rand(q)) if bias else (None, None)
    return x, w1, w2, b1, b2
