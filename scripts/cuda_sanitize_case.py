"""A small forward + backward of every CUDA kernel path, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/cuda_sanitize_case.py

Covers: the vector and the scalar path (odd width, misaligned bias), db1 in one
pass and over several row chunks, the one- and two-block penalty, an empty
batch, in float32, float64, float16 and bfloat16; then the fully fused narrow
kernels (MLP_EXT_NARROW=on, set here for those calls only): 64x64x64 in float16
and bfloat16 with a row tail, training step and inference. Checks the results
against the float64 reference too, so a run that the sanitizer passes is also
right. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (gpu_run.sh does) so that
every tensor is its own allocation and an access past its end is caught.
No profiler here: CUPTI and the sanitizer do not mix, so whether the narrow
kernels really ran is tests/test_narrow_cuda.py's business.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # in-place builds
import mlp_ext  # noqa: E402
from mlp_ext import reference  # noqa: E402

# (n, d, h, q): one db1 pass + one-block penalty; several row chunks, vectors
# and a two-block penalty; odd widths (scalar path); an empty batch.
SHAPES = [(5, 4, 6, 3), (300, 80, 64, 8), (77, 9, 35, 5), (0, 4, 6, 3)]
CASES = [("relu", torch.float32), ("gelu", torch.bfloat16), ("silu", torch.float16),
         ("tanh", torch.float64)]
# The narrow kernels: 64-wide, 300 rows (not a multiple of any tile).
NARROW_SHAPE = (300, 64, 64, 64)
NARROW_CASES = [("relu", torch.float16), ("gelu", torch.bfloat16)]


def param(shape, dtype):
    return torch.randn(*shape, device="cuda").to(dtype).requires_grad_()


def check_case(n, d, h, q, activation, dtype, misaligned_bias=False):
    """Forward + backward (and, for the narrow cases, inference) against float64."""
    x, w1, w2, b2 = param((n, d), dtype), param((h, d), dtype), param((q, h), dtype), param((q,), dtype)
    b1 = param((h + 1,), dtype)[1:] if misaligned_bias else param((h,), dtype)
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=activation, weight_decay=0.1)
    grads = torch.autograd.grad((o, s), (x, w1, w2, b1, b2),
                                (torch.ones_like(o), torch.ones_like(s)))
    with torch.no_grad():  # the inference op (no z, H kept)
        o_inference, _ = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=activation, weight_decay=0.1)
    exact = [t.detach().double().requires_grad_() for t in (x, w1, w2, b1, b2)]
    o64, s64 = reference.fused_mlp(*exact, activation=activation, weight_decay=0.1)
    grads64 = torch.autograd.grad((o64, s64), exact, (torch.ones_like(o64), torch.ones_like(s64)))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 5e-2)
    for got, want in zip((o, o_inference, s, *grads), (o64, o64, s64, *grads64)):
        scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


def main():
    torch.manual_seed(0)
    for activation, dtype in CASES:
        for n, d, h, q in SHAPES:
            for misaligned_bias in (False, True):
                check_case(n, d, h, q, activation, dtype, misaligned_bias)
    previous = os.environ.get("MLP_EXT_NARROW")
    os.environ["MLP_EXT_NARROW"] = "on"  # read by the op at each call
    try:
        for activation, dtype in NARROW_CASES:
            check_case(*NARROW_SHAPE, activation, dtype)
    finally:
        if previous is None:
            os.environ.pop("MLP_EXT_NARROW")
        else:
            os.environ["MLP_EXT_NARROW"] = previous
    torch.cuda.synchronize()
    print("cuda_sanitize_case: all cases ran (GEMM path and MLP_EXT_NARROW=on) "
          "and match the float64 reference")


if __name__ == "__main__":
    main()
