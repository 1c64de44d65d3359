"""The benchmark harness itself (bench/experiments.py) on tiny runs, so it cannot rot."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("sklearn")
experiments = pytest.importorskip("bench.experiments")


@pytest.fixture(scope="module")
def digits():
    return experiments.Digits()


@pytest.mark.parametrize("name", ["tlr", "tlr-tensor", "tlr-direction", "sgd", "sgd-multistep", "sgd-exp", "adam", "hd", "naive"])
def test_every_optimizer_trains_one_epoch(digits, name):
    h = experiments.train(digits, name, 1e-3 if name == "adam" else 0.01, 512, 2, 0)
    assert len(h["loss"]) == 2 and all(math.isfinite(x) for x in h["loss"])
    assert h["loss"][-1] < 2.31  # below chance level (ln 10) after two epochs
    assert 0 <= h["metric"][-1] <= 1 and h["alpha"][-1]


def test_window_fraction_of_an_epoch(digits):
    h = experiments.train(digits, "tlr", 0.01, 256, 2, 0, window_p=0.33)
    assert len(h["alpha"]) == 2


def test_summary_markdown_and_plot(tmp_path, digits):
    runs = {f"{o} lr0=0.01 batch=512 seed=0": experiments.train(digits, o, 0.01, 512, 3, 0) for o in ("sgd", "tlr")}
    rows = experiments.summarise("digits", runs)
    assert {r["label"] for r in rows} == {"sgd lr0=0.01 batch=512", "tlr lr0=0.01 batch=512"}
    text = experiments.markdown("robustness", "digits", rows, runs)
    assert "spread" in text and "| tlr |" in text
    experiments.plot("robustness", "digits", runs, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000
    json.dumps(runs)  # JSON-serialisable: runs can be resumed and re-plotted


def test_charlm_task_builds_from_stdlib_text():
    task = experiments.CharLM(chars=20_000, epoch_steps=2)
    h = experiments.train(task, "tlr", 0.1, 8, 1, 0)
    assert task.vocab > 30 and math.isfinite(h["loss"][-1]) and h["metric"][-1] > 1


def test_summary_survives_diverged_runs():
    runs = {f"x seed={s}": {"loss": [1.0, v], "metric": [0.5, 0.1], "alpha": [[0.1], [0.1]], "initial_loss": 2.3}
            for s, v in enumerate([float("nan"), 0.5, float("inf")])}
    (row,) = experiments.summarise("digits", runs)
    assert row["diverged"] == 2 and math.isnan(row["loss"][0])
