"""The CPU operator's internal paths: every instruction-set variant of the
elementwise kernels and every GEMM path (MKL, oneDNN, MKL split over threads,
our short-side kernels), against the references.

The variant (ATEN_CPU_CAPABILITY) and the GEMM path (MLP_EXT_CPU_GEMM) are
chosen once per process, so each combination runs in a fresh interpreter.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mlp_ext
from mlp_ext import reference

from conftest import make_inputs

ROOT = Path(__file__).resolve().parents[1]

# Widths that are not multiples of any vector length exercise the partial
# loads and stores; 300 x 256 x 300 is large enough for the oneDNN path.
SHAPES = ((1, 3, 5, 2), (7, 33, 17, 9), (300, 256, 300, 70))
# The short-side kernels' edges: every remainder of their register tiles (6
# rows x 4 vectors, 4 x 4 dot products) and of the vector length in k, on one
# thread and split over two (from 512K multiply-adds).
SHORT_SHAPES = ((1, 16, 16, 16), (5, 17, 63, 3), (6, 65, 64, 7), (13, 1, 130, 1), (33, 200, 7, 65),
                (70, 301, 130, 20), (97, 64, 257, 31))
CHECK = textwrap.dedent("""
    import torch, mlp_ext
    from mlp_ext import reference
    torch.manual_seed(0)
    torch.set_num_threads(max(2, torch.get_num_threads()))  # the split path needs two
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        for n, d, h, q in SHAPES:
            for act in ACTIVATIONS:
                # Column-major x and w1 in some cases: the libraries read them in place.
                x = torch.randn(d, n, dtype=torch.float64).t() if n in (300, 70) else torch.randn(n, d, dtype=torch.float64)
                w1 = (torch.randn(d, h, dtype=torch.float64).t() if n == 7 else torch.randn(h, d, dtype=torch.float64)) / d ** 0.5
                w2 = torch.randn(q, h, dtype=torch.float64) / h ** 0.5
                b1, b2 = torch.randn(h, dtype=torch.float64), torch.randn(q, dtype=torch.float64)
                g = torch.randn(n, q, dtype=torch.float64)
                def run(fn, dt):
                    args = [t.to(dt).requires_grad_() for t in (x, w1, w2, b1, b2)]
                    o, s = fn(*args, activation=act, weight_decay=0.1)
                    ((o * g.to(dt)).sum() + 3 * s).backward()
                    return [o, s] + [a.grad for a in args]
                got, want = run(mlp_ext.fused_mlp, dtype), run(reference.fused_mlp, torch.float64)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item())
    print("ok", torch.backends.cpu.get_cpu_capability())
""")


def run_check(capability, gemm, shapes, activations):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, MLP_EXT_CPU_GEMM=gemm,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    script = f"SHAPES = {shapes!r}\nACTIVATIONS = {activations!r}\n" + CHECK
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
    return done.stdout.split()[1]


@pytest.mark.parametrize("capability, gemm", [
    ("default", "blas"), ("avx2", "blas"), ("avx512", "blas"), ("avx512", "onednn"),
    ("avx512", "split"), ("avx2", "short"), ("avx512", "short"),
])
def test_kernel_variants_and_gemm_libraries(capability, gemm):
    run_check(capability, gemm, SHAPES, mlp_ext.ACTIVATIONS)


@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_short_gemm_tile_edges(capability):
    if capability == "avx512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")  # ATen would run the AVX2 kernels instead
    assert run_check(capability, "short", SHORT_SHAPES, ("relu", "gelu")) == capability.upper()


# The half types on each kernel variant and each product path of theirs
# (MLP_EXT_CPU_HALF_GEMM: ATen's bfloat16 GEMM, or widened to the float32 paths),
# against float64 on the same rounded inputs: within 3x the error of torch's own
# ops in that dtype plus two units in the last place (tests/helpers.error_bound).
CHECK_HALF = textwrap.dedent("""
    import torch, mlp_ext
    from mlp_ext import reference
    torch.manual_seed(0)
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
    def rel(a, b):
        return (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    for dtype in (torch.bfloat16, torch.float16):
        for n, d, h, q in SHAPES:
            for act in ACTIVATIONS:
                base = [torch.randn(n, d), torch.randn(h, d) / d ** 0.5, torch.randn(q, h) / h ** 0.5,
                        torch.randn(h), torch.randn(q)]
                base = [t.to(dtype) for t in base]
                g = torch.randn(n, q).to(dtype)
                def run(fn, dt):
                    args = [t.to(dt, copy=True).requires_grad_() for t in base]
                    o, s = fn(*args, activation=act, weight_decay=0.1)
                    ((o * g.to(dt)).sum() + 3 * s).backward()
                    return [o, s] + [a.grad for a in args]
                got, eager = run(mlp_ext.fused_mlp, dtype), run(reference.fused_mlp, dtype)
                exact = run(reference.fused_mlp, torch.float64)
                for i, (a, e, b) in enumerate(zip(got, eager, exact)):
                    assert a.dtype == dtype, (i, a.dtype)
                    bound = 3 * rel(e, b) + 2 * ulp[dtype]
                    assert rel(a, b) <= bound, (dtype, (n, d, h, q), act, i, rel(a, b), bound)
    print("ok", torch.backends.cpu.get_cpu_capability())
""")


@pytest.mark.parametrize("capability, path", [
    ("default", "widen"), ("avx2", "widen"), ("avx512", "widen"), ("avx512", "aten"),
])
def test_half_types_on_each_kernel_variant_and_product_path(capability, path):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, MLP_EXT_CPU_HALF_GEMM=path,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    script = f"SHAPES = {SHAPES!r}\nACTIVATIONS = {('relu', 'gelu', 'sigmoid')!r}\n" + CHECK_HALF
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_operands(dtype):
    """Transposed, sliced and expanded operands reach the BLAS / oneDNN calls."""
    torch.manual_seed(1)
    x = torch.randn(70, 3, 80, dtype=dtype).transpose(0, 1)[:, ::2]  # (3, 35, 80), strided
    w1 = torch.randn(96, 80, dtype=dtype).t().contiguous().t()        # column-major
    w2 = torch.randn(20, 192, dtype=dtype)[:, ::2]                     # row stride 192
    b1 = torch.randn(192, dtype=dtype)[::2]
    b2 = torch.randn(1, dtype=dtype).expand(20)
    args = [t.requires_grad_() if t.is_leaf else t.detach().requires_grad_() for t in (x, w1, w2, b1, b2)]
    o, s = mlp_ext.fused_mlp(*args, activation="silu", weight_decay=0.05)
    grad_o = torch.randn(20, 3, 35, dtype=dtype).permute(1, 2, 0)  # non-contiguous grad_o
    grads = torch.autograd.grad((o * 1).mul(grad_o).sum() + s, args)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ro, rs = reference.fused_mlp(*ref_args, activation="silu", weight_decay=0.05)
    ref_grads = torch.autograd.grad(ro.mul(grad_o.double()).sum() + rs, ref_args)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(o.double(), ro, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_inference_builds_no_graph():
    x, w1, w2 = torch.randn(4, 3), torch.randn(5, 3, requires_grad=True), torch.randn(2, 5)
    with torch.no_grad():
        o, s = mlp_ext.fused_mlp(x, w1, w2, weight_decay=0.1)
    assert o.grad_fn is None and not o.requires_grad
    o, s = mlp_ext.fused_mlp(x, w1, w2, weight_decay=0.1)
    assert o.grad_fn is not None and s.grad_fn is o.grad_fn


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")  # torch's forward_ad import
def test_forward_mode_ad_still_raises_clearly():
    import torch.autograd.forward_ad as fwAD
    x, w1, w2 = torch.randn(4, 3), torch.randn(5, 3), torch.randn(2, 5)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            mlp_ext.fused_mlp(dual, w1, w2)


def test_large_float32_step_matches_float64():
    """The oneDNN-sized products (and the row-block column sums) in a training step."""
    torch.manual_seed(2)
    n, d, h, q = 2500, 256, 320, 128
    x = torch.randn(n, d, dtype=torch.float64)
    params = [torch.randn(h, d, dtype=torch.float64) / 16, torch.randn(q, h, dtype=torch.float64) / 18,
              torch.randn(h, dtype=torch.float64), torch.randn(q, dtype=torch.float64)]
    def grads(fn, dtype):
        ps = [p.to(dtype).requires_grad_() for p in params]
        o, s = fn(x.to(dtype), *ps, activation="gelu", weight_decay=1e-3)
        torch.nn.functional.cross_entropy(o, torch.arange(n) % q).add(s).backward()
        return [o] + [p.grad for p in ps]
    for got, want in zip(grads(mlp_ext.fused_mlp, torch.float32), grads(reference.fused_mlp, torch.float64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _mkl():
    """libtorch_cpu's MKL thread controls, or None where torch is not built with MKL."""
    import ctypes
    import os
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    try:
        return lib.MKL_Get_Max_Threads, lib.MKL_Set_Num_Threads_Local
    except AttributeError:
        return None


@pytest.mark.skipif(not torch.backends.mkl.is_available() or _mkl() is None,
                    reason="torch without MKL: the products do not touch MKL's thread count")
@pytest.mark.parametrize("local", [0, 1])
def test_small_products_restore_mkl_thread_count(local):
    """Products below the serial threshold run MKL on one thread and restore the
    caller's (thread-local) MKL setting afterwards, whatever it was."""
    get_max_threads, set_local = _mkl()
    set_local(local)
    try:
        expected = get_max_threads()
        x, w1, w2, b1, b2 = make_inputs(n=16, d=32, h=24, q=8, dtype=torch.float32)
        o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation="gelu", weight_decay=0.1)
        (o.square().sum() + s).backward()
        assert get_max_threads() == expected
        # A large product afterwards still uses the caller's setting, and is right.
        a, b = torch.randn(256, 512), torch.randn(512, 256)
        torch.testing.assert_close(torch.mm(a, b), (a.double() @ b.double()).float(), rtol=1e-4, atol=1e-3)
        assert get_max_threads() == expected
    finally:
        set_local(0)
