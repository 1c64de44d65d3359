"""The PyTorch path against the float64 reference, over SPEC's whole configuration matrix."""

import itertools

import pytest
import torch

from helpers import lockstep, make_params, set_grads
from tlr_triton import TLR
from tlr_triton.reference import ReferenceTLR

MOMENTA = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "dampening": dict(momentum=0.9, dampening=0.3),
}
TOLERANCES = {torch.float64: (None, None), torch.float32: (5 * 1.3e-6, 5 * 1e-5)}  # 5x default for fp32 (fusion)

MATRIX = list(
    itertools.product(
        ["group", "tensor"], ["gradient", "direction"], [1, 3], list(MOMENTA), [0.0, 1e-2], [False, True]
    )
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scope,statistic,window,mom,wd,maximize", MATRIX)
def test_matches_reference(cpu_step, dtype, scope, statistic, window, mom, wd, maximize):
    rtol, atol = TOLERANCES[dtype]
    lockstep(
        [{}],
        steps=8,
        dtype=dtype,
        rtol=rtol,
        atol=atol,
        lr=0.05,
        scope=scope,
        statistic=statistic,
        window=window,
        weight_decay=wd,
        maximize=maximize,
        **MOMENTA[mom],
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_param_groups_with_different_settings(cpu_step, dtype):
    rtol, atol = TOLERANCES[dtype]
    groups = [
        dict(lr=0.1, momentum=0.9, nesterov=True, window=2, scope="tensor"),
        dict(lr=0.01, weight_decay=1e-2, statistic="direction", momentum=0.5, dampening=0.2, window=3),
        dict(lr=1e-3, bound=1.0, maximize=True, window=1),
        dict(lr=2e-3, window=4, max_window=12),
    ]
    lockstep(groups, steps=10, dtype=dtype, rtol=rtol, atol=atol, momentum=0.3)


def test_group_whose_lr_is_set_to_zero_leaves_its_params_unchanged():
    """A schedule that reaches 0 (or lr set to 0 by hand) stops the weights; α itself cannot start at 0."""
    moving, frozen = make_params(), make_params()
    before = [p.detach().clone() for p in frozen]
    moving_before = [p.detach().clone() for p in moving]
    opt = TLR([{"params": moving}, {"params": frozen, "lr": 0.2}], lr=0.1, momentum=0.9, weight_decay=1e-2, window=1)
    opt.param_groups[1]["lr"] = 0.0
    for t in range(6):
        set_grads([moving + frozen], t)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(frozen, before))
    assert all(not torch.equal(p, q) for p, q in zip(moving, moving_before) if p.numel())


def test_grads_missing_on_some_steps_and_frozen_then_unfrozen(cpu_step):
    # parameter 0 is frozen for steps 0-3, parameter 2 misses every third step
    def skip(t):
        return ({0} if t < 4 else set()) | ({2} if t % 3 == 0 else set())

    for scope in ("group", "tensor"):
        lockstep([{}], steps=12, skip_at=skip, lr=0.05, momentum=0.9, window=2, scope=scope, weight_decay=1e-2)


def test_long_run_alpha_trajectory():
    """60 steps, window 5: α moves through many windows and still matches."""
    opt, ref, _, _ = lockstep([{}], steps=60, lr=0.02, momentum=0.8, weight_decay=5e-4, window=5)
    assert float(opt.param_groups[0]["alpha"]) != pytest.approx(0.02)


ADAPTIVE = list(itertools.product(["group", "tensor"], ["gradient", "direction"], ["plain", "momentum", "nesterov"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scope,statistic,mom", ADAPTIVE)
def test_adaptive_window_matches_reference(cpu_step, dtype, scope, statistic, mom):
    """Windows of k units (1..4 units of 2 steps): lengths, closings and α agree with the reference."""
    rtol, atol = TOLERANCES[dtype]
    lengths = []
    # noise (small Newton steps: the window grows), then 8 steps along one direction
    # (consecutive windows agree: a large step, the window is short again), then noise
    lockstep([{}], steps=40, dtype=dtype, rtol=rtol, atol=atol, lr=0.05, scope=scope, statistic=statistic,
             window=2, max_window=8, window_reset=0.1, weight_decay=1e-2, signal_at=lambda t: 3.0 * (24 <= t < 32),
             after_step=lambda opt, ref: lengths.append(int(opt.param_groups[0]["window_state"][1])), **MOMENTA[mom])
    # the run must exercise both rules: growth over several units, and a reset after it grew
    assert max(lengths) >= 3, lengths
    assert any(a > 1 and b == 1 for a, b in zip(lengths, lengths[1:])), lengths


def test_default_window_is_adaptive_and_matches_reference(cpu_step):
    """window="auto" (W0 = 3, up to 48 steps) over 90 steps."""
    opt, ref, _, _ = lockstep([{}], steps=90, lr=0.02, momentum=0.8, weight_decay=5e-4)
    assert opt.param_groups[0]["window"] == "auto"
    assert ref.param_groups[0]["units"] > 1  # the window grew at least once


def _blowup_run(lr=0.05, **cfg):
    """Noise until the window has grown, then gradients 30 times larger inside it (a blow-up's signature)."""
    log = []

    def record(opt, ref):
        g = opt.param_groups[0]
        log.append((int(g["step"]), [int(x) for x in g["window_state"]], float(g["alpha"])))

    lockstep([{}], steps=60, lr=lr, window=2, max_window=16, window_reset=0.1, scale_at=lambda t: 30.0 if t >= 41 else 1.0,
             after_step=record, **cfg)
    return log


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(scope="tensor", statistic="direction", momentum=0.5),
                                 dict(momentum=0.9, nesterov=True, weight_decay=1e-2)])
def test_blowup_guard_closes_the_window_within_one_unit_and_cuts_alpha(path, cfg, monkeypatch):
    """The step after the jump's first unit ends, the window is closed (k = 1) and α is at most
    1/(1 + √16) = 0.2 of itself; the reference agrees at every step, on the CPU's host-decided path
    and on the GPU's device-masked one."""
    log = _blowup_run(**cfg)
    before = [entry for entry in log if entry[0] <= 41]
    assert max(k for _, (_, k), _ in before) >= 3  # the window had grown ...
    step, (done, k), alpha = next(entry for entry in log if entry[0] == 42)  # ... the unit ending at step 42 (t = 41)
    assert (done, k) == (0, 1)  # closed early, short again
    if cfg.get("scope", "group") == "group":
        assert alpha <= 0.2 * before[-1][2]


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(scope="tensor", momentum=0.9)])
def test_blowup_guard_ignores_a_jump_under_steps_too_small_to_move_the_weights(path, cfg, monkeypatch):
    """The same 30-fold jump with α = 1e-6: α·‖A‖ per unit is far below MOVE_FLOOR·‖w‖, so the
    guard does not trip (the window stays open, α is not cut: a gradient spike under a tiny α
    used to cut it again and again, towards 1e-37); both paths agree with the reference at every
    step. With MOVE_FLOOR = 0 the same run trips at the end of the jump's first unit."""
    from tlr_triton import functional, reference

    log = _blowup_run(lr=1e-6, **cfg)
    before = log[40][2]
    step, (done, k), alpha = log[41]  # after the step that ends the jump's first unit
    assert (done, k) != (0, 1) and k >= 3  # the window is still open and long
    if cfg.get("scope", "group") == "group":
        assert alpha >= 0.75 * before  # no cut: at most the Newton step's shrink
    monkeypatch.setattr(functional, "MOVE_FLOOR", 0.0)
    monkeypatch.setattr(reference, "MOVE_FLOOR", 0.0)
    tripped = _blowup_run(lr=1e-6, **cfg)
    assert tripped[41][1] == [0, 1]


def _growth_run(**cfg):
    """A quadratic beyond heavy-ball's stability (gradients 45·w + noise, α0 = 0.05, μ = 0.9):
    the iterates are thrown outward a few-fold per window, too slowly for the ‖A‖² test.
    Returns the smallest α after each step (scope "tensor": of the tensors' α)."""
    alphas = []

    def record(opt, ref):
        per_tensor = [float(st["alpha"]) for st in opt.state.values() if "alpha" in st]
        alphas.append(min(per_tensor or [float(opt.param_groups[0]["alpha"])]))

    torch.manual_seed(0)  # the same weights and noise for every run
    lockstep([{}], steps=40, lr=0.05, window=2, max_window=16, window_reset=0.1, curvature=45.0,
             scale_at=lambda t: 0.3, after_step=record, **cfg)
    return alphas


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(momentum=0.9, scope="tensor"),
                                 dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
                                 dict(momentum=0.9, blowup_ratio=1e6)])
def test_blowup_guard_growth_test_matches_reference(path, cfg, monkeypatch):
    """The guard's growth test (⟨A, P⟩ < 0, ‖A‖² per unit rising, Σ‖w‖² more than doubled since
    the last closing) trips in these runs, and both paths agree with the reference at every
    step; with the test turned off (GROWTH = inf in the reference and the PyTorch path) α
    differs. With the ‖A‖² test out of reach (ratio 1e6) the growth test alone cuts α."""
    from tlr_triton import functional, reference

    with_test = _growth_run(**cfg)
    monkeypatch.setattr(functional, "GROWTH", float("inf"))
    monkeypatch.setattr(reference, "GROWTH", float("inf"))
    without = _growth_run(**cfg)
    assert with_test != without  # the growth test tripped
    if cfg.get("blowup_ratio") == 1e6:
        first = next(t for t, (a, b) in enumerate(zip(with_test, without)) if a != b)
        assert with_test[first] <= with_test[first - 1] / (1 + 2 ** 0.5)  # cut by at least 1/(1 + √GROWTH)


def _decay_run(**cfg):
    """20 steps of a consistent gradient (α grows), then a silent data term: the gradients
    shrink to 1e-7 and the window sums are weight decay's pull alone (λ = 0.1), along the
    weights. Returns the largest α after each step (scope "tensor": of the tensors' α)."""
    alphas = []

    def record(opt, ref):
        per_tensor = [float(st["alpha"]) for st in opt.state.values() if "alpha" in st]
        alphas.append(max(per_tensor or [float(opt.param_groups[0]["alpha"])]))

    torch.manual_seed(0)
    lockstep([{}], steps=60, lr=0.01, weight_decay=0.1, window=2, max_window=16, window_reset=0.1,
             scale_at=lambda t: 1.0 if t < 20 else 1e-7, signal_at=lambda t: 1.0 if t < 20 else 0.0,
             after_step=record, **cfg)
    return alphas


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(momentum=0.9, scope="tensor"),
                                 dict(momentum=0.9, nesterov=True)])
def test_blowup_guard_decay_test_matches_reference(path, cfg, monkeypatch):
    """The guard's decay test: once the windows are weight decay alone (‖A - λ·n·w‖ <= DECAY_SHARE·‖A‖),
    no α grows past the largest α that a window with a live data term moved with; both paths agree
    with the reference at every step. With the test turned off (DECAY_SHARE = 0: the weights move
    within a window, so A is never exactly λ·n·w) the Newton step keeps raising α on the decay's
    pull alone."""
    from tlr_triton import functional, reference

    with_test = _decay_run(**cfg)
    peak = max(with_test[:24])  # the data term's windows (the last one closes by step 24)
    assert peak > 0.02  # α grew while the data term was live
    assert max(with_test[24:]) <= peak
    monkeypatch.setattr(functional, "DECAY_SHARE", 0.0)
    monkeypatch.setattr(reference, "DECAY_SHARE", 0.0)
    without = _decay_run(**cfg)
    assert max(without[24:]) > 3 * peak


def test_blowup_guard_reads_nothing_on_the_host(forbid_host_reads):
    params = make_params()
    opt = TLR(params, lr=0.05, momentum=0.9, window=2, max_window=16, window_reset=0.1)
    forbid_host_reads()
    for t in range(60):
        set_grads([params], t, scale=30.0 if t >= 41 else 1.0)
        opt.step()


def test_blowup_guard_off_keeps_the_window_open():
    log = _blowup_run(blowup_ratio=None, momentum=0.9)
    _, k = log[41][1]  # after the same unit: the window is as long as the noise made it
    assert k >= 3


def test_a_max_window_lowered_for_a_while_does_not_shorten_the_window_for_good(path):
    """max_window lowered for two steps early in a long window, then restored: the window keeps
    its length k (the device-masked path stored k clamped to the lowered maximum: a review of
    TLRAdamW's copy of the rule found it). α and the window state as the reference's."""
    def run(opt_cls, lowered_at=None, states=None):
        torch.manual_seed(0)
        params = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True), torch.randn(7, dtype=torch.float64,
                                                                                         requires_grad=True)]
        opt = opt_cls(params, lr=0.01, momentum=0.8, weight_decay=5e-4, blowup_ratio=None)
        gen = torch.Generator().manual_seed(3)
        for i in range(120):
            opt.param_groups[0]["max_window"] = 12 if lowered_at is not None and lowered_at <= i < lowered_at + 2 else None
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
            if states is not None:
                g = opt.param_groups[0]
                states.append([g["units_done"], g["units"]] if "units" in g else g["window_state"].tolist())
        return opt

    found = []
    run(ReferenceTLR, states=found)
    # a unit's end at which the window has more than 4 units and is at most 2 units in
    at = next(i for i, (done, k) in enumerate(found) if (i + 1) % 3 == 0 and k > 4 and 1 <= done <= 2)
    ref_states, states = [], []
    ref = run(ReferenceTLR, at, ref_states)
    opt = run(TLR, at, states)
    assert states == ref_states
    assert float(opt.param_groups[0]["alpha"]) == pytest.approx(ref.param_groups[0]["alpha"], rel=1e-6)
