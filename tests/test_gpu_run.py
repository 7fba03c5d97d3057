"""scripts/gpu_run.sh and what it relies on, checked without a GPU: the script's flow
with every CUDA stage skipped, the benchmarks' file names and merged tables, and a
machine without graphviz (the GPU machine has none)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_module

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = ROOT / "scripts" / "gpu_run.sh"
NARROW_CHECK = ROOT / "tools" / "narrow_gpu_check.sh"


@pytest.mark.parametrize("script", [GPU_RUN, NARROW_CHECK], ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_gpu_run_without_a_device_skips_every_gpu_stage(tmp_path):
    """The rehearsal of CI's machine, less its nvcc checks (GPU_RUN_NVCC=0): every
    CUDA step says why it was skipped, nothing fails, and $OUT holds the summary
    and the log."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_RUN_NVCC="0",
               GPU_RUN_WORK=str(tmp_path / "work"), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", str(GPU_RUN)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for step in ("tests/test_cuda", "tests/cuda-cases", "narrow/selftest", "narrow/pytest",
                 "sanitize/memcheck-case", "sanitize/racecheck-case", "sanitize/racecheck-selftest",
                 "bench/benchmark", "bench/narrow", "wheel/build", "wheel/smoke"):
        line = next(line for line in summary.splitlines() if line.strip().startswith(step + " "))
        assert "skipped: no CUDA device" in line, line
    assert "FAILED" not in summary
    assert "gpu_run: passed" in summary
    assert "device: none" in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.log", "summary.txt"]
    assert "gpu_run summary" in (out / "gpu_run.log").read_text()  # the log has everything


def test_gpu_run_rejects_an_unknown_stage(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               GPU_RUN_WORK=str(tmp_path / "work"))
    result = subprocess.run(["bash", str(GPU_RUN), "benchmark"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown stage 'benchmark'" in result.stdout


# --------------------------------------------------------------------------- benchmarks

@pytest.fixture(scope="module")
def bench():
    return load_module("mlp_benchmark_gpu_run", ROOT / "benchmarks" / "benchmark.py")


@pytest.fixture(scope="module")
def narrow():
    return load_module("mlp_narrow_bench", ROOT / "benchmarks" / "narrow.py")


def test_result_files_are_named_after_the_gpu(bench, narrow, monkeypatch):
    assert bench.result_stem(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H100 80GB HBM3")
    assert bench.result_stem(torch.device("cuda")) == "cuda-nvidia-h100-80gb-hbm3"
    assert narrow.gpu_slug("NVIDIA H200") == "nvidia-h200"


def test_compile_shapes_must_be_timed_shapes(bench, capsys):
    args = bench.parse_args(["--shapes", "64x64x64x64,1x16x16x16", "--compile-shapes", "64x64x64x64"])
    assert args.compile and args.compile_shapes == [(64, 64, 64, 64)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "1x16x16x16", "--compile-shapes", "64x64x64x64"])
    assert "not among the shapes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--stem", "../elsewhere"])


def fake_result(shape, mode, compiled):
    result = {
        "shape": dict(zip("ndhq", shape)), "dtype": "bfloat16", "activation": "relu", "mode": mode,
        "seconds": {"eager": 2e-5, "fused": 1e-5}, "ratio": 2.0, "floor_seconds": 5e-6,
        "operator_over_floor": 2.0, "bound": 3.0, "gflops": {"eager": 1.0, "fused": 2.0},
        "cuda_peak_bytes": {"eager": 1024, "fused": 512},
    }
    if compiled:
        result["seconds"]["compiled"] = 1.5e-5
        result["ratio_compiled"] = 1.5
    return result


def test_table_with_torch_compile_on_some_shapes_only(bench):
    table = bench.markdown_table([fake_result((64, 64, 64, 64), "inference", True),
                                  fake_result((1, 16, 16, 16), "inference", False)])
    rows = table.splitlines()
    assert "compiled/fused" in rows[0]
    assert "| 1.50× |" in rows[2]
    assert "| – | – |" in rows[3]


def narrow_rows():
    common = {"dtype": "float16", "width": 64, "batch": 262144, "mode": "training",
              "activation": "relu", "verified": True, "max_relative_error": 1e-3}
    return [dict(common, variant="eager", ms=0.2, speedup_vs_eager=1.0),
            dict(common, variant="gemm", ms=0.15, speedup_vs_eager=1.33),
            dict(common, variant="fused", ms=0.05, speedup_vs_eager=4.0, fused_kernels_ran=True,
                 GBps=2500.0, fraction_of_copy_bandwidth=0.6, fused_speedup_vs_eager=4.0,
                 fused_speedup_vs_gemm=3.0)]


def test_narrow_results_merge_into_the_benchmark_files(narrow, tmp_path, capsys):
    path = tmp_path / "cuda-nvidia-h200.json"
    path.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200"}, "results": [{"x": 1}]}))
    (tmp_path / "cuda-nvidia-h200.md").write_text("the main table\n")
    meta = {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "activation": "relu",
            "fp32_precision": "high", "rounds": 10, "copy_bandwidth_GBps": 4000.0}
    narrow.merge_into(str(path), meta, narrow_rows())
    report = json.loads(path.read_text())
    assert report["results"] == [{"x": 1}] and report["meta"]["gpu"] == "NVIDIA H200"
    assert report["narrow"]["meta"] == meta and len(report["narrow"]["results"]) == 3
    md = (tmp_path / "cuda-nvidia-h200.md").read_text()
    assert md.startswith("the main table\n") and "Narrow MLPs" in md
    row = md.splitlines()[-1]
    assert "| float16 | 64 | 262144 | training | 0.2000 | – | 0.1500 | 0.0500 |" in row
    assert "| 4.00× | – | 3.00× | 2500 | 60% | yes |" in row
    # Without the benchmark's files (it failed): both are created.
    narrow.merge_into(str(tmp_path / "new.json"), meta, narrow_rows())
    assert json.loads((tmp_path / "new.json").read_text())["meta"] == meta
    assert (tmp_path / "new.md").exists()


# --------------------------------------------------------------------------- graphviz

def test_mlp_ext_imports_without_graphviz_and_the_graph_module_says_what_is_missing():
    """The GPU machine has no graphviz: `import mlp_ext` must not need it, and
    mlp_ext.graph must name the package it lacks."""
    code = (
        "import sys\n"
        "sys.modules['graphviz'] = None  # as if not installed\n"
        "import mlp_ext\n"
        "try:\n"
        "    import mlp_ext.graph\n"
        "except ImportError as e:\n"
        "    assert 'graphviz' in str(e) and 'pip install graphviz' in str(e), e\n"
        "    print('clear ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clear ImportError"
