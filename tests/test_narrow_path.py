"""Which problems the CUDA op hands to the fully fused narrow-MLP kernels, and why
it refuses the others: choose_narrow_path (csrc/cuda/narrow_path.h), plain C++ that
the CPU build compiles too, reached through the op mlp_ext::_narrow_path_choice.
Runs on any machine; tests/test_narrow_cuda.py checks the kernels themselves."""
import itertools

import pytest
import torch

import mlp_ext  # noqa: F401  (registers the ops)

H100_SMEM = 227 * 1024  # opt-in dynamic shared memory per block, H100 / H200
A100_SMEM = 163 * 1024
WIDTHS = range(16, 129, 16)
HALF_TYPES = (torch.float16, torch.bfloat16)


def choice(n=4096, d=64, h=64, q=64, dtype=torch.float16, *, allow_tf32=False, aligned=True,
           compute_capability=9, smem_per_block=H100_SMEM, mode="on", dropout=False):
    return torch.ops.mlp_ext._narrow_path_choice(
        n, d, h, q, dtype, allow_tf32, aligned, compute_capability, smem_per_block, mode,
        dropout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_width_combination_is_covered_on_hopper(dtype):
    """d, h, q each a multiple of 16 in [16, 128], in any combination, fit an H100's
    or H200's shared memory (docs/narrow.md promises so)."""
    for d, h, q in itertools.product(WIDTHS, repeat=3):
        result = choice(d=d, h=h, q=q, dtype=dtype, allow_tf32=True)
        assert result.startswith("fused:"), (d, h, q, result)


def test_a100_covers_half_types_everywhere_and_float32_up_to_width_96():
    """An A100 has 163 KB per block: every combination in float16 / bfloat16, and in
    float32 (TF32) every combination whose widest layer is at most 96."""
    for dtype in (*HALF_TYPES, torch.float32):
        for d, h, q in itertools.product(WIDTHS, repeat=3):
            result = choice(d=d, h=h, q=q, dtype=dtype, allow_tf32=True, compute_capability=8,
                            smem_per_block=A100_SMEM)
            if dtype in HALF_TYPES or max(d, h, q) <= 96:
                assert result.startswith("fused:"), (dtype, d, h, q, result)


@pytest.mark.parametrize("n", [0, 1, 17, 2**20])
def test_any_batch_size(n):
    assert choice(n=n).startswith("fused:")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_mode(dtype):
    """auto: half types at every covered width; float32 (TF32) only up to width 64."""
    for d, h, q in itertools.product([16, 64, 80, 128], repeat=3):
        result = choice(d=d, h=h, q=q, dtype=dtype, allow_tf32=True, mode="auto")
        expected = dtype in HALF_TYPES or max(d, h, q) <= 64
        assert result.startswith("fused:" if expected else "gemm:"), (d, h, q, result)


REFUSED = {  # choice(**kwargs) -> "gemm: <reason matching the pattern>"
    "off": (dict(mode="off"), "MLP_EXT_NARROW is off"),
    "float64": (dict(dtype=torch.float64), "dtype"),
    "float32 without TF32": (dict(dtype=torch.float32, allow_tf32=False), "TF32"),
    "d=20": (dict(d=20), "in_features"),
    "d=0": (dict(d=0), "in_features"),
    "d=144": (dict(d=144), "in_features"),
    "h=8": (dict(h=8), "hidden_features"),
    "h=136": (dict(h=136), "hidden_features"),
    "q=8": (dict(q=8), "out_features"),
    "q=200": (dict(q=200), "out_features"),
    "sm_75": (dict(compute_capability=7), "compute capability"),
    "48 KB of shared memory": (dict(d=128, h=128, q=128, smem_per_block=48 * 1024),
                               "shared memory"),
    "misaligned": (dict(aligned=False), "aligned"),
    "dropout": (dict(dropout=True), "hidden-layer dropout"),
    "dropout, auto": (dict(dropout=True, mode="auto"), "hidden-layer dropout"),
    "auto, float32 at width 128": (dict(dtype=torch.float32, allow_tf32=True, d=128, mode="auto"),
                                   "expected faster"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_their_reason(case):
    kwargs, reason = REFUSED[case]
    result = choice(**kwargs)
    assert result.startswith("gemm:") and reason in result, result


def test_dropout_refused_on_every_covered_problem():
    """The fused kernels have no dropout mask: every problem they take without
    dropout goes to the GEMM path with it (which draws and applies the mask)."""
    for d, h, q in itertools.product((16, 64, 128), repeat=3):
        assert choice(d=d, h=h, q=q).startswith("fused:")
        assert choice(d=d, h=h, q=q, dropout=True) == \
            "gemm: hidden-layer dropout (the fused kernels have none)"


def test_off_wins_over_everything():
    for dtype in (torch.float16, torch.float64):
        assert choice(dtype=dtype, mode="off") == "gemm: MLP_EXT_NARROW is off"


def test_more_shared_memory_never_refuses_more():
    """The tile shrinks to fit: whatever fits in less shared memory fits in more."""
    for d, h, q in itertools.product([16, 64, 128], repeat=3):
        fits = [choice(d=d, h=h, q=q, smem_per_block=kb * 1024).startswith("fused:")
                for kb in (32, 48, 64, 100, 164, 228)]
        assert fits == sorted(fits), (d, h, q, fits)


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match=r'"off", "on" or "auto".*"sometimes"'):
        choice(mode="sometimes")
