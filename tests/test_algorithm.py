"""SPEC's algorithm itself: Algorithm 2 by hand, the Newton factor's properties, the baselines."""

import math

import pytest
import torch

from tlr_triton import TLR
from tlr_triton.functional import newton_factor
from tlr_triton.reference import HypergradientSGD, NaiveTLR, ReferenceTLR, next_alpha
from tlr_triton.reference import newton_factor as newton_factor_float


def test_algorithm_2_by_hand_on_a_quadratic():
    """W = 1, μ = 0, λ = 0: α_{t+1} = α_t(1 + r(⟨g_t, g_{t-1}⟩, ‖g_t‖²)), w_{t+1} = w_t - α_{t+1}·g_t."""
    h = [1.0, 0.5, 0.25]  # L(w) = ½ Σ h_i w_i²
    w_hand, alpha, g_prev, c = [1.0, -2.0, 0.5], 0.01, [0.0, 0.0, 0.0], 0.25
    w = torch.tensor(w_hand, dtype=torch.float64, requires_grad=True)
    opt = TLR([w], lr=alpha, window=1, bound=c)
    alpha = float(torch.tensor(alpha, dtype=torch.float32))  # TLR stores α in float32
    alphas_hand, alphas_tlr = [], []
    for _ in range(60):
        g = [hi * wi for hi, wi in zip(h, w_hand)]
        dot = sum(a * b for a, b in zip(g, g_prev))
        sq = sum(a * a for a in g)
        denom = max(4 * (sq - dot), dot / c)
        r = dot / denom if denom > 0 else 0.0
        alpha = float(torch.tensor(alpha * (1 + r), dtype=torch.float32))
        w_hand = [wi - alpha * gi for wi, gi in zip(w_hand, g)]
        g_prev = g
        alphas_hand.append(alpha)

        w.grad = None
        (0.5 * (torch.tensor(h, dtype=torch.float64) * w * w).sum()).backward()
        opt.step()
        alphas_tlr.append(float(opt.param_groups[0]["alpha"]))
    assert alphas_tlr == pytest.approx(alphas_hand, rel=1e-12)
    assert w.tolist() == pytest.approx(w_hand, rel=1e-12, abs=1e-15)
    assert alphas_tlr[0] == pytest.approx(0.01, rel=1e-7)  # first update: g_{-1} = 0, unchanged
    assert max(alphas_hand) > 1.0  # α really adapted: it grew 100-fold from 0.01
    assert 0.5 * sum(hi * wi * wi for hi, wi in zip(h, w_hand)) < 1e-6


# (⟨A, P⟩, ‖A‖²) pairs that can occur: ‖A‖² = 0 forces ⟨A, P⟩ = 0 (Cauchy–Schwarz).
GRID = [(d, s) for d in (-3.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.0, 10.0) for s in (0.0, 1e-3, 1.0, 4.0, 100.0) if s > 0 or d == 0]


@pytest.mark.parametrize("bound", [0.25, 1.0, 5.0])
def test_newton_factor_properties(bound):
    for dot, sq in GRID:
        f = newton_factor_float(dot, sq, bound)
        if dot > 0:
            assert 1.0 < f <= 1.0 + bound + 1e-12, (dot, sq, f)
        elif dot < 0:
            assert 0.75 < f < 1.0, (dot, sq, f)
        else:
            assert f == 1.0
    for bad in [(math.nan, 1.0), (1.0, math.nan), (math.inf, 1.0), (math.inf, math.inf), (0.0, 0.0), (-math.inf, 2.0)]:
        assert newton_factor_float(*bad, bound) == 1.0, bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_newton_factor_matches_the_readable_one(dtype):
    dots = [d for d, _ in GRID] + [math.nan, math.inf, 0.0, -math.inf]
    sqs = [s for _, s in GRID] + [1.0, 1.0, 0.0, 2.0]
    f = newton_factor(torch.tensor(dots, dtype=dtype), torch.tensor(sqs, dtype=dtype), 0.25)
    expected = torch.tensor([newton_factor_float(d, s, 0.25) for d, s in zip(dots, sqs)], dtype=dtype)
    torch.testing.assert_close(f, expected)


def test_growth_and_shrink_are_bounded_and_alpha_stays_positive():
    # aligned consecutive windows: α grows by exactly (1 + c) at most
    p = torch.zeros(4, requires_grad=True)
    opt = TLR([p], lr=0.1, window=1)
    alphas = []
    for _ in range(5):
        p.grad = torch.ones(4)
        opt.step()
        alphas.append(float(opt.param_groups[0]["alpha"]))
    assert alphas[0] == pytest.approx(0.1)  # first window: no previous sum, unchanged
    ratios = [b / a for a, b in zip(alphas, alphas[1:])]
    assert all(1.0 < r <= 1.25 + 1e-6 for r in ratios), ratios
    # opposite consecutive windows: shrinks by less than 25% each time
    q = torch.zeros(4, requires_grad=True)
    opt = TLR([q], lr=0.1, window=1)
    alphas = []
    for t in range(40):
        q.grad = torch.ones(4) * (-1) ** t
        opt.step()
        alphas.append(float(opt.param_groups[0]["alpha"]))
    ratios = [b / a for a, b in zip(alphas, alphas[1:])]
    assert all(0.75 < r < 1.0 for r in ratios), ratios
    assert alphas[-1] > 0


def test_zero_gradients_leave_alpha_and_params_unchanged():
    p = torch.randn(5, requires_grad=True)
    before = p.detach().clone()
    opt = TLR([p], lr=0.1, window=2, momentum=0.9)
    for _ in range(6):
        p.grad = torch.zeros(5)
        opt.step()
    assert torch.equal(p, before)
    assert float(opt.param_groups[0]["alpha"]) == pytest.approx(0.1)
    assert not opt.state[p]["window_sum"].any() and not opt.state[p]["prev_window_sum"].any()


def test_alpha_guards_refuse_overflow_and_underflow():
    assert next_alpha(3.0e38, 1.0, 1.0, 0.25) == 3.0e38  # α(1+c) would overflow float32: kept
    assert next_alpha(1.2e-38, -1.0, 1.0, 0.25) == 1.2e-38  # would leave the normal range: kept
    p = torch.zeros(3, requires_grad=True)
    opt = TLR([p], lr=torch.tensor(3.0e38), window=1)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    a = float(opt.param_groups[0]["alpha"])
    assert math.isfinite(a) and a > 0


def right_direction(opt_cls, maximize=False, **kw):
    torch.manual_seed(0)
    w, b = torch.randn(10, 5, requires_grad=True), torch.randn(10, requires_grad=True)
    x = torch.randn(5)
    opt = opt_cls([w, b], **kw, **({"maximize": True} if maximize else {}))

    def loss():
        return ((w @ x + b) ** 2).sum()

    first = loss().item()
    for _ in range(20):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step((lambda: (opt.zero_grad(), loss().backward(), loss())[-1]) if opt_cls is NaiveTLR else None)
    return first, loss().item()


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, window=3), dict(scope="tensor", weight_decay=1e-2)])
def test_right_direction(kw):
    first, last = right_direction(TLR, lr=1e-3, **kw)
    assert last < first
    first, last = right_direction(TLR, maximize=True, lr=1e-3, **kw)
    assert last > first


@pytest.mark.parametrize("cls,kw", [(ReferenceTLR, {}), (NaiveTLR, dict(meta_lr=1e-6)), (HypergradientSGD, dict(meta_lr=1e-6))])
def test_reference_and_baselines_reduce_the_loss(cls, kw):
    first, last = right_direction(cls, lr=1e-3, momentum=0.8, weight_decay=5e-4, **kw)
    assert last < first


def test_baselines_adapt_alpha_the_paper_way():
    # Hypergradient: α ← max(0, α + η⟨g_t, g_{t-1}⟩); with g = (1, 1) twice, α grows by 2η.
    p = torch.zeros(2, requires_grad=True)
    opt = HypergradientSGD([p], lr=0.1, meta_lr=0.01)
    p.grad = torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    p.grad = torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.12)
    # Naive GD-TLR on L = ½‖w‖² from w0: g = w0, h = (1 - α)w0, α ← α + η(1 - α)‖w0‖²
    w0 = torch.tensor([1.0, 2.0])
    w = w0.clone().requires_grad_()
    opt = NaiveTLR([w], lr=0.1, meta_lr=0.01)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    alpha = 0.1 + 0.01 * 0.9 * 5.0
    assert opt.param_groups[0]["lr"] == pytest.approx(alpha)
    torch.testing.assert_close(w.detach(), w0 - alpha * w0)


SGD_SETTINGS = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
                for m, d, n in [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)]
                for wd in (0.0, 0.1) for mx in (False, True)]


@pytest.mark.parametrize("cfg", SGD_SETTINGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_torch_sgd_while_alpha_is_constant(cfg, dtype):
    """Before its first window closes TLR is SGD with lr = α: checked against torch.optim.SGD itself,
    an implementation independent of this project (maximize negates g only, weight decay still
    pulls toward 0)."""
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in [(4, 3), (5,), ()]]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = TLR(params, lr=0.05, window=50, **cfg)
    sgd = torch.optim.SGD(twins, lr=0.05, foreach=False, **cfg)
    for _ in range(6):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
    tol = {} if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **tol)


def _sharpening_run(**kw):
    """A noisy quadratic whose curvature jumps 200-fold at step 250, once α has settled and the window grown."""
    torch.manual_seed(0)
    w = torch.randn(50, dtype=torch.float64, requires_grad=True)
    h = torch.linspace(0.5, 1.0, 50, dtype=torch.float64)
    opt = TLR([w], lr=0.05, momentum=0.9, **kw)
    losses, lengths = [], []
    for t in range(400):
        curvature = h * (200.0 if t >= 250 else 1.0)
        w.grad = curvature * w.detach() + 0.05 * torch.randn(50, dtype=torch.float64)
        losses.append(float(0.5 * (curvature * w.detach() ** 2).sum()))
        lengths.append(int(opt.param_groups[0]["window_state"][1]))
        opt.step()
    return losses, lengths


def test_blowup_guard_rescues_a_run_that_blows_up_mid_window():
    """Without the guard α stays put inside a long window while the iterates explode; with it
    the window closes within one unit of 3 steps, α is cut, and the run settles again."""
    losses, lengths = _sharpening_run()
    assert lengths[250] >= 3  # the window had grown before the jump
    assert lengths[252] == 1  # closed by the end of the unit the jump fell in (steps 249-251)
    # the unit the jump fell in still moves with the old α (the loss grows ~1000-fold), then it settles
    assert max(losses[250:]) < 1e4 * losses[250] and losses[-1] < 1e-2 * losses[250]
    off, _ = _sharpening_run(blowup_ratio=None)
    assert not max(off[250:]) < 1e10 * off[250]  # the control really blows up
