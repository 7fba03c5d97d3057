"""The benchmark's --quick path end to end, its verification step, and the timing and
saved-bytes helpers of benchmarks/common.py."""
import gc
import json
import statistics
from pathlib import Path

import pytest
import torch

import mlp_ext
from helpers import load_module

ROOT = Path(__file__).resolve().parents[1]
bench = load_module("mlp_benchmark", ROOT / "benchmarks" / "benchmark.py")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    report = bench.main(["--quick", "--rounds", "2", "--block-seconds", "0.002", "--out", str(out)])
    return report, out


def test_quick_run_reports_every_case(quick_run, capsys):
    report, _ = quick_run
    results = report["results"]
    cases = {(tuple(r["shape"][k] for k in "ndhq"), r["mode"]) for r in results}
    assert cases == {(shape, mode) for shape in bench.QUICK_SHAPES for mode in bench.MODES}
    for r in results:
        assert set(r["seconds"]) == {"eager", "fused"}
        assert all(t > 0 for t in r["seconds"].values())
        assert len(r["rounds"]["fused"]) == 2
        per_round = sorted(e / f for e, f in zip(r["rounds"]["eager"], r["rounds"]["fused"]))
        assert per_round[0] <= r["ratio"] <= per_round[-1]
        assert r["spread"]["min"] == per_round[0] and r["spread"]["max"] == per_round[-1]
        assert r["spread"]["median"] == pytest.approx(r["ratio"])
        assert r["ratio_of_medians"] == pytest.approx(r["seconds"]["eager"] / r["seconds"]["fused"])
        assert r["fused_over_floor"] == pytest.approx(r["seconds"]["fused"] / r["floor_seconds"])
        assert r["gflops"]["fused"] == pytest.approx(r["flops"] / r["seconds"]["fused"] / 1e9)
        products = bench.gemm_products(tuple(r["shape"][k] for k in "ndhq"), r["mode"])
        assert set(r["floor_products"]) == {name for name, *_ in products}
        assert r["floor_seconds"] == pytest.approx(
            sum(p["seconds"][p["best"]] for p in r["floor_products"].values()))
        if r["mode"] == "train":  # timed on its own, in the same rounds
            assert len(r["rounds"]["fused op"]) == 2
            assert r["operator_seconds"] == pytest.approx(statistics.median(r["rounds"]["fused op"]))
        else:  # the fused call is the operator alone
            assert "fused op" not in r["rounds"]
            assert r["operator_seconds"] == r["seconds"]["fused"]
        assert r["operator_over_floor"] == pytest.approx(r["operator_seconds"] / r["floor_seconds"])
        bare = r["bare_step_seconds"]
        assert (bare > 0) == (r["mode"] == "train")
        assert r["bound"] == pytest.approx(r["seconds"]["eager"] / (bare + r["floor_seconds"]))
        if r["mode"] == "train":
            # Both sides keep the hidden activations; the fused op keeps z and h.
            n, h = r["shape"]["n"], r["shape"]["h"]
            assert r["saved_bytes"]["fused"] >= 2 * n * h * 4
            assert r["saved_bytes"]["eager"] >= n * h * 4


def test_spread_flags_rounds_that_disagree():
    calm = bench.spread([2.0, 2.1, 1.9, 2.05])
    assert (calm["min"], calm["max"], calm["noisy"]) == (1.9, 2.1, False)
    assert calm["q1"] <= calm["median"] <= calm["q3"]
    assert bench.spread([1.0, 3.0, 1.2, 2.8])["noisy"]  # a load change between rounds
    assert bench.fmt_spread(bench.spread([1.0, 3.0, 1.2, 2.8])).endswith("noisy")


def test_compiled_side_check_rejects_graph_breaks_recompiles_and_fallbacks():
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        counters["stats"]["unique_graphs"] = 2
        counters["aot_autograd"].update(total=2, ok=2)
        assert bench.check_compiled("case", 2)["graphs"] == 2
        with pytest.raises(bench.VerificationError, match="1 graphs compiled during the timing"):
            bench.check_compiled("case", 1)
        counters["aot_autograd"]["total"] = 3
        with pytest.raises(bench.VerificationError, match="AOTAutograd"):
            bench.check_compiled("case", 2)
        counters["aot_autograd"]["ok"] = 3
        counters["graph_break"]["a reason"] = 1
        with pytest.raises(bench.VerificationError, match="graph breaks"):
            bench.check_compiled("case", 2)
    finally:
        counters.clear()


def test_quick_run_writes_json_markdown_and_plot(quick_run):
    report, out = quick_run
    on_disk = json.loads((out / "cpu.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(report["results"]))
    meta = on_disk["meta"]
    for key in ("date", "torch", "cpu", "threads", "device", "platform"):
        assert meta[key], key
    assert meta["torch"] == torch.__version__
    assert meta["threads"] == torch.get_num_threads()
    table = (out / "cpu.md").read_text()
    assert "| n×d×h×q |" in table and "**eager/fused**" in table
    assert table.count("| 1×16×16×16 | float32 | relu |") == 2
    png = (out / "cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_verification_accepts_equal_sides():
    sides = bench.make_sides(bench.make_sequential((4, 6, 5, 3), torch.float32, "gelu", "cpu"), 1e-2)
    x, y = bench.make_batch((4, 6, 5, 3), torch.float32, "cpu", torch.Generator().manual_seed(0))
    bench.verify(sides, x, y)


@pytest.mark.parametrize("what, change", [
    ("inference output", lambda fused: fused.params[3].data.add_(1e-2)),  # b2
    ("gradient of w1", lambda fused: fused.params[0].data.mul_(1.0 + 1e-3)),
])
def test_verification_rejects_different_sides(what, change):
    shape = (8, 6, 5, 3)
    sides = bench.make_sides(bench.make_sequential(shape, torch.float64, "relu", "cpu"), 1e-2)
    x, y = bench.make_batch(shape, torch.float64, "cpu", torch.Generator().manual_seed(0))
    change(sides[1])
    with pytest.raises(bench.VerificationError, match="fused vs eager"):
        bench.verify(sides, x, y)


def test_verification_catches_a_wrong_penalty():
    shape = (8, 6, 5, 3)
    sides = bench.make_sides(bench.make_sequential(shape, torch.float64, "relu", "cpu"), 1e-2)
    x, y = bench.make_batch(shape, torch.float64, "cpu", torch.Generator().manual_seed(0))
    eager = sides[0]
    sides[0] = bench.Side("eager", eager.forward,
                          lambda x: (eager.forward(x), eager.with_penalty(x)[1] * 2), eager.params)
    with pytest.raises(bench.VerificationError, match="penalty s"):
        bench.verify(sides, x, y)


@pytest.mark.parametrize("argv", [
    ["--shapes", "1x2x3"], ["--shapes", "1x2x3x0"], ["--dtype", "int8"],
    ["--activation", "softmax"], ["--device", "tpu"], ["--rounds", "0"],
])
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_gemm_products_cover_the_step():
    n, d, h, q = 3, 5, 7, 2
    train = bench.gemm_products((n, d, h, q), "train")
    assert bench.flops((n, d, h, q), "inference") == 2 * n * (d * h + h * q)
    assert bench.flops((n, d, h, q), "train") == 2 * n * (2 * d * h + 3 * h * q)
    assert [name for name, *_ in train][:2] == [name for name, *_ in bench.gemm_products((n, d, h, q), "inference")]


def test_operator_alone_gives_the_gradients_of_its_output_gradients():
    shape = (5, 6, 7, 3)
    seq = bench.make_sequential(shape, torch.float64, "gelu", "cpu")
    fused = bench.make_sides(seq, 1e-2)[1]
    x, _ = bench.make_batch(shape, torch.float64, "cpu", torch.Generator().manual_seed(0))
    bench.operator_alone(fused, x, torch.Generator().manual_seed(1))()
    o, s = fused.with_penalty(x)
    grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 5
    expected = torch.autograd.grad((o, s), fused.params, (grad_o, torch.ones_like(s)))
    for p, e in zip(fused.params, expected):
        torch.testing.assert_close(p.grad, e)


def test_interleaved_alternates_the_order_and_keeps_gc_on_interrupt():
    """benchmarks/common.py's timing (all benchmarks use it): after warm-up, each round
    runs every closure's block, the order reversed every other round; a Ctrl-C
    (KeyboardInterrupt) inside a round leaves the garbage collector as it was."""
    log = []
    closures = {name: (lambda name=name: log.append(name)) for name in "ab"}
    times = bench.interleaved(closures, bench.Clock("cpu"), 4, 1e-4, max_calls=1)
    assert log[-8:] == list("abbaabba")
    assert {name: len(values) for name, values in times.items()} == {"a": 4, "b": 4}
    assert all(t > 0 for values in times.values() for t in values)
    assert bench.medians({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}

    def interrupted():
        if not gc.isenabled():  # in the rounds (the collector is off while they run)
            raise KeyboardInterrupt

    assert gc.isenabled()
    with pytest.raises(KeyboardInterrupt):
        bench.interleaved({"x": interrupted}, bench.Clock("cpu"), 3, 1e-4)
    assert gc.isenabled()


def test_saved_bytes_counts_the_storages_autograd_keeps():
    n, d, h, q = 6, 5, 7, 3
    mlp = mlp_ext.FusedMLP(d, h, q)
    x = torch.randn(n, d)
    params = list(mlp.parameters())
    o, everything = bench.saved_bytes(lambda: mlp(x))
    assert o.shape == (n, q)
    _, owned = bench.saved_bytes(lambda: mlp(x), exclude=[x, *params])
    assert owned == 2 * n * h * 4  # z and h
    assert everything == owned + x.nbytes + sum(p.nbytes for p in params[:3])  # x, W1, b1, W2
