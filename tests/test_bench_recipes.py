"""``mrl bench recipes``: options, the choice rule, and one whole run on the bundled sample.

The run scores the tiny random model (``tiny_model``, dims 64 and 32) as its one recipe: which rows
it makes, from which queries, and how it chooses. The real model's untuned figure on the sample
(the README's) is checked where the real model is trained, in ``tests/test_train_real.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.recipes import RecipesConfig, check_config, choose, parse_recipes, run_recipes
from core.data import DataError, load_beir
from core.errors import ConfigError
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIMS


def test_recipes_are_name_path_pairs_given_once():
    assert parse_recipes(["base=base", "small=runs/{dataset}-small"]) == {
        "base": "base",
        "small": "runs/{dataset}-small",
    }
    with pytest.raises(ConfigError, match="is not NAME=PATH"):
        parse_recipes(["runs/model"])
    with pytest.raises(ConfigError, match="'a' is given twice"):
        parse_recipes(["a=base", "a=x"])


def test_adaptor_rows_and_model_folders_are_checked_before_any_work(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"--adaptor-on \['tuned'\] names no --recipe"):
        check_config(RecipesConfig(data=[SAMPLE], recipes=["base=base"], adaptor_on=["tuned"]))
    with pytest.raises(DataError, match="recipe 'tuned': no model folder here"):
        check_config(RecipesConfig(data=[SAMPLE], recipes=[f"tuned={tmp_path}/{{dataset}}-tuned"]))


def row(name: str, full: float, small: float) -> dict:
    return {"recipe": name, "validation": {"384": full, "32": small}}


def test_choice_is_the_best_small_dim_among_rows_that_keep_the_full_dim():
    rows = [row("default", 0.80, 0.60), row("greedy", 0.75, 0.70), row("balanced", 0.795, 0.65)]
    assert choose(rows, [384, 32], tolerance=0.01) == "balanced"  # greedy loses 0.05 at full dim
    assert choose(rows, [384, 32], tolerance=0.1) == "greedy"


def test_sample_run_tables_and_plots_every_recipe(tmp_path: Path, tiny_model: Path):
    from core.models import SentenceTransformerEncoder, load_model
    from training.evaluate import evaluate

    recipe = {"recipes": [f"base={tiny_model}"], "adaptor_on": ["base"], "adaptor_steps": 20}
    config = RecipesConfig(data=[SAMPLE], out=tmp_path, progress=False, **recipe)
    report = run_recipes(config)
    (dataset,) = report["datasets"]
    names = [r["recipe"] for r in dataset["rows"]]
    assert names[:4] == ["base", "base + PCA", "base + PCA + adaptor", "base + adaptor"]
    auto = dataset["rows"][4]  # what `mrl adapt --init auto` keeps: the start that validated better
    kept = {"base + adaptor, auto start (pca)": 2, "base + adaptor, auto start (identity)": 3}[auto["recipe"]]
    twin = dataset["rows"][kept]
    assert (auto["validation"], auto["test"]) == (twin["validation"], twin["test"])
    other = dataset["rows"][5 - kept]
    assert twin["validation"]["32"] >= other["validation"]["32"]
    assert dataset["queries"] == {"training": 108, "validation": 12, "test": 120}
    base, pca = dataset["rows"][0], dataset["rows"][1]
    full = str(TINY_DIMS[0])
    # The base row is the untuned model scored on the test split, as `mrl eval` scores it.
    untuned = evaluate(SentenceTransformerEncoder(load_model(str(tiny_model)), "base", progress=False),
                       load_beir(SAMPLE), "test", TINY_DIMS)  # fmt: skip
    assert base["test"][full] == pytest.approx(untuned.metric(TINY_DIMS[0]), abs=1e-4)
    assert pca["test"][full] == pytest.approx(base["test"][full], abs=1e-3)  # a rotation keeps the full dim
    assert dataset["chosen"] in names
    markdown = (tmp_path / "recipes.md").read_text()
    assert f"Chosen on validation: **{dataset['chosen']}**" in markdown
    assert (tmp_path / "recipes_sample_medical.png").stat().st_size > 1000
    assert json.loads((tmp_path / "recipes.json").read_text())["datasets"][0]["chosen"] == dataset["chosen"]


def test_every_recipe_is_also_scored_on_the_clean_test_view(tmp_path: Path, tiny_model: Path):
    """Half the sample's training questions: test questions whose passages they judge are the shared view."""
    from tests.helpers.sample import half_shared_sample

    data, shared = half_shared_sample(tmp_path / "sample_medical")
    config = RecipesConfig(data=[data], recipes=[f"base={tiny_model}"], out=tmp_path / "out", progress=False)
    (measured,) = run_recipes(config)["datasets"]
    assert measured["views"] == {"clean": 120 - len(shared), "shared": len(shared)} and 0 < len(shared) < 120
    [base] = measured["rows"]
    assert set(base["test_views"]["clean"]) == set(base["test"])
    clean, shared_n = measured["views"]["clean"], measured["views"]["shared"]
    whole = (clean * base["test_views"]["clean"]["64"] + shared_n * base["test_views"]["shared"]["64"]) / 120
    assert whole == pytest.approx(base["test"]["64"], abs=1e-3)  # the two views partition the split
    assert f"Clean test view ({clean} questions" in (tmp_path / "out" / "recipes.md").read_text()


def test_benchmark_corpora_are_encoded_by_the_workers_asked_for(monkeypatch):
    # The pool itself runs the real model in tests/test_index_build.py; here only that benchmarks go through it.
    import contextlib

    import numpy as np

    import core.models
    from benchmarks.quality import encode_corpus

    asked = []

    @contextlib.contextmanager
    def pool(encoder, workers):
        asked.append(workers)
        yield encoder

    class Model:
        def get_embedding_dimension(self):
            return 2

        def encode_document(self, texts, **options):
            return np.ones((len(texts), 2))

    monkeypatch.setattr(core.models, "encoder_pool", pool)
    assert encode_corpus(Model(), ["a", "b", "c"], 3, progress=False).shape == (3, 2)
    assert asked == [3]
