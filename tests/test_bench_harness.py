"""The benchmark harness itself (bench/experiments.py) on tiny runs, so it cannot rot."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: see tests/conftest.py
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


def test_adamw_experiment_grid_and_table(digits, monkeypatch):
    """The AdamW experiment (issue 12): its runs train, and its table gives the spread over the
    starts and TLRAdamW's gap to the best tuned AdamW (here on fake results, so that the
    arithmetic is checked)."""
    monkeypatch.setattr(experiments, "optional_peers", lambda: [])
    runs = experiments.grid("adamw", "digits", False)
    assert {o for _, o, *_ in runs} == {"adamw", "adamw-cosine", "tlr-adamw", "tlr-adamw-auto"} and len(runs) == 12
    built = {o: type(experiments.build(o, [torch.zeros(2, requires_grad=True)], 1e-3, 1, 1)[0]).__name__
             for o in ("adamw", "adamw-cosine", "tlr-adamw", "tlr-adamw-auto")}
    assert built == {"adamw": "AdamW", "adamw-cosine": "AdamW", "tlr-adamw": "TLRAdamW",  # not TLR by its prefix
                     "tlr-adamw-auto": "TLRAdamW"}
    h = experiments.train(digits, "tlr-adamw", 1e-3, 512, 2, 0)
    assert math.isfinite(h["loss"][-1]) and h["alpha"][-1][0] > 0
    with pytest.raises(ValueError, match="adamw experiment runs on"):
        experiments.grid("adamw", "wine", False)

    def fake(ppl):
        return {"loss": [1.0], "metric": [ppl], "alpha": [[1e-3]], "initial_loss": 2.0}

    ppl = {"adamw": {1e-4: 12.0, 1e-3: 7.0, 1e-2: 6.0}, "adamw-cosine": {1e-4: 16.0, 1e-3: 8.0, 1e-2: 6.2},
           "tlr-adamw": {1e-4: 6.3, 1e-3: 6.1, 1e-2: 6.15}}
    fakes = {f"{n} lr0={lr} seed=0": fake(v) for n, d in ppl.items() for lr, v in d.items()}
    text = "\n".join(experiments.adamw_table("charlm", fakes))
    assert "| spread over the starts | 6 | 9.8 | 0.2 |" in text
    assert "by α0 (positive: worse): 0.0001: +5.0%, 0.001: +1.7%, 0.01: +2.5% — every α0 within 3%: no" in text


def test_charlm_task_builds_from_stdlib_text():
    task = experiments.CharLM(chars=20_000, epoch_steps=2)
    h = experiments.train(task, "tlr", 0.1, 8, 1, 0)
    assert task.vocab > 30 and math.isfinite(h["loss"][-1]) and h["metric"][-1] > 1


def test_summary_survives_diverged_runs():
    runs = {f"x seed={s}": {"loss": [1.0, v], "metric": [0.5, 0.1], "alpha": [[0.1], [0.1]], "initial_loss": 2.3}
            for s, v in enumerate([float("nan"), 0.5, float("inf")])}
    (row,) = experiments.summarise("digits", runs)
    assert row["diverged"] == 2 and math.isnan(row["loss"][0])


def test_host_cost_mocks_every_kernel(monkeypatch):
    """bench/host_cost.py: with its mocks in place no kernel runs (the weights stay put), and every column is measured."""
    pytest.importorskip("triton")
    import torch

    host_cost = pytest.importorskip("bench.host_cost")
    with host_cost.mocked_kernels():
        params = host_cost.params_for([(100,), (7, 3)])
        for p in params:
            p.grad.fill_(1.0)
        opt = host_cost.TLR(params, lr=0.1, momentum=0.9, weight_decay=5e-4, backend="triton")
        sgd = torch.optim.SGD(host_cost.params_for([(5,)]), lr=0.1, momentum=0.9, foreach=True)
        adamw = host_cost.TLRAdamW(host_cost.params_for([(6,), (2, 3)]), lr=0.1, window=2, backend="triton")
        others = sgd.param_groups[0]["params"] + adamw.param_groups[0]["params"]
        for p in others:
            p.grad.fill_(1.0)
        for _ in range(4):  # closings included
            opt.step()
            sgd.step()
            adamw.step()
    assert all(bool((p == 0).all()) for p in params + others)
    monkeypatch.setitem(host_cost.LAYOUTS, "tiny", lambda: [(64,)] * 3)
    result = host_cost.measure("tiny")
    assert set(result) == {"SGD fused", "SGD foreach", "TLR step()", "of it the launcher", "TLR, memo miss",
                           "TLR, memo cleared", "AdamW fused", "TLRAdamW step()"}
    assert all(0 < v < 1e6 for v in result.values())


def test_window_snapshot_follows_the_summed_window():
    """bench/reconstruction_precision.py: the Triton path with its window snapshot (A recovered
    at the window's end) and with A summed follow the same α on a real task, in fp32."""
    pytest.importorskip("triton")
    rp = pytest.importorskip("bench.reconstruction_precision")
    r = rp.compare(experiments.TASKS["wine"](), 3, epochs=2)
    assert r["rec"]["snapshot"] and not r["acc"]["snapshot"]  # the two representations really ran
    assert r["steps"] >= 12 and r["acc"]["alphas"][-1] != r["acc"]["alphas"][0]  # and α moved
    assert r["gap"] < 1e-4


def test_step_cost_times_every_optimizer_in_turn():
    from bench import step_cost

    ms = step_cost.measure("mlp", rounds=2, budget_s=60.0)
    assert list(ms) == list(step_cost.OPTIMIZERS)
    assert all(0 < v < 1e4 for v in ms.values())


@pytest.mark.parametrize("units", [1, 2, 16])
def test_step_cost_holds_the_default_window_at_its_length(units):
    """The benchmark's TLR columns time what they name: with noisy gradients the held window
    closes exactly once every 3·units steps, and the blow-up guard stays on."""
    import torch

    from bench import step_cost
    from tlr_triton import TLR

    torch.manual_seed(0)
    params = [torch.randn(50, 20, requires_grad=True), torch.randn(20, requires_grad=True)]
    opt = step_cost.held(TLR(params, momentum=0.9, weight_decay=5e-4), units)
    assert opt.param_groups[0]["blowup_ratio"] is not None
    closed = []
    for t in range(6 * units * 3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        if (t + 1) % 3 == 0:
            closed.append(int(opt.param_groups[0]["window_state"][0]) == 0)
    assert closed == [(i + 1) % units == 0 for i in range(len(closed))]


def test_closing_intervals_count_the_closings_of_real_runs():
    from bench import step_cost

    rows = step_cost.closing_intervals(epochs=1)
    assert len(rows) == 4
    assert all(3.0 <= interval <= 48.0 for *_, interval in rows)
    assert any(interval > 3.0 for *_, interval in rows)  # not every unit end counted as a closing
