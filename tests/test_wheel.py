"""The wheel works on its own: built offline, installed offline into a fresh venv, it runs
``nrt-mlx --help`` and loads the quickstart's bundled recipe and data from its own files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import nrt_mlx

REPO = Path(__file__).resolve().parent.parent
# What the sdist/wheel is built from: everything else in the clone (tests, runs, .venv) is not.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "nrt_mlx", "recipes")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # No PYTHONPATH: the installed copy must be the only nrt_mlx the child can import.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (the build leaves no build/ in the clone)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = work / "dist"
    # setuptools comes from the dev extra; --no-index: nothing is downloaded.
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip, "--wheel-dir", str(dist), str(src)], work)
    (built,) = dist.glob("nrt_mlx-*.whl")
    return built


def test_wheel_holds_every_module_the_recipes_and_the_licence(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(meta_name).decode())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "nrt_mlx").rglob("*.py")}
    assert modules - names == set(), (
        "modules missing from the wheel: list their package in pyproject"
    )
    recipes = {
        "nrt_mlx/recipes/" + p.relative_to(REPO / "recipes").as_posix()
        for pattern in ("*.yaml", "**/*.yaml", "data/*.jsonl")
        for p in (REPO / "recipes").glob(pattern)
    }
    assert {"nrt_mlx/recipes/quickstart.yaml", "nrt_mlx/recipes/data/train.jsonl"} <= recipes
    assert recipes - names == set()
    assert "nrt_mlx/py.typed" in names
    assert meta["Version"] == nrt_mlx.__version__
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    requires = meta.get_all("Requires-Dist")
    assert "mlx-lm>=0.32.0" in requires and any(r.startswith("mlx[cpu]>=0.32") for r in requires)


LOAD_QUICKSTART = """
import json, nrt_mlx
from nrt_mlx.data import load_data
from nrt_mlx.quickstart import load_quickstart_recipe
recipe, path = load_quickstart_recipe()
train = load_data(recipe.data.train, recipe.data, "data.train")
valid = load_data(recipe.data.valid, recipe.data, "data.valid")
print(json.dumps({"package": nrt_mlx.__file__, "recipe": str(path), "train": recipe.data.train,
                  "valid": recipe.data.valid, "sizes": [len(train), len(valid)]}))
"""


def test_installed_wheel_finds_its_recipe_and_data(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # the test venv's pip installs into it (--python)
    python = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The dependencies come from the test venv, after the fresh venv's own site-packages: nothing
    # is downloaded, and the wheel's nrt_mlx is found first.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (purelib / "zz_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    _run([*pip, "--no-deps", "--no-index", str(wheel)], tmp_path)

    help_text = _run([str(env_dir / "bin" / "nrt-mlx"), "--help"], tmp_path).stdout
    assert "quickstart" in help_text and "train" in help_text

    found = json.loads(_run([str(python), "-c", LOAD_QUICKSTART], tmp_path).stdout)
    for key in ("package", "recipe", "train", "valid"):
        path = Path(found[key]).resolve()
        assert path.is_relative_to(purelib.resolve()), f"{key} {path} is not the installed copy"
        assert not path.is_relative_to(REPO), f"{key} {path} comes from the clone"
    train_lines = (REPO / "recipes" / "data" / "train.jsonl").read_text().splitlines()
    assert found["sizes"][0] == len([line for line in train_lines if line.strip()])
    assert found["sizes"][1] > 0
