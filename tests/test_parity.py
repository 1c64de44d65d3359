"""The PyTorch path against the float64 reference, over SPEC's whole configuration matrix."""

import itertools

import pytest
import torch

from helpers import lockstep, make_params, set_grads
from tlr_triton import TLR

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
def test_matches_reference(dtype, scope, statistic, window, mom, wd, maximize):
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
def test_param_groups_with_different_settings(dtype):
    rtol, atol = TOLERANCES[dtype]
    groups = [
        dict(lr=0.1, momentum=0.9, nesterov=True, window=2, scope="tensor"),
        dict(lr=0.01, weight_decay=1e-2, statistic="direction", momentum=0.5, dampening=0.2, window=3),
        dict(lr=1e-3, bound=1.0, maximize=True, window=1),
        dict(lr=0.0),  # α = 0 stays 0: these parameters never move
    ]
    opt, ref, params, _ = lockstep(groups, steps=10, dtype=dtype, rtol=rtol, atol=atol, momentum=0.3)
    assert float(opt.param_groups[3]["lr"]) == 0.0


def test_group_with_zero_lr_leaves_its_params_unchanged():
    moving, frozen = make_params(), make_params()
    before = [p.detach().clone() for p in frozen]
    moving_before = [p.detach().clone() for p in moving]
    opt = TLR([{"params": moving}, {"params": frozen, "lr": 0.0}], lr=0.1, momentum=0.9, weight_decay=1e-2, window=1)
    for t in range(6):
        set_grads([moving + frozen], t)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(frozen, before))
    assert all(not torch.equal(p, q) for p, q in zip(moving, moving_before) if p.numel())


def test_grads_missing_on_some_steps_and_frozen_then_unfrozen():
    # parameter 0 is frozen for steps 0-3, parameter 2 misses every third step
    def skip(t):
        return ({0} if t < 4 else set()) | ({2} if t % 3 == 0 else set())

    for scope in ("group", "tensor"):
        lockstep([{}], steps=12, skip_at=skip, lr=0.05, momentum=0.9, window=2, scope=scope, weight_decay=1e-2)


def test_long_run_alpha_trajectory():
    """60 steps, window 5: α moves through many windows and still matches."""
    opt, ref, _, _ = lockstep([{}], steps=60, lr=0.02, momentum=0.8, weight_decay=5e-4, window=5)
    assert float(opt.param_groups[0]["lr"]) != pytest.approx(0.02)


ADAPTIVE = list(itertools.product(["group", "tensor"], ["gradient", "direction"], ["plain", "momentum", "nesterov"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scope,statistic,mom", ADAPTIVE)
def test_adaptive_window_matches_reference(dtype, scope, statistic, mom):
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


def test_default_window_is_adaptive_and_matches_reference():
    """window="auto" (W0 = 3, up to 48 steps) over 90 steps."""
    opt, ref, _, _ = lockstep([{}], steps=90, lr=0.02, momentum=0.8, weight_decay=5e-4)
    assert opt.param_groups[0]["window"] == "auto"
    assert ref.param_groups[0]["units"] > 1  # the window grew at least once
