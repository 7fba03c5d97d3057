"""examples/train_digits.py: a short run trains both models in lockstep."""
import math
from pathlib import Path

import pytest

from helpers import load_module

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]

example = load_module("train_digits", ROOT / "examples" / "train_digits.py")


def test_short_run_gives_equal_loss_curves(tmp_path, capsys):
    plot = tmp_path / "digits.png"
    result = example.main(["--epochs", "2", "--plot", str(plot)])
    steps_per_epoch = math.ceil(1437 / 64)  # 80% of the 1797 digits, batches of 64
    assert result["steps"] == 2 * steps_per_epoch
    fused, linear = result["losses"]["fused"], result["losses"]["nn.Linear"]
    assert len(fused) == len(linear) == result["steps"]
    assert result["max_relative_loss_difference"] < 1e-4
    assert fused[-1] < 0.6 * fused[0]  # it learns
    assert result["test_accuracy"]["fused"] > 0.75
    assert abs(result["test_accuracy"]["fused"] - result["test_accuracy"]["nn.Linear"]) < 0.01
    assert all(t > 0 for t in result["seconds"].values())
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in capsys.readouterr().out


def test_float64_curves_agree_to_rounding():
    result = example.main(["--epochs", "1", "--dtype", "float64", "--activation", "gelu",
                           "--tolerance", "1e-12"])
    assert result["max_relative_loss_difference"] < 1e-12
