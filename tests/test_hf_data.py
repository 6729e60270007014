"""Hub datasets (data.train: hf:owner/name[:split]) read offline from a real Hugging Face cache.

No Hub is reachable here, so the cache is built the way an online ``datasets.load_dataset`` fills
it: the repository's parquet files are prepared into ``HF_DATASETS_CACHE`` by datasets' own
parquet builder (the module ``load_dataset`` picks for a parquet repository), under the commit as
its hash. Offline, ``datasets`` 5 reads only that cache (its Cache builder); the hub cache of
downloaded repository files is not consulted. The tests then load through ``nrt_mlx.data``, which
makes the same ``load_dataset`` call a user's run does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets  # the [hf] extra; the dev install has it
import pytest

from nrt_mlx.data import load_data
from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import DataConfig

REPO = "acme/tiny-qa"
REVISION = "0123456789abcdef0123456789abcdef01234567"

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of Spain?"},
    {"role": "assistant", "content": "Madrid"},
]
TRAIN = [
    {"question": "Capital of France?", "answer": "Paris"},
    {"prompt": "Two plus two?", "completion": "four"},
    {"question": "Empty answer?", "answer": "  "},
    {"messages": MESSAGES},
    {"question": "Why is the sky blue?", "answer": "Rayleigh scattering"},
]
VALIDATION = [{"question": "Capital of Italy?", "answer": "Rome"}]
SOCRATIC = [{"question": "What is one and one?", "answer": "two"}] * 3


def cache_hub_dataset(cache: Path, repo: str, config: str, splits: dict[str, list[dict]]) -> None:
    """Put ``repo``'s configuration ``config`` into the datasets cache at ``cache`` as an online
    ``load_dataset(repo, config)`` leaves it: ``owner___name/config/0.0.0/COMMIT/``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo.split("/")
    files = cache.parent / "repo" / config
    files.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():  # the Hub's layout: data/SPLIT-00000-of-00001.parquet
        # One table of every record's columns (None where a record has none), as on the Hub.
        columns = list(dict.fromkeys(key for row in rows for key in row))
        table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
        pq.write_table(table, files / f"{split}-00000-of-00001.parquet")
    data_files = {split: str(files / f"{split}-00000-of-00001.parquet") for split in splits}
    builder = Parquet(
        cache_dir=str(cache),
        dataset_name=name,
        config_name=config,
        config_id=config,
        hash=REVISION,
        data_files=data_files,
    )
    builder.download_and_prepare()
    # With repo_id the builder would name the folder owner___name itself, but then it accepts only
    # files on the Hub: move the prepared configuration under the namespace.
    target = cache / f"{owner}___{name}"
    target.mkdir(exist_ok=True)
    (cache / name / config).rename(target / config)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME with REPO cached: configurations default (train, validation)."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "datasets"
    cache_hub_dataset(cache, REPO, "default", {"train": TRAIN, "validation": VALIDATION})
    cache_hub_dataset(cache, "acme/two-configs", "main", {"train": TRAIN[:2]})
    cache_hub_dataset(cache, "acme/two-configs", "socratic", {"train": SOCRATIC})
    return home


@pytest.fixture
def offline(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with the cache above: datasets reads both settings once at import, so they are
    set on its config here (the subprocess test below sets the environment variables)."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")
    return hf_home


def test_hub_rows_in_the_three_formats_with_skipped_rows_by_index(offline: Path) -> None:
    data = load_data(f"hf:{REPO}", DataConfig(), "data.train")
    assert [e.answer for e in data.examples] == ["Paris", "four", "Madrid", "Rayleigh scattering"]
    assert [e.line for e in data.examples] == [0, 1, 3, 4]  # the row index, as dataset[i]
    assert data.examples[2].messages == MESSAGES[:2]  # system turn kept as context
    assert data.skipped == [(2, "empty answer")]
    assert data.report() == f"hf:{REPO}:train: 4 examples, skipped 1: row 2 (empty answer)"
    with pytest.raises(NrtError) as err:
        load_data(f"hf:{REPO}:train", DataConfig(strict=True), "data.train")
    assert str(err.value) == f"hf:{REPO}:train row 2: empty answer (data.strict is on)"


def test_split_defaults_slices_and_field_mapping(offline: Path) -> None:
    valid = load_data(f"hf:{REPO}", DataConfig(), "data.valid")  # default split: validation
    assert valid.path == f"hf:{REPO}:validation" and valid.examples[0].answer == "Rome"
    sliced = load_data(f"hf:{REPO}:train[:2]", DataConfig(), "data.train")
    assert [e.answer for e in sliced.examples] == ["Paris", "four"]
    mapped = DataConfig(question_field="prompt", answer_field="completion")
    only = load_data(f"hf:{REPO}:train[1:2]", mapped, "data.train")
    assert only.examples[0].question == "Two plus two?"


def test_configuration_from_data_hf_config(offline: Path) -> None:
    data = load_data("hf:acme/two-configs", DataConfig(hf_config="socratic"), "data.train")
    assert data.path == "hf:acme/two-configs:train (socratic)" and len(data) == 3
    with pytest.raises(NrtError, match=r"set data\.hf_config to one of the configurations$"):
        load_data("hf:acme/two-configs", DataConfig(), "data.train")


def test_hub_errors_are_one_line_with_a_route(
    offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def error(source: str, key: str = "data.train") -> str:
        with pytest.raises(NrtError) as err:
            load_data(source, DataConfig(), key)
        assert "\n" not in str(err.value)
        return str(err.value)

    missing = error("hf:acme/not-cached")
    assert missing.startswith("data.train: hf:acme/not-cached:train is not in the Hugging Face")
    assert "HF_HUB_OFFLINE is set" in missing and "load it once with the Hub reachable" in missing
    assert str(offline / "datasets") in missing
    split = error(f"hf:{REPO}:test", "data.valid")
    assert split.startswith(f"data.valid: hf:{REPO}:test: Unknown split")
    assert split.endswith("pick the split with hf:owner/name:SPLIT")
    assert "write hf:owner/name or hf:owner/name:split" in error("hf:a/b/c")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the [hf] extra were not installed
    assert error(f"hf:{REPO}") == (
        f"data.train: hf:{REPO} needs the Hugging Face datasets package: pip install 'nrt-mlx[hf]'"
    )


def test_train_on_a_hub_dataset_offline_from_the_environment(
    tmp_path: Path, tiny_model_dir: Path, hf_home: Path
) -> None:
    """The user's command in a fresh process: HF_HOME and HF_HUB_OFFLINE come from the
    environment, data.train and data.valid are Hub splits, and the run evaluates on the valid."""
    from helpers import tiny_recipe, write_recipe

    data = {"train": f"hf:{REPO}", "valid": f"hf:{REPO}:validation"}
    train = {"steps": 1, "eval_every": 1, "eval_questions": 1, "eval_samples": 1}
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir, data=data, train=train))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    cmd = [sys.executable, "-m", "nrt_mlx.cli", "train", str(recipe), "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"hf:{REPO}:train: 4 examples, skipped 1: row 2 (empty answer)" in done.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert metrics[-1]["step"] == 1 and metrics[-1]["eval_questions"] == 1  # the validation split
