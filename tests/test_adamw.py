"""TLR for AdamW (docs/adamw.md): the float64 reference, ``ReferenceTLRAdamW``.

- with Adam's preconditioner replaced by 1 and β1 = 0 it is SPEC (``ReferenceTLR``), exactly;
- before its first closing it is ``torch.optim.AdamW``;
- on pure-noise gradients its statistic shows no momentum bias, where summing the
  directions taken does (SPEC's "direction" lesson, for Adam).
"""

import copy
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
                             maximize=maximize, bound=0.25)  # SPEC's c (TLRAdamW's default is 0.5)
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
    c = opt.param_groups[0]["bound"]
    r = dot / max(4 * (sq - dot), dot / c) if max(4 * (sq - dot), dot / c) > 0 else 0.0
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
    for kwargs, name in ((dict(window="adaptive"), "window"), (dict(betas=(1.0, 0.9)), "betas"), (dict(eps=-1.0), "eps"),
                         (dict(statistic="u"), "statistic"), (dict(lr=0.0), "lr")):
        with pytest.raises((ValueError, TypeError), match=name):
            ReferenceTLRAdamW([w], **kwargs)


# ----------------------------------------------------------------------------- TLRAdamW, the PyTorch path

from tlr_triton import TLRAdamW  # noqa: E402


def _pair(dtype, seed=4, shapes=((6, 5), (7,), (3, 2, 2))):
    init = _params(seed, shapes)
    return [p.to(dtype, copy=True).requires_grad_() for p in init], [p.clone().requires_grad_() for p in init]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("config", [
    dict(window=1), dict(window=3, scope="tensor"), dict(window=2, maximize=True, weight_decay=0.0),
    dict(window=3, amsgrad=True, betas=(0.8, 0.95)), dict(window=2, weight_decay=0.1, eps=1e-6),
])
def test_the_pytorch_path_follows_the_reference(dtype, rtol, config):
    ours, ref = _pair(dtype)
    opt = TLRAdamW(ours, lr=2.0 ** -8, **config)
    reference = ReferenceTLRAdamW(ref, lr=2.0 ** -8, **config)
    g = torch.Generator().manual_seed(5)
    alphas = set()
    for i in range(24):
        for p, q in zip(ours, ref):
            grad = torch.randn(q.shape, generator=g, dtype=torch.float64) * (1 + i % 4)
            p.grad, q.grad = grad.to(dtype), grad.to(dtype).double()
        opt.step()
        reference.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach().double(), q.detach(), rtol=rtol, atol=rtol)
        for k, (p, q) in enumerate(zip(ours, ref)):
            ra = reference.state[q]["alpha"] if config.get("scope") == "tensor" else reference.param_groups[0]["alpha"]
            oa = opt.state[p]["alpha"] if config.get("scope") == "tensor" else opt.param_groups[0]["alpha"]
            assert float(oa) == pytest.approx(ra, rel=max(rtol, 1e-7)), (i, k)
        alphas.add(float(opt.param_groups[0]["alpha"]) if config.get("scope") != "tensor" else float(opt.state[ours[0]]["alpha"]))
    assert len(alphas) > 3


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("config", [dict(window="auto"), dict(window="auto", scope="tensor", amsgrad=True),
                                    dict(window=2, max_window=8, window_reset=0.1, maximize=True)])
def test_the_adaptive_window_follows_the_reference(dtype, rtol, config):
    """TLR's adaptive window for TLRAdamW, decided on the device: windows grow while the Newton
    step is small (noise) and fall back to one unit after a large one (a signal from step 40 to
    52), with α and the weights the reference's after every step."""
    ours, ref = _pair(dtype)
    opt = TLRAdamW(ours, lr=2.0 ** -8, **config)
    reference = ReferenceTLRAdamW(ref, lr=2.0 ** -8, **config)
    g = torch.Generator().manual_seed(5)
    lengths = []
    for i in range(90):
        for p, q in zip(ours, ref):
            grad = torch.randn(q.shape, generator=g, dtype=torch.float64) + (3.0 if 40 <= i < 52 else 0.0)
            p.grad, q.grad = grad.to(dtype), grad.to(dtype).double()
        opt.step()
        reference.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach().double(), q.detach(), rtol=rtol, atol=rtol, msg=f"step {i}")
        scoped = config.get("scope") == "tensor"
        for p, q in zip(ours, ref):
            ra = reference.state[q]["alpha"] if scoped else reference.param_groups[0]["alpha"]
            oa = opt.state[p]["alpha"] if scoped else opt.param_groups[0]["alpha"]
            assert float(oa) == pytest.approx(ra, rel=max(rtol, 1e-7)), i
        state = opt.param_groups[0]["window_state"].tolist()
        assert state == [reference.param_groups[0]["units_done"], reference.param_groups[0]["units"]], i
        lengths.append(state[1])
    assert max(lengths) >= 3 and any(a > 1 and b == 1 for a, b in zip(lengths, lengths[1:])), lengths


@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_the_blowup_guard_closes_the_window_at_a_jump_and_cuts_alpha(scope):
    """A gradient spike (×100 for two steps) in a window of 5 units: ‖R‖² per unit jumps past
    blowup_ratio times the last windows', so the window closes at once (before its k units) with
    α's factor at most 1/(1 + √jump), as the reference does, step by step; without the guard
    (blowup_ratio=None) the window runs its course and α stays higher."""
    ours, ref = _pair(torch.float64)
    quiet_params = [p.detach().clone().requires_grad_() for p in ours]
    opt, reference = TLRAdamW(ours, lr=2.0 ** -8, scope=scope), ReferenceTLRAdamW(ref, lr=2.0 ** -8, scope=scope)
    quiet = TLRAdamW(quiet_params, lr=2.0 ** -8, scope=scope, blowup_ratio=None)
    g = torch.Generator().manual_seed(5)
    states, quiet_states = [], []
    for i in range(66):
        for p, q, r in zip(ours, ref, quiet_params):
            q.grad = torch.randn(q.shape, generator=g, dtype=torch.float64) * (100.0 if i in (33, 34) else 1.0)
            p.grad, r.grad = q.grad.clone(), q.grad.clone()
        for o in (opt, reference, quiet):
            o.step()
        state = opt.param_groups[0]["window_state"].tolist()
        assert state == [reference.param_groups[0]["units_done"], reference.param_groups[0]["units"]], i
        holder = (lambda o, p: o.state[p]) if scope == "tensor" else (lambda o, p: o.param_groups[0])
        for p, q in zip(ours, ref):
            assert float(holder(opt, p)["alpha"]) == pytest.approx(holder(reference, q)["alpha"], rel=1e-7), i
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-10)
        states.append(state)
        quiet_states.append(quiet.param_groups[0]["window_state"].tolist())
    early = [i for i in range(1, 66) if states[i] == [0, 1] and states[i - 1][0] + 1 < states[i - 1][1]]
    assert early and 33 <= early[0] <= 36, (early, states[30:40])
    assert states[:early[0]] == quiet_states[:early[0]] and quiet_states[early[0]] != [0, 1]
    assert float(holder(opt, ours[0])["alpha"]) < 0.5 * float(holder(quiet, quiet_params[0])["alpha"])
    assert opt.param_groups[0]["window_energy"].tolist() == pytest.approx(reference.param_groups[0]["energy"], rel=1e-9)


def test_window_settings_changed_mid_run_follow_the_reference():
    """window "auto" → 3 → "auto", and max_window lowered for a few steps then restored: the
    window state and α as the reference's at every step (a review found the window state kept
    from before a fixed stretch, and k clamped for good by a lowered max_window)."""
    ours, ref = _pair(torch.float64)
    opt, reference = TLRAdamW(ours, lr=2.0 ** -8), ReferenceTLRAdamW(ref, lr=2.0 ** -8)
    g = torch.Generator().manual_seed(7)
    lowered = []
    for i in range(110):
        for group in (opt.param_groups[0], reference.param_groups[0]):
            group["window"] = 3 if 15 <= i < 33 else "auto"
            group["max_window"] = 12 if 80 <= i < 82 else None  # 4 units, early in a window of 6
        for p, q in zip(ours, ref):
            q.grad = torch.randn(q.shape, generator=g, dtype=torch.float64)
            p.grad = q.grad.clone()
        opt.step()
        reference.step()
        state = opt.param_groups[0]["window_state"].tolist()
        assert state == [reference.param_groups[0]["units_done"], reference.param_groups[0]["units"]], i
        assert float(opt.param_groups[0]["alpha"]) == pytest.approx(reference.param_groups[0]["alpha"], rel=1e-7), i
        if 80 <= i < 82:
            lowered.append(state)
    assert lowered == [[1, 6], [1, 6]], lowered  # k beyond the lowered max_window's 4 units, kept


def test_the_triton_path_takes_fixed_windows_only():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="backend='triton' takes a fixed window .* window='auto'"):
        TLRAdamW([w], window="auto", backend="triton")
    opt = TLRAdamW([w], window="auto", backend="auto")  # resolves to the PyTorch path
    w.grad = torch.ones(3)
    opt.step()


@pytest.mark.parametrize("window", [2, "auto"])
def test_step_reads_nothing_on_the_host(forbid_host_reads, window):
    params = [torch.randn(20, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    opt = TLRAdamW(params, lr=1e-3, window=window)
    forbid_host_reads()
    for _ in range(13):  # closings included
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope,window", [("group", 3), ("tensor", 3), ("group", "auto")])
def test_a_checkpoint_resumes_bit_identically(dtype, scope, window):
    import io

    torch.manual_seed(0)
    init = [torch.randn(8, 3).to(dtype), torch.randn(5).to(dtype)]
    grads = [[torch.randn(t.shape).to(dtype) for t in init] for _ in range(30)]

    def run(params, opt, first, last):
        for i in range(first, last):
            for p, grad in zip(params, grads[i]):
                p.grad = grad.clone()
            opt.step()

    a = [t.clone().requires_grad_() for t in init]
    opt = TLRAdamW(a, lr=1e-2, window=window, scope=scope)
    run(a, opt, 0, 7)  # mid-window: the window sums (and the adaptive window's state) travel
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    b = [p.detach().clone().requires_grad_() for p in a]
    run(a, opt, 7, 30)
    buf.seek(0)
    resumed = TLRAdamW(b, lr=1e-2, window=window, scope=scope)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.state[b[0]]["exp_avg"].dtype == torch.float32  # not rounded to bf16 by torch's loader
    run(b, resumed, 7, 30)
    assert torch.equal(opt.param_groups[0]["window_state"], resumed.param_groups[0]["window_state"])
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert torch.equal(opt.param_groups[0]["alpha"], resumed.param_groups[0]["alpha"])
    if scope == "tensor":
        for p, q in zip(a, b):
            assert torch.equal(opt.state[p]["alpha"], resumed.state[q]["alpha"])


@pytest.mark.parametrize("key, value", [("blowup_ratio", 0.5), ("bound", -1.0), ("betas", (0.9, 1.5)), ("window", 0),
                                        ("scope", "layer"), ("eps", float("nan")), ("max_window", 1)])
def test_hyperparameters_set_by_hand_are_checked_before_any_group_steps(key, value):
    """A group edited between steps with a bad value: a ValueError naming the group and the value,
    and no group stepped (group 0 before it neither)."""
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = TLRAdamW([{"params": [a]}, {"params": [b]}], lr=1e-2)
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    weights = (a.detach().clone(), b.detach().clone())
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=rf"group 1: Invalid {key}"):
        opt.step()
    assert torch.equal(a, weights[0]) and torch.equal(b, weights[1])
    assert opt.param_groups[0]["step"] == 1 and opt.state[a]["step"] == 1


def test_a_checkpoint_from_before_the_guard_resumes_without_it():
    """A state_dict saved before ``blowup_ratio`` and ``window_energy`` existed (its groups lack both):
    it loads, resumes without the guard (as it ran) and with empty references."""
    w = torch.randn(6, requires_grad=True)
    opt = TLRAdamW([w], lr=1e-2)
    for _ in range(4):
        w.grad = torch.randn(6)
        opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["blowup_ratio"], group["window_energy"]
    resumed = TLRAdamW([w], lr=1e-2)
    resumed.load_state_dict(saved)
    group = resumed.param_groups[0]
    assert group["blowup_ratio"] is None and group["window_energy"].tolist() == [0.0, 0.0]
    assert group["window_energy"].dtype == torch.float64
    for _ in range(6):
        w.grad = torch.randn(6)
        resumed.step()
    assert torch.isfinite(w).all()


def test_amsgrad_turned_on_mid_run_follows_the_reference():
    """amsgrad switched on between steps: the running max of v starts at v (before, a KeyError
    half-way through the step), as in the reference."""
    ours, ref = _pair(torch.float64)
    opt, reference = TLRAdamW(ours, lr=2.0 ** -8, window=2), ReferenceTLRAdamW(ref, lr=2.0 ** -8, window=2)
    g = torch.Generator().manual_seed(3)
    for i in range(10):
        if i == 4:
            for o in (opt, reference):
                o.param_groups[0]["amsgrad"] = True
        for p, q in zip(ours, ref):
            q.grad = torch.randn(q.shape, generator=g, dtype=torch.float64) * (3.0 if i == 6 else 1.0)
            p.grad = q.grad.clone()
        opt.step()
        reference.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-10)
    assert all("max_exp_avg_sq" in opt.state[p] for p in ours)


def test_an_optimizer_pickled_before_the_guard_unpickles_with_defaults():
    """An object pickled before ``blowup_ratio``/``window_energy`` existed: unpickled, it steps (the
    guard off, as it ran)."""
    import pickle

    w = torch.randn(6, requires_grad=True)
    opt = TLRAdamW([w], lr=1e-2)
    state = opt.__getstate__()
    for group in state["param_groups"]:
        del group["blowup_ratio"], group["window_energy"]
    old = TLRAdamW.__new__(TLRAdamW)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert old.param_groups[0]["blowup_ratio"] is None
    for _ in range(7):
        old.param_groups[0]["params"][0].grad = torch.randn(6)
        old.step()


def test_bad_input_is_refused_by_name_and_changes_nothing():
    w = torch.zeros(3, requires_grad=True)
    for kwargs, name in ((dict(lr=0.0), "learning rate"), (dict(lr=-1.0), "learning rate"),
                         (dict(betas=(0.9, 1.0)), "beta parameter at index 1"), (dict(eps=float("nan")), "epsilon"),
                         (dict(window=0), "window"), (dict(window="adaptive"), "window"), (dict(scope="layer"), "scope"),
                         (dict(window=3, max_window=2), "max_window"), (dict(window_reset=-1.0), "window_reset"),
                         (dict(bound=-1.0), "bound"), (dict(weight_decay=-0.1), "weight_decay"),
                         (dict(blowup_ratio=1.0), "blowup_ratio"), (dict(blowup_ratio=float("nan")), "blowup_ratio")):
        with pytest.raises((ValueError, TypeError), match=name):
            TLRAdamW([w], **kwargs)
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True, dtype=torch.float64)
    opt = TLRAdamW([{"params": [a]}, {"params": [b]}], lr=1e-2)
    a.grad, b.grad = torch.ones(3), torch.ones(2, dtype=torch.float64).to_sparse()  # group 1: a sparse gradient
    with pytest.raises(RuntimeError, match="sparse gradients .group 1"):
        opt.step()
    assert torch.equal(a, torch.ones(3)) and not opt.state  # group 0 untouched too


def test_parameters_without_gradients_are_left_alone_and_a_schedule_scales_the_step():
    a, b = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    ref_a = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = TLRAdamW([a, b], lr=2.0 ** -6, window=2)
    ref = ReferenceTLRAdamW([ref_a], lr=2.0 ** -6, window=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(9):
        grad = torch.randn(4, generator=g)
        a.grad, ref_a.grad = grad.clone(), grad.double()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    assert torch.equal(b, torch.ones(4)) and b not in opt.state
    torch.testing.assert_close(a.detach().double(), ref_a.detach(), rtol=2e-5, atol=2e-6)
    assert float(opt.param_groups[0]["alpha"]) == pytest.approx(ref.param_groups[0]["alpha"], rel=2e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 ** -6 / 8)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_like_the_original(how):
    import copy
    import pickle

    torch.manual_seed(1)
    params = [torch.randn(6, requires_grad=True)]
    opt = TLRAdamW(params, lr=1e-2, window=2)
    for _ in range(3):
        params[0].grad = torch.randn(6)
        opt.step()
    dup = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin = dup.param_groups[0]["params"]
    for _ in range(5):
        grad = torch.randn(6)
        params[0].grad, twin[0].grad = grad.clone(), grad.clone()
        opt.step()
        dup.step()
    assert torch.equal(params[0], twin[0]) and torch.equal(opt.param_groups[0]["alpha"], dup.param_groups[0]["alpha"])


def test_refused_groups_and_foreign_checkpoints_leave_the_optimizer_working():
    w, x = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = TLRAdamW([w], lr=1e-2)
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [x], "lr": -1.0})
    assert len(opt.param_groups) == 1
    adamw = torch.optim.AdamW([torch.ones(3, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError, match="not a TLRAdamW state_dict.*'alpha'"):
        opt.load_state_dict(adamw.state_dict())
    w.grad = torch.ones(3)
    opt.step()  # still steps
    assert not torch.equal(w, torch.ones(3))


def test_a_scheduler_scales_a_tensor_lr_too():
    """A tensor lr is updated in place by schedulers: the step must follow lr / initial_lr."""
    a = torch.ones(4, requires_grad=True)
    b = torch.ones(4, requires_grad=True)
    opt = TLRAdamW([a], lr=torch.tensor(2.0 ** -6), window=100)
    plain = TLRAdamW([b], lr=2.0 ** -6, window=100)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    plain_sched = torch.optim.lr_scheduler.StepLR(plain, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grad = torch.randn(4, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        plain.step()
        sched.step()
        plain_sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(2.0 ** -10)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_copy_of_a_sharded_tlradamw_refuses_to_step_until_given_its_group():
    """A process group is not copied: a deepcopy knows there was one and refuses to step alone
    (its α would follow this rank's shard only) until ``shard_group`` is set again."""
    w = torch.ones(3, requires_grad=True)
    opt = TLRAdamW([w], lr=0.1, shard_group="a process group")  # never reached: no step on the original
    dup = copy.deepcopy(opt)
    assert dup.shard_group is None
    twin_w = dup.param_groups[0]["params"][0]
    twin_w.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="shard_group"):
        dup.step()
    assert torch.equal(twin_w, torch.ones(3))
    dup.shard_group = None  # this process alone, knowingly
    dup.step()
    assert not torch.equal(twin_w, torch.ones(3))
    plain = copy.deepcopy(TLRAdamW([torch.ones(2, requires_grad=True)], lr=0.1))
    plain.param_groups[0]["params"][0].grad = torch.ones(2)
    plain.step()  # no group, nothing lost
