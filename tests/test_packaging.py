"""Packaging: the version (one source, the torch it was built for as the local label),
and the torch-version guard that `import mlp_ext` runs before it loads the compiled
operator (mlp_ext/_build_check.py), tested on copies of the built package with a
faked build record, each imported in a fresh interpreter. The wheel itself is
scripts/check_wheel.sh's (CI); its smoke test runs here on the build of the tree."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import mlp_ext
from mlp_ext import _build_check
from mlp_ext._version import __version__ as VERSION

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(mlp_ext.__file__).resolve().parent
RUNNING = _build_check.running_torch()


def test_version_has_one_source_and_the_torch_label():
    label = _build_check.local_label(torch.__version__, torch.version.cuda,
                                     getattr(torch.version, "hip", None))
    assert mlp_ext.__version__ == f"{VERSION}+{label}", (mlp_ext.__version__, VERSION, label)
    assert mlp_ext.build_info["local_label"] == label
    assert mlp_ext.build_info["torch_version"] == str(torch.__version__)
    setup_version = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout.split()[-1]
    assert setup_version == mlp_ext.__version__
    # The README's wheel names and version numbers are this version.
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"mlp_ext-(\d+\.\d+\.\d+)", readme)) | \
        set(re.findall(r"mlp_ext (\d+\.\d+\.\d+)", readme))
    assert named == {VERSION}, f"README names versions {named}, mlp_ext/_version.py has {VERSION}"


def test_installed_metadata_has_the_same_version():
    # The installation's metadata, not a mlp_ext.egg-info an sdist build left in the tree.
    path = [p for p in sys.path if p and Path(p).resolve() != ROOT]
    installed = [d.version for d in importlib.metadata.distributions(name="mlp_ext", path=path)]
    if not installed:  # a tree used through PYTHONPATH (gpu_run.sh)
        pytest.skip("mlp_ext is not installed in this environment (no metadata to compare)")
    assert installed[0] == mlp_ext.__version__, installed


def test_the_library_uses_the_stable_abi():
    assert re.fullmatch(r"_C\.abi3\.(so|pyd)", Path(mlp_ext._C.__file__).name), mlp_ext._C.__file__
    assert mlp_ext.build_info["python_limited_api"] == f"cp3{_limited_minor()}"


def _limited_minor():
    from torch.utils import cpp_extension

    return int(getattr(cpp_extension, "min_supported_cpython", "0x03090000"), 16) >> 16 & 0xFF


@pytest.mark.parametrize("version, cuda, hip, label", [
    ("2.13.0+cpu", None, None, "torch2.13cpu"),
    ("2.11.0+cu130", "13.0", None, "torch2.11cu130"),
    ("2.13.0a0+git1234abc", "12.8", None, "torch2.13cu128"),
    ("2.12.1", None, "6.4.43482", "torch2.12rocm6.4"),
])
def test_local_label(version, cuda, hip, label):
    assert _build_check.local_label(version, cuda, hip) == label


def _torch(version, cuda=None, hip=None, abi=True):
    return {"torch_version": version, "cuda": cuda, "hip": hip, "cxx11_abi": abi}


@pytest.mark.parametrize("recorded, running, why", [
    (_torch("2.13.0+cpu"), _torch("2.13.1+cpu"), None),  # patch releases keep the ABI
    (_torch("2.11.0+cu130", "13.0"), _torch("2.11.0", "13.0"), None),
    (_torch("2.12.0+cpu"), _torch("2.13.0+cpu"), "torch 2.12 vs 2.13"),
    (_torch("2.13.0+cpu"), _torch("2.13.0+cu130", "13.0"), "cpu vs cu130"),
    (_torch("2.13.0+cu126", "12.6"), _torch("2.13.0+cu128", "12.8"), "cu126 vs cu128"),
    (_torch("2.13.0+cpu", abi=False), _torch("2.13.0+cpu"), "_GLIBCXX_USE_CXX11_ABI=0 vs 1"),
    (_torch("2.11.0+cu130", "13.0"), _torch("2.13.0+cpu"), "torch 2.11 vs 2.13; cu130 vs cpu"),
])
def test_what_counts_as_a_mismatch(recorded, running, why):
    assert _build_check.mismatch(recorded, running) == why


# ------------------------------------------------------------------ the guard, in subprocesses

def _copy_package(dest, record=None, source_tree=False):
    """dest/mlp_ext: the package's Python files and the built library, with `record`
    (a dict replacing fields of the real build record; None: no record at all).
    source_tree: dest also looks like a checkout (setup.py, csrc/)."""
    pkg = dest / "mlp_ext"
    pkg.mkdir(parents=True)
    for f in PACKAGE.glob("*.py"):
        if f.name != _build_check.RECORD:
            shutil.copy2(f, pkg / f.name)
    libraries = list(PACKAGE.glob("_C*.so")) + list(PACKAGE.glob("_C*.pyd"))
    assert len(libraries) == 1, libraries
    shutil.copy2(libraries[0], pkg / libraries[0].name)
    if record is not None:
        fields = dict(mlp_ext.build_info, **record)
        (pkg / _build_check.RECORD).write_text("".join(f"{k} = {v!r}\n" for k, v in fields.items()))
    if source_tree:
        (dest / "setup.py").write_text("")
        (dest / "csrc").mkdir()
    return pkg


def _import(dest, code="import mlp_ext"):
    """Runs `code` in a fresh interpreter whose sys.path starts at dest (so the copy,
    not the tree's package, is imported; checked)."""
    check = "; import os; assert os.path.dirname(mlp_ext.__file__) == os.path.join(os.getcwd(), 'mlp_ext'), mlp_ext.__file__"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code + check], cwd=dest, env=env,
                          capture_output=True, text=True, timeout=120)


def test_guard_names_both_torches_and_the_fix(tmp_path):
    """A build recorded for another torch (the library itself is this torch's, so
    without the guard the import would succeed): ImportError before _C is loaded."""
    fake = {"torch_version": "2.12.0+cu126", "cuda": "12.6", "hip": None}
    _copy_package(tmp_path, fake)
    result = _import(tmp_path)
    assert result.returncode != 0, result.stdout
    err = result.stderr
    running = _build_check.describe(RUNNING["torch_version"], RUNNING["cuda"], RUNNING["hip"])
    label = _build_check.local_label(RUNNING["torch_version"], RUNNING["cuda"], RUNNING["hip"])
    for expected in ("ImportError: mlp_ext ", "was built for torch 2.12.0+cu126 (CUDA 12.6)",
                     f"but {running} is installed", "torch 2.12 vs ",
                     f"{sys.executable} -m pip install --force-reinstall --no-deps "
                     f"mlp_ext-{VERSION}+{label}-*.whl",
                     f"--no-build-isolation --force-reinstall --no-deps mlp_ext-{VERSION}.tar.gz"):
        assert expected in err, f"{expected!r} not in:\n{err}"
    assert "undefined symbol:" not in err and "OSError" not in err  # the loader's error


def test_guard_in_a_source_tree_says_how_to_rebuild_it(tmp_path):
    _copy_package(tmp_path, {"torch_version": "2.12.0+cpu", "cuda": None}, source_tree=True)
    result = _import(tmp_path)
    assert result.returncode != 0
    assert f"Fix: cd {tmp_path} && {sys.executable} -m pip install --no-build-isolation -e ." \
        in result.stderr, result.stderr


def test_a_build_for_another_patch_release_loads(tmp_path):
    major, minor = RUNNING["torch_version"].split("+")[0].split(".")[:2]
    _copy_package(tmp_path, {"torch_version": f"{major}.{minor}.99"})
    result = _import(tmp_path, "import mlp_ext, torch; o, s = mlp_ext.fused_mlp(torch.ones(2, 3), "
                               "torch.ones(4, 3), torch.ones(1, 4)); assert o.tolist() == [[12.0], [12.0]]")
    assert result.returncode == 0, result.stderr


def test_an_unbuilt_package_says_how_to_build(tmp_path):
    _copy_package(tmp_path, None, source_tree=True)
    result = _import(tmp_path)
    assert result.returncode != 0
    err = result.stderr
    assert "ImportError: mlp_ext is not built" in err and "_build_info.py is missing" in err, err
    assert f"--no-build-isolation -e ." in err, err


# ------------------------------------------------------------------ the smoke test, the dist checker

def test_smoke_script_passes_on_this_build(tmp_path):
    """tests/smoke_installed.py, which CI runs on the installed wheel, here on the
    build of the tree, from another directory."""
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "smoke_installed.py")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"smoke: all {len(mlp_ext.ACTIVATIONS) + 2} checks passed on cpu" in result.stdout, result.stdout


def test_inspect_dist_rejects_a_bad_wheel_and_sdist(tmp_path):
    """scripts/inspect_dist.py, which CI runs on the real files, fails on what it
    must catch: tests and sources in the wheel, a build path, no library, a torch
    requirement, a sdist without the headers."""
    version = f"{VERSION}+torch2.13cpu"
    wheel = tmp_path / f"mlp_ext-{version}-cp310-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mlp_ext/__init__.py", "")
        z.writestr("mlp_ext/functional.py", "# built in /home/builder/mlp_ext\n")
        z.writestr("tests/test_ops.py", "")
        z.writestr("mlp_ext/csrc/mlp.cpp", "")
        z.writestr(f"mlp_ext-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: mlp_ext\nVersion: {version}\nRequires-Dist: torch>=2.0\n")
    import tarfile

    sdist = tmp_path / f"mlp_ext-{VERSION}.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        t.add(ROOT / "setup.py", f"mlp_ext-{VERSION}/setup.py")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "inspect_dist.py"), str(tmp_path),
                             "--forbid", "/home/builder"], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    for expected in ("expected one mlp_ext/_C.abi3.so", "tests/test_ops.py does not belong",
                     "mlp_ext/csrc/mlp.cpp does not belong", "contains the build path '/home/builder'",
                     "requires torch", "mlp_ext/_build_info.py is missing", "csrc/mlp.h is missing"):
        assert expected in err, f"{expected!r} not in:\n{err}"
