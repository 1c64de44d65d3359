"""TLR for AdamW (docs/adamw.md): the float64 reference, ``ReferenceTLRAdamW``.

- with Adam's preconditioner replaced by 1 and β1 = 0 it is SPEC (``ReferenceTLR``), exactly;
- before its first closing it is ``torch.optim.AdamW``;
- on pure-noise gradients its statistic shows no momentum bias, where summing the
  directions taken does (SPEC's "direction" lesson, for Adam).
"""

import math

import pytest
import torch

from tlr_triton.reference import ReferenceTLR, ReferenceTLRAdamW


class _NoPreconditioner(ReferenceTLRAdamW):
    def _preconditioner(self, vhat, eps):
        return torch.ones_like(vhat)


def _params(seed, shapes=((4, 3), (5,), (2, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _run(opt, params, grads):
    for step in grads:
        for p, grad in zip(params, step):
            p.grad = grad.clone()
        opt.step()


@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_without_preconditioner_and_momentum_it_is_spec(scope, maximize, weight_decay):
    init = _params(0)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) * (1 + i % 3) for p in init] for i in range(24)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    ours = _NoPreconditioner(a, lr=0.05, betas=(0.0, 0.999), weight_decay=weight_decay, window=2, scope=scope,
                             maximize=maximize)
    spec = ReferenceTLR(b, lr=0.05, momentum=0.0, weight_decay=weight_decay, window=2, scope=scope, maximize=maximize)
    alphas = []
    for step in grads:
        for p, q, grad in zip(a, b, step):
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        spec.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
        if scope == "group":
            assert ours.param_groups[0]["alpha"] == spec.param_groups[0]["alpha"]
            alphas.append(ours.param_groups[0]["alpha"])
        else:
            for p, q in zip(a, b):
                assert ours.state[p]["alpha"] == spec.state[q]["alpha"]
            alphas.append(ours.state[a[0]]["alpha"])
    assert len(set(alphas)) > 3  # α was trained, not left alone


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_before_its_first_closing_it_is_adamw(amsgrad, maximize):
    init = _params(2)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in init] for _ in range(9)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    lr = 2.0 ** -7  # a float32 number: α is stored in float32
    ours = ReferenceTLRAdamW(a, lr=lr, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad,
                             maximize=maximize, window=10)
    adamw = torch.optim.AdamW(b, lr=lr, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad,
                              maximize=maximize, foreach=False)
    _run(ours, a, grads)
    _run(adamw, b, grads)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert ours.param_groups[0]["alpha"] == lr


def test_a_closing_applies_specs_newton_step_to_the_statistic():
    """One tensor, windows of 1 step, β1 = 0: α's factor is 1 + r(⟨R_t, R_{t−1}⟩, ‖R_t‖²) with
    R_t = √p·g + λ·w/√p, p = 1/(√v̂ + ε), computed here by hand."""
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g1 = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    g2 = torch.tensor([0.2, -0.3, -0.1], dtype=torch.float64)
    lam, eps, b2, lr = 0.1, 1e-8, 0.9, 2.0 ** -5  # lr a float32 number: α is stored in float32
    w = w0.clone().requires_grad_()
    opt = ReferenceTLRAdamW([w], lr=lr, betas=(0.0, b2), eps=eps, weight_decay=lam, window=1)
    v1 = (1 - b2) * g1 * g1
    p1 = 1 / ((v1 / (1 - b2)).sqrt() + eps)
    r1 = p1.sqrt() * g1 + lam * w0 / p1.sqrt()
    w.grad = g1.clone()
    opt.step()  # first closing: no previous window, α unchanged
    assert opt.param_groups[0]["alpha"] == pytest.approx(lr, rel=1e-7)
    w1 = w0 - lr * (p1 * g1 + lam * w0)
    torch.testing.assert_close(w.detach(), w1, rtol=1e-12, atol=0)
    v2 = b2 * v1 + (1 - b2) * g2 * g2
    p2 = 1 / ((v2 / (1 - b2 ** 2)).sqrt() + eps)
    r2 = p2.sqrt() * g2 + lam * w1 / p2.sqrt()
    dot, sq = float(r2 @ r1), float(r2 @ r2)
    r = dot / max(4 * (sq - dot), dot / 0.25) if max(4 * (sq - dot), dot / 0.25) > 0 else 0.0
    w.grad = g2.clone()
    opt.step()
    alpha = opt.param_groups[0]["alpha"]
    assert alpha == pytest.approx(lr * (1 + r), rel=1e-6) and alpha != pytest.approx(lr, rel=1e-3)
    torch.testing.assert_close(w.detach(), w1 - alpha * (p2 * g2 + lam * w1), rtol=1e-12, atol=0)


def _noise_factors(statistic, windows=400, window=5, n=2000, seed=0):
    """r = α_new/α_old − 1 at each closing, for i.i.d. Gaussian gradients (nothing to learn)."""
    torch.manual_seed(seed)
    w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = ReferenceTLRAdamW([w], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, window=window, statistic=statistic)
    rs = []
    for step in range(windows * window):
        w.grad = torch.randn(n, dtype=torch.float64)
        before = opt.param_groups[0]["alpha"]
        opt.step()
        if (step + 1) % window == 0 and step >= 2 * window:  # closings with a previous window
            rs.append(opt.param_groups[0]["alpha"] / before - 1)
    return torch.tensor(rs, dtype=torch.float64)


def test_noise_gives_no_momentum_bias():
    """docs/adamw.md: R pairs fresh gradients with the last window's, so on noise E[r] = 0; the
    directions taken share Adam's momentum tail across windows, so their pairing grows α."""
    grad, direction = _noise_factors("gradient"), _noise_factors("direction")
    stderr = float(grad.std()) / math.sqrt(len(grad))
    assert abs(float(grad.mean())) < 4 * stderr, (float(grad.mean()), stderr)
    assert float(direction.mean()) > float(grad.mean()) + 10 * stderr, (float(direction.mean()), float(grad.mean()))
    assert float(direction.mean()) > 0.02


def test_bad_arguments_name_the_value():
    w = torch.zeros(3, requires_grad=True)
    for kwargs, name in ((dict(window="auto"), "window"), (dict(betas=(1.0, 0.9)), "betas"), (dict(eps=-1.0), "eps"),
                         (dict(statistic="u"), "statistic"), (dict(lr=0.0), "lr")):
        with pytest.raises(ValueError, match=name):
            ReferenceTLRAdamW([w], **kwargs)
