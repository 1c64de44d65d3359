"""Edge cases from RELIABILITY.md that apply to the PyTorch path."""

import itertools
import math
import re

import pytest
import torch

from helpers import assert_matches_reference, lockstep, make_params, set_grads, twin
from tlr_triton import TLR
from tlr_triton.reference import ReferenceTLR

CONFIGS = [
    dict(window=1),
    dict(window=2, momentum=0.9, weight_decay=1e-2),
    dict(window=2, momentum=0.9, nesterov=True, statistic="direction", scope="tensor", maximize=True),
    dict(window=3, momentum=0.5, dampening=0.5, scope="tensor"),
    dict(window=1, max_window=3, momentum=0.9, scope="tensor"),  # adaptive: the device decides the closings
    dict(momentum=0.9, weight_decay=1e-2),  # the default, window="auto"
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_step_never_reads_device_values(cfg, dtype, forbid_host_reads):
    params = make_params(dtype=dtype)
    opt = TLR(params, lr=torch.tensor(0.05), **cfg)
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]
    forbid_host_reads()
    for gs in grads:  # windows open and close
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    with pytest.raises(AssertionError, match="read a device value"):
        float(opt.param_groups[0]["alpha"])  # the fixture really is active


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_does_not_modify_grads(cfg):
    params = make_params()
    opt = TLR(params, **cfg)
    for t in range(5):
        grads = set_grads([params], t)
        before = [g.clone() for g in grads]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_params_without_grad_are_skipped_and_untouched():
    a, b = torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = TLR([a, b], momentum=0.9, window=1)
    before = b.detach().clone()
    for _ in range(3):
        a.grad = torch.randn(3)
        opt.step()
    assert torch.equal(b, before) and b not in opt.state
    assert set(opt.state[a]) == {"momentum_buffer", "window_sum", "prev_window_sum"}


def test_zero_size_and_zero_dim_params_between_normal_ones():
    shapes = [(3,), (0,), (), (0, 5), (4, 2), ()]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    before = [p.detach().clone() for p in params]
    opt = TLR(params, momentum=0.9, window=2, scope="tensor")
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p, q in zip(params, before):
        if p.numel():
            assert not torch.equal(p, q)  # every non-empty parameter moved
        else:
            assert p not in opt.state  # skipped on the host


def non_contiguous_params():
    base = torch.randn(10, 5, 2, dtype=torch.float64)
    sliced = base[..., 0]  # strided view: the update must land in `base`
    transposed = torch.randn(6, 4, dtype=torch.float64).t()
    channels_last = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    return base, [sliced, transposed, channels_last]


@pytest.mark.parametrize("cfg", [dict(), dict(momentum=0.9, weight_decay=1e-2), dict(scope="tensor", statistic="direction", momentum=0.9)])
def test_non_contiguous_params_match_reference_and_update_in_place(cfg):
    base, params = non_contiguous_params()
    ref_base, ref_params = non_contiguous_params()
    ref_base.copy_(base)
    for p, q in zip(params, ref_params):
        q.copy_(p)
    for p in params + ref_params:
        p.requires_grad_()
    base_before = base.clone()
    opt, ref = TLR(params, lr=0.05, window=2, **cfg), ReferenceTLR(ref_params, lr=0.05, window=2, **cfg)
    for t in range(6):
        grads = [torch.randn(p.shape, dtype=p.dtype) for p in params]
        grads[0] = grads[0].t().contiguous().t() if grads[0].dim() == 2 else grads[0]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, params, ref_params, msg=f"step {t}")
    assert not torch.equal(base[..., 0], base_before[..., 0])  # moved in the real storage
    assert torch.equal(base[..., 1], base_before[..., 1])  # and nowhere else
    assert params[2].is_contiguous(memory_format=torch.channels_last)


def test_loss_decreases_with_non_contiguous_params():
    w = torch.randn(5, 10).t().requires_grad_()  # non-contiguous leaf
    x = torch.randn(5)
    opt = TLR([w], lr=1e-3, momentum=0.9, window=2)
    first = ((w @ x) ** 2).sum().item()
    for _ in range(20):
        opt.zero_grad()
        ((w @ x) ** 2).sum().backward()
        opt.step()
    assert ((w @ x) ** 2).sum().item() < first


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_nonfinite_grads_keep_alpha_finite_and_match_reference(bad, scope):
    params = make_params()
    ref_params = twin(params)
    opt = TLR(params, lr=0.05, window=2, momentum=0.9, scope=scope)
    ref = ReferenceTLR(ref_params, lr=0.05, window=2, momentum=0.9, scope=scope)
    for t in range(8):
        grads = set_grads([params, ref_params], t)
        if t == 3:
            for ps in (params, ref_params):
                ps[0].grad.view(-1)[0] = bad
        opt.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, equal_nan=True)
        alphas = [opt.param_groups[0]["alpha"]] if scope == "group" else [opt.state[p]["alpha"] for p in params if p in opt.state]
        assert all(torch.isfinite(a) and a > 0 for a in alphas)
    assert not torch.isfinite(params[0]).all()  # the bad value propagates into the weights, as with SGD


HALF_TOL = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", [dict(), dict(momentum=0.9, weight_decay=1e-2, window=3), dict(momentum=0.9, nesterov=True, scope="tensor", statistic="direction", window=2)])
def test_half_precision_params_match_reference(dtype, cfg):
    # TLR computes in fp32 and rounds once into the parameter; the reference in fp64.
    lockstep([{}], steps=8, dtype=dtype, lr=0.05, **HALF_TOL[dtype], **cfg)


def test_mixed_dtypes_in_one_group_match_reference():
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float32, torch.float64]
    params = [torch.randn(s, dtype=d, requires_grad=True) for s, d in zip([(3, 4), (5,), (2, 2), (), (7,)], dtypes)]
    ref_params = twin(params)
    for scope, stat in itertools.product(["group", "tensor"], ["gradient", "direction"]):
        ps, qs = twin(params), twin(ref_params)
        opt = TLR(ps, lr=0.05, momentum=0.9, window=2, scope=scope, statistic=stat)
        ref = ReferenceTLR(qs, lr=0.05, momentum=0.9, window=2, scope=scope, statistic=stat)
        for t in range(6):
            set_grads([ps, qs], t)
            opt.step()
            ref.step()
            assert_matches_reference(opt, ref, ps, qs, rtol=1e-2, atol=1e-2, msg=f"{scope} {stat} step {t}")
        for p, q in zip(ps, qs):
            if p.dtype != torch.bfloat16:  # the wide ones are far tighter
                torch.testing.assert_close(p.double(), q.double(), rtol=1e-5, atol=1e-5)


def test_group_lr_set_by_hand_scales_the_trained_alpha():
    """group["lr"] is the schedule channel: TLR never writes it, and the step size is α · lr / initial_lr."""
    params = make_params()
    twins = twin(params)
    opt = TLR(params, lr=0.05, window=2)
    ref = ReferenceTLR(twins, lr=0.05, window=2)
    for t in range(6):
        if t == 3:
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.5  # by hand: ten times the start
        set_grads([params, twins], t)
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, params, twins, msg=f"step {t}")
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["initial_lr"] == 0.05
    assert float(opt.param_groups[0]["alpha"]) != pytest.approx(0.05)  # α trained on
    before = [p.detach().clone() for p in params]
    for bad, error in ((-1.0, "Invalid learning rate of group 0: -1.0"), (math.nan, "Invalid learning rate of group 0: nan"),
                       (None, "Invalid learning rate of group 0: None")):
        opt.param_groups[0]["lr"] = bad
        with pytest.raises((ValueError, TypeError), match=re.escape(error)):
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    opt.param_groups[0]["lr"] = 0.0  # a schedule may end at 0: nothing moves, α still trains
    set_grads([params], 9)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_cpu_fused_move_takes_only_tensors_above_torchs_grain(monkeypatch):
    """Where the fused C++ step cannot be built, the weights move with torch's fused SGD
    kernel, which splits even a tiny tensor over the threads (a barrier per tensor: seconds
    per step when the cores are shared). Tensors below torch's grain size take the foreach
    path instead, whose ops keep them on one thread; both agree with torch's SGD while α is
    constant."""
    from tlr_triton import functional

    monkeypatch.setattr(functional, "_cpu_extension", lambda: None)
    real = torch._fused_sgd_
    calls = []

    def recording(params, *args, **kwargs):
        calls.append(sorted(p.numel() for p in params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_sgd_", recording)
    params = [torch.randn(s, requires_grad=True) for s in (10, 40_000, 3000, 50_000)]
    other = [p.detach().clone().requires_grad_() for p in params]
    opt = TLR(params, lr=0.1, momentum=0.9, weight_decay=1e-3, window=3)  # α constant in the first window
    sgd = torch.optim.SGD(other, lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=True)
    for _ in range(2):  # the first step starts the momentum buffers
        for p, q in zip(params, other):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
    assert calls == [[40_000, 50_000], [40_000, 50_000]]
    for p, q in zip(params, other):
        torch.testing.assert_close(p, q)


def test_functional_adaptive_window_without_guard_needs_no_window_energy():
    """tlr() takes window_energy=None when the blow-up guard is off (the CPU's host-side closing too)."""
    from tlr_triton.functional import StepConfig, tlr

    config = StepConfig(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, bound=0.25,
                        statistic="gradient", scope="group", window=2, units=4, blowup_ratio=None)
    params = [torch.randn(5), torch.randn(3, 2)]
    sums, prevs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    bufs, alpha, state = [None, None], torch.tensor(0.1), torch.tensor([0, 1])
    for step in range(12):
        grads = [torch.randn_like(p) for p in params]
        tlr(params, grads, bufs, sums, prevs, [alpha], config, step=step, window_state=state)
    assert torch.isfinite(alpha) and alpha > 0 and int(state[1]) >= 1


def test_functional_refuses_a_window_energy_of_another_shape():
    """The guard keeps 4 values (two windows' ‖A‖² per unit, the last closing's Σ‖w‖², the peak α):
    a [3] tensor (an older layout) is refused by tlr() with its shape, not written past its end."""
    from tlr_triton.functional import StepConfig, tlr

    config = StepConfig(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, bound=0.25,
                        statistic="gradient", scope="group", window=3, units=16, blowup_ratio=16.0)
    params = [torch.randn(5)]
    with pytest.raises(ValueError, match=r"window_energy .*4 values.*\(3,\)"):
        tlr(params, [torch.randn(5)], [None], [torch.zeros(5)], [torch.zeros(5)], [torch.tensor(0.1)], config,
            step=0, window_state=torch.tensor([0, 1]), window_energy=torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("kept", [2, 3])
def test_state_dict_with_an_older_window_energy_loads_and_steps(kept):
    """A state_dict saved before the growth test (window_energy of 2 values) or before the decay
    test (3) loads: Σ‖w‖² at the last closing starts at 0 (no reference yet), the peak α at the
    group's α, and training continues."""
    params = [torch.randn(4, 3, requires_grad=True)]
    opt = TLR(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(7):
        params[0].grad = torch.randn(4, 3)
        opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["window_energy"] = saved["param_groups"][0]["window_energy"][:kept].clone()
    fresh = TLR(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    fresh.load_state_dict(saved)
    energy = fresh.param_groups[0]["window_energy"]
    assert energy.shape == (4,) and float(energy[3]) == float(opt.param_groups[0]["alpha"])
    assert float(energy[2]) == (0.0 if kept == 2 else float(opt.param_groups[0]["window_energy"][2]))
    torch.testing.assert_close(energy[:2], opt.param_groups[0]["window_energy"][:2])
    for _ in range(6):
        params[0].grad = torch.randn(4, 3)
        fresh.step()
    assert fresh.param_groups[0]["window_energy"].shape == (4,)


def test_repository_root_does_not_shadow_an_installed_kernels_package():
    """The top-level `kernels/` directory must not stand in for an installed distribution of
    that import name (transformers >= 5.25 imports PyPI's `kernels`): tests/conftest.py keeps
    the repository root after site-packages."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.find_spec("kernels")
    if "kernels" in importlib.metadata.packages_distributions():
        assert spec is not None and Path(spec.origin).resolve() != root / "kernels" / "__init__.py", spec.origin
    import tlr_triton.kernels  # ours, under its installed name

    assert Path(tlr_triton.kernels.__file__).resolve().parent == root / "kernels"


def test_flat_window_reductions_are_exact_where_a_plain_fp32_sum_is_not():
    """The window's ‖A‖² and ⟨A, P⟩ over a flat buffer are summed in rows and chunks, in
    float64: on 3M positive fp32 values (where one plain fp32 accumulation drifts by about
    1e-5) they agree with float64 to 1e-7, whatever the tail past the last full row."""
    from tlr_triton import functional

    g = torch.Generator().manual_seed(0)
    for n in (3_000_000 + 123, 4096, 17):
        a = torch.rand(n, generator=g) * 1e-3 + 1e-3
        b = torch.rand(n, generator=g) * 1e-3 + 1e-3
        exact_sq = float(a.double().square().sum())
        exact_dot = float((a.double() * b.double()).sum())
        assert functional._flat_square(a) == pytest.approx(exact_sq, rel=1e-7), n
        assert functional._flat_dot(a, b) == pytest.approx(exact_dot, rel=1e-7), n


def test_window_statistics_of_a_long_cpu_tensor_are_exact():
    """Per-tensor ⟨A, P⟩ and ‖A‖² (scope "tensor", the device path) and the guard's Σ‖w‖² and
    Σ⟨A, w⟩ of a long CPU tensor agree with float64 to 1e-7 (torch's own CPU reductions of 3M
    positive fp32 values drift by about 1e-5)."""
    from tlr_triton import functional

    g = torch.Generator().manual_seed(1)
    a, p, w = (torch.rand(3_000_123, generator=g) * 1e-3 + 1e-3 for _ in range(3))
    small = torch.rand(100, generator=g)
    dots, sqs = functional._dots_and_squares([a, small], [p, small])
    exact = lambda x, y: float((x.double() * y.double()).sum())  # noqa: E731
    assert float(dots[0]) == pytest.approx(exact(a, p), rel=1e-7)
    assert float(sqs[0]) == pytest.approx(exact(a, a), rel=1e-7)
    assert float(sqs[1]) == pytest.approx(exact(small, small), rel=1e-6)
    device = torch.device("cpu")
    assert float(functional._weights_total([w, small], device)) == pytest.approx(
        exact(w, w) + exact(small, small), rel=1e-7)
    assert float(functional._along_total([a], [w], device)) == pytest.approx(exact(a, w), rel=1e-7)
    half = w.to(torch.bfloat16)
    assert float(functional._weights_total([half], device)) == pytest.approx(exact(half, half), rel=1e-5)


def test_guard_weight_totals_through_the_flat_buffers_match_the_per_tensor_ones():
    """At a closing of a group with flat window buffers the guard's Σ‖w‖² and Σ⟨A, w⟩ are taken
    after copying the weights into P's buffer (free once ⟨A, P⟩ is read): the same values as one
    reduction per tensor, A untouched; fp32, bf16 and non-contiguous weights."""
    from tlr_triton import functional

    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(300, 70, generator=g), torch.randn(5, generator=g).to(torch.bfloat16),
               torch.randn(40, 30, generator=g).t(), torch.randn(100_000, generator=g)]
    n = sum(w.numel() for w in weights)
    flat_a, flat_p = torch.randn(n, generator=g), torch.randn(n, generator=g)
    split = lambda flat: [v.view(w.shape) for v, w in zip(flat.split([w.numel() for w in weights]), weights)]  # noqa: E731
    sums, prevs = split(flat_a), split(flat_p)
    a_before = flat_a.clone()
    device = torch.device("cpu")
    expect_sq = sum(float(w.double().square().sum()) for w in weights)
    expect_along = sum(float((a.double() * w.double()).sum()) for a, w in zip(sums, weights))
    sq, along = functional._flat_weights(weights, prevs, (flat_a, flat_p), True)
    assert sq == pytest.approx(expect_sq, rel=1e-7)
    scale = (sq * float(flat_a.double().square().sum())) ** 0.5  # ⟨A, w⟩ sums terms of both signs
    assert along == pytest.approx(expect_along, abs=1e-7 * scale)
    assert float(functional._weights_total(weights, device)) == pytest.approx(sq, rel=1e-6)
    assert float(functional._along_total(sums, weights, device)) == pytest.approx(along, abs=1e-6 * scale)
    assert torch.equal(flat_a, a_before)
    assert functional._flat_weights(weights, prevs, (flat_a, flat_p), False)[1] == 0.0
