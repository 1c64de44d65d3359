"""The Triton path (kernels/) through Triton's interpreter, against the float64 reference.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton; sizes stay small
because the interpreter runs one program after another.
"""

import copy
import itertools

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_matches_reference, lockstep, make_params, set_grads, twin, window_state  # noqa: E402
from tlr_triton import TLR  # noqa: E402
from tlr_triton import optimizer as optimizer_module  # noqa: E402
from tlr_triton.kernels import cpu as native  # noqa: E402
from tlr_triton.kernels import launch  # noqa: E402
from tlr_triton.reference import ReferenceTLR  # noqa: E402

needs_native = pytest.mark.skipif(native.extension() is None, reason="the native module cannot be built here")

MOMENTA = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "dampening": dict(momentum=0.9, dampening=0.3),
}
FP32 = dict(rtol=5 * 1.3e-6, atol=5 * 1e-5)
# Every scope x statistic x momentum x window; weight decay and maximize cycle through their
# four combinations, each with every momentum variant (the interpreter is slow; the PyTorch
# path's parity test runs the full product).
MATRIX = [(scope, statistic, window, mom, *[(0.0, False), (1e-2, False), (0.0, True), (1e-2, True)][(i + i // 4) % 4])
          for i, (scope, statistic, window, mom) in enumerate(
              itertools.product(["group", "tensor"], ["gradient", "direction"], [1, 3], list(MOMENTA)))]


@pytest.mark.parametrize("scope,statistic,window,mom,wd,maximize", MATRIX)
def test_matches_reference_fp32(scope, statistic, window, mom, wd, maximize):
    lockstep([{}], steps=7, dtype=torch.float32, **FP32, lr=0.05, backend="triton", scope=scope,
             statistic=statistic, window=window, weight_decay=wd, maximize=maximize, **MOMENTA[mom])


@pytest.mark.parametrize("scope,statistic,mom", [("group", "gradient", "momentum"), ("tensor", "direction", "momentum"),
                                                 ("group", "direction", "plain"), ("tensor", "gradient", "nesterov")])
def test_adaptive_window_matches_reference(scope, statistic, mom):
    """Windows of 1..4 units of 2 steps decided on the device (noise: they grow; a signal: they reset)."""
    lengths = []
    lockstep([{}], steps=40, dtype=torch.float32, **FP32, lr=0.05, backend="triton", scope=scope, statistic=statistic,
             window=2, max_window=8, window_reset=0.1, weight_decay=1e-2, signal_at=lambda t: 3.0 * (24 <= t < 32),
             after_step=lambda opt, ref: lengths.append(int(opt.param_groups[0]["window_state"][1])), **MOMENTA[mom])
    assert max(lengths) >= 3 and any(a > 1 and b == 1 for a, b in zip(lengths, lengths[1:])), lengths


@pytest.mark.parametrize("cfg", [dict(), dict(momentum=0.9, statistic="direction", scope="tensor"), dict(momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True)])
def test_matches_reference_fp64(cfg):
    lockstep([{}], steps=7, dtype=torch.float64, lr=0.05, window=2, backend="triton", **cfg)


# fp16/bf16 weights: state and arithmetic in fp32, one rounding (to nearest even) per step.
HALF = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


@pytest.mark.parametrize("dtype", list(HALF), ids=str)
@pytest.mark.parametrize("cfg", [dict(), dict(momentum=0.9, weight_decay=1e-2, window=3), dict(momentum=0.9, nesterov=True, scope="tensor", statistic="direction", window=2)])
def test_half_precision_matches_reference(dtype, cfg):
    opt, _, params, _ = lockstep([{}], steps=7, dtype=dtype, lr=0.05, backend="triton", **HALF[dtype], **cfg)
    for st in opt.state.values():
        assert all(st[k].dtype == torch.float32 for k in ("window_sum", "prev_window_sum"))


def _against_reference(params, steps, tol, msg="", **hyper):
    """TLR on the Triton path over ``params`` and ReferenceTLR over twins of them, the same
    gradients, compared after every step; returns the TLR optimizer."""
    twins = twin(params)
    opt = TLR(params, backend="triton", **hyper)
    ref = ReferenceTLR(twins, **hyper)
    for t in range(steps):
        set_grads([params, twins], t)
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, params, twins, **tol, msg=f"{msg}step {t}:")
    return opt


def test_param_groups_and_mixed_dtypes():
    groups = [dict(lr=0.1, momentum=0.9, window=2, scope="tensor"), dict(lr=0.01, statistic="direction", momentum=0.5, window=3), dict(lr=2e-3, window=2, max_window=6)]
    lockstep(groups, steps=8, dtype=torch.float32, **FP32, backend="triton")
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32]
    params = [torch.randn(s, dtype=d, requires_grad=True) for s, d in zip([(3, 4), (5,), (2, 2), ()], dtypes)]
    _against_reference(params, 6, dict(rtol=1e-2, atol=1e-2), lr=0.05, momentum=0.9, window=2)


def test_odd_sizes_zero_size_and_zero_dim():
    shapes = [(1,), (0,), (1023,), (), (1024,), (0, 5), (1025,), (65537,), (3, 7, 5)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    for scope in ("group", "tensor"):
        ps = twin(params)
        opt = _against_reference(ps, 4, FP32, msg=f"{scope} ", lr=0.05, momentum=0.9, window=2, scope=scope)
        assert all(p not in opt.state for p in ps if p.numel() == 0)


def test_non_contiguous_params_and_grads_update_in_place():
    base = torch.randn(10, 5, 2)
    sliced = base[..., 0].requires_grad_()
    transposed = torch.randn(6, 4).t().requires_grad_()
    q1, q2 = sliced.detach().clone().requires_grad_(), transposed.detach().clone().requires_grad_()
    before = base.clone()
    opt = TLR([sliced, transposed], lr=0.05, momentum=0.9, window=2, backend="triton")
    ref = ReferenceTLR([q1, q2], lr=0.05, momentum=0.9, window=2)
    for t in range(5):
        g1, g2 = torch.randn(5, 10).t(), torch.randn(6, 4).t()  # non-contiguous gradients too
        sliced.grad, transposed.grad, q1.grad, q2.grad = g1, g2, g1.clone(), g2.clone()
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, [sliced, transposed], [q1, q2], **FP32, msg=f"step {t}")
    assert not torch.equal(base[..., 0], before[..., 0]) and torch.equal(base[..., 1], before[..., 1])


def test_grads_missing_on_some_steps():
    def skip(t):
        return ({0} if t < 3 else set()) | ({2} if t % 3 == 0 else set())

    for stat in ("gradient", "direction"):
        lockstep([{}], steps=9, dtype=torch.float32, skip_at=skip, **FP32, lr=0.05, momentum=0.9, window=2,
                 statistic=stat, backend="triton")


@pytest.mark.parametrize("window", [3, "auto"])
def test_dampening_takes_a_snapshot_retaken_after_each_tensors_first_step(window):
    """Dampening τ: A is recovered from a snapshot (c = (1 - μ)/(1 - τ)), which each tensor's first
    step (b = u, not (1 - τ)·u) retakes — here tensors starting late, mid-window, and steps without
    some gradients. Against the reference at every step."""
    opt, _, params, _ = lockstep([{}], steps=16, dtype=torch.float32, **FP32, lr=0.05, backend="triton", momentum=0.9,
                                 dampening=0.3, weight_decay=1e-2, window=window,
                                 skip_at=lambda t: {0, 4} if t < 4 else ({6} if t in (9, 10) else ()))
    assert all("window_start" in opt.state[p] for p in params if p.numel() > 0)


def test_window_snapshot_follows_hyperparameter_changes_mid_window():
    """Momentum, nesterov, the statistic and dampening changed between steps, mid-window: the snapshot is
    turned back into A with the form it was taken with (``window_start_form``) and retaken in
    the new one (or A kept summed); a tensor without a gradient across a closing keeps its A.
    The reference sums A throughout."""
    changes = {4: dict(momentum=0.5), 9: dict(nesterov=True), 13: dict(statistic="direction"),
               16: dict(momentum=0.0, nesterov=False), 20: dict(statistic="gradient", momentum=0.9),
               25: dict(dampening=0.3), 28: dict(dampening=0.0)}
    forms = []

    def change(opt, ref):
        t = len(forms)
        forms.append(opt.state[opt.param_groups[0]["params"][0]].get("window_start_form"))
        for group in (opt.param_groups[0], ref.param_groups[0]):
            group.update(changes.get(t + 1, {}))

    lockstep([{}], steps=31, dtype=torch.float32, **FP32, lr=0.05, momentum=0.9, weight_decay=1e-2, window=3,
             skip_at=lambda t: {1} if 6 <= t < 10 else set(), after_step=change, backend="triton")
    from tlr_triton.functional import snapshot_form

    heavy, nesterov = snapshot_form("gradient", 0.9, 0, False), snapshot_form("gradient", 0.5, 0, True)
    assert heavy == pytest.approx((9.0, 0.1)) and nesterov == pytest.approx((0.5, 0.5))
    assert forms[3] == forms[23] == heavy and forms[5] == snapshot_form("gradient", 0.5, 0, False), forms
    assert forms[10] == nesterov and forms[14] == forms[17] == (0.0, 1.0), forms
    assert forms[26] == snapshot_form("gradient", 0.9, 0.3, False) == pytest.approx((9.0, 0.1 / 0.7)), forms
    assert forms[30] == heavy, forms


def run_twice(cfg):
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        params = make_params(dtype=torch.float32)
        opt = TLR(params, lr=0.05, backend="triton", **cfg)
        for t in range(6):
            set_grads([params], t)
            opt.step()
        out.append((params, opt))
    return out


def test_deterministic():
    (p1, o1), (p2, o2) = run_twice(dict(window=2, momentum=0.9, scope="tensor"))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert torch.equal(o1.param_groups[0]["alpha"], o2.param_groups[0]["alpha"])
    for a, b in zip(p1, p2):
        if a in o1.state:
            assert torch.equal(o1.state[a]["alpha"], o2.state[b]["alpha"])


@pytest.mark.parametrize("window", [dict(window=2), dict(window=1, max_window=4)])
def test_found_inf_leaves_everything_untouched(window):
    params = make_params(dtype=torch.float32)
    opt = TLR(params, lr=0.05, momentum=0.9, backend="triton", **window)
    for t in range(3):
        set_grads([params], t)
        opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    set_grads([params], 3)
    for p in params:
        p.grad.view(-1)[:1] = float("inf")
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.ones(())
    for _ in range(2):  # one of them would close a window
        opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    after = opt.state_dict()
    assert int(after["param_groups"][0]["step"]) == int(snapshot["param_groups"][0]["step"]) == 3
    assert torch.equal(after["param_groups"][0]["alpha"], snapshot["param_groups"][0]["alpha"])
    assert torch.equal(after["param_groups"][0]["window_state"], snapshot["param_groups"][0]["window_state"])
    for k, st in snapshot["state"].items():
        for key, value in st.items():
            same = torch.equal(after["state"][k][key], value) if isinstance(value, torch.Tensor) else after["state"][k][key] == value
            assert same, (k, key)


def test_grad_scale_divides_gradients():
    params = make_params(dtype=torch.float32)
    qs = twin(params)
    opt = TLR(params, lr=0.05, momentum=0.9, window=2, backend="triton")
    ref = ReferenceTLR(qs, lr=0.05, momentum=0.9, window=2)
    for t in range(5):
        grads = set_grads([params, qs], t)
        for p, g in zip(params, grads):
            p.grad = g * 8.0  # exact in fp32
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.zeros(())
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, params, qs, **FP32, msg=f"step {t}")


def test_grad_scaler_end_to_end_skips_the_inf_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    control = copy.deepcopy(model)
    opt = TLR(model.parameters(), lr=0.05, momentum=0.9, window=2, backend="triton")
    copt = TLR(control.parameters(), lr=0.05, momentum=0.9, window=2, backend="triton")
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    for t in range(6):
        for m, o, sc in ((model, opt, scaler), (control, copt, None)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            if sc is None:
                if t != 2:
                    loss.backward()
                    o.step()
                continue
            sc.scale(loss).backward()
            if t == 2:
                m.weight.grad[0, 0] = float("inf")
            sc.step(o)
            sc.update()
    assert scaler.get_scale() == 64.0  # backed off once
    for p, q in zip(model.parameters(), control.parameters()):
        torch.testing.assert_close(p, q)
    assert int(opt.param_groups[0]["step"]) == 5


def test_address_table_rebuilt_after_load_state_dict_and_resume_is_exact():
    params = make_params(dtype=torch.float32)
    cfg = dict(lr=0.05, momentum=0.9, window=3, statistic="direction", backend="triton")
    opt = TLR(params, **cfg)
    for t in range(4):
        torch.manual_seed(100 + t)
        set_grads([params], t)
        opt.step()
    resumed_params = twin(params)
    resumed = TLR(resumed_params, **cfg)
    resumed.load_state_dict(opt.state_dict())
    builds = launch.tables.builds
    for ps, o in ((params, opt), (resumed_params, resumed)):
        for t in range(4, 9):
            torch.manual_seed(100 + t)
            set_grads([ps], t)
            for p in ps:  # the same gradient tensors every step: only new addresses rebuild
                if p.grad is not None:
                    p.grad = p.grad
            o.step()
    assert launch.tables.builds > builds  # the resumed optimizer's tensors have new addresses
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))
    assert torch.equal(opt.param_groups[0]["alpha"], resumed.param_groups[0]["alpha"])


def test_tables_are_reused_while_addresses_stay():
    params = make_params(dtype=torch.float32)
    opt = TLR(params, lr=0.05, window=2, backend="triton")
    set_grads([params], 0)
    opt.step()
    builds = launch.tables.builds
    for _ in range(3):
        opt.step()  # same parameters, gradients and state: no new table
    assert launch.tables.builds == builds


def test_tables_follow_state_tensors_replaced_while_gradients_stay_in_place():
    """Gradients written in place (the same addresses every step, as in a training loop): the
    address tables serve while the step plan does; a state tensor replaced by hand, or by
    load_state_dict, brings a new plan and new tables (their addresses read afresh). Every step
    matches the reference."""
    params = make_params(dtype=torch.float32)
    qs = twin(params)
    cfg = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, window=2, max_window=8)
    opt, ref = TLR(params, backend="triton", **cfg), ReferenceTLR(qs, **cfg)
    for p in params:
        p.grad = torch.zeros_like(p)
    built = []
    for t in range(12):
        torch.manual_seed(t)
        for p, q in zip(params, qs):
            g = torch.randn(p.shape)
            p.grad.copy_(g)
            q.grad = g.clone()
        if t in (5, 9):  # a hand edit: state tensors replaced by copies at other addresses
            for key in ("prev_window_sum", "momentum_buffer"):
                opt.state[params[0]][key] = opt.state[params[0]][key].clone()
        if t == 7:
            opt.load_state_dict(opt.state_dict())
        before = launch.tables.builds
        opt.step()
        ref.step()
        built.append(launch.tables.builds > before)
        assert_matches_reference(opt, ref, params, qs, **FP32, msg=f"step {t}")
    assert [t for t, b in enumerate(built) if b] == [0, 1, 5, 7, 9], built  # step 1: the new buffers' flags


# What the steady step (``_StepPlan.record``: one native pass finds every weight and gradient as
# at the plan's last step, and the launcher repeats its launches) must notice, applied before
# step 5; and the steps whose launches are planned afresh (step 0: new buffers, nothing kept;
# 1: the launches kept), with it: a gradient of another dtype or layout takes a working copy at
# every step, and a new parameter's first step (new buffers) keeps nothing.
LAYOUT_CHANGES = {
    "new gradient tensors": (lambda ps: [setattr(p, "grad", p.grad.clone()) for p in ps], [0, 1]),
    "a gradient dropped": (lambda ps: setattr(ps[0], "grad", None), [0, 1, 5]),
    "weights moved": (lambda ps: [setattr(p, "data", p.data.clone()) for p in ps], [0, 1]),
    "a transposed gradient at the same address": (lambda ps: setattr(ps[0], "grad", ps[0].grad.t()),
                                                  [0, 1, 5, 6, 7, 8]),
    "a weight's dtype": (lambda ps: setattr(ps[2], "data", ps[2].data.double()), [0, 1, 5, 6, 7, 8]),
    "a parameter swapped for another": (
        lambda ps: (ps.__setitem__(4, torch.zeros(2, 3, requires_grad=True)), setattr(ps[4], "grad", torch.zeros(2, 3))),
        [0, 1, 5, 6]),
    "a momentum buffer replaced": (None, [0, 1, 5]),  # the plan's state check
}


@pytest.mark.parametrize("change", list(LAYOUT_CHANGES))
@needs_native
def test_steady_steps_follow_every_change_of_the_tensors(change, monkeypatch):
    """Gradients written in place (a training loop's usual case): from the third step on, the
    steady step serves (no table is looked at), and a change of any weight or gradient (its
    address, presence, size, dtype, contiguity, the parameter itself) or of the state sends the
    step back through the full checks. Bit for bit what the same run gives with the steady step
    turned off, where every step checks everything."""
    def run(steady: bool):
        shapes = [(3, 3), (), (4,), (7,), (2, 3), (5,), (12,)]
        torch.manual_seed(0)
        params = [torch.randn(s).requires_grad_() for s in shapes]
        opt = TLR(params, lr=0.05, momentum=0.9, weight_decay=1e-2, window=2, max_window=8, backend="triton")
        group = opt.param_groups[0]
        for p in params:
            p.grad = torch.zeros_like(p)
        planned = []
        real = launch._plan_launches

        def spy(*args, **kwargs):
            planned.append(planned_steps[-1])
            return real(*args, **kwargs)

        planned_steps = []
        with monkeypatch.context() as m:
            m.setattr(launch, "_plan_launches", spy)
            if not steady:
                m.setattr(optimizer_module, "same_layout", lambda params, record, moved: native.CHANGED)
            for t in range(9):
                if t == 5:
                    edit = LAYOUT_CHANGES[change][0]
                    if edit is None:
                        st = opt.state[params[3]]
                        st["momentum_buffer"] = st["momentum_buffer"].clone()
                    else:
                        edit(group["params"])
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(t)))
                planned_steps.append(t)
                opt.step()
        return opt, group["params"], sorted(set(planned))

    fast, fast_params, fast_planned = run(True)
    slow, slow_params, slow_planned = run(False)
    assert slow_planned == list(range(9))
    assert fast_planned == LAYOUT_CHANGES[change][1], fast_planned
    for p, q in zip(fast_params, slow_params):
        assert p.dtype == q.dtype and torch.equal(p, q)
    assert torch.equal(fast.param_groups[0]["alpha"], slow.param_groups[0]["alpha"])


@needs_native
def test_moving_gradients_are_taken_by_the_repeated_launches():
    """Gradients in new tensors at every step (``zero_grad(set_to_none=True)``) in a group of two
    dtypes (two buckets): the repeated launches take the new addresses, and no table is built
    after the first steps — except once where a gradient's address stops being 16-byte aligned
    (from step 6 on, 4 bytes past a boundary: ALIGN changes, the step takes the full checks).
    Every step matches the float64 reference."""
    shapes, dtypes = [(5, 4), (8,), (7,), (4, 4)], [torch.float32, torch.float32, torch.float64, torch.float32]
    params = [torch.randn(s, dtype=d, requires_grad=True) for s, d in zip(shapes, dtypes)]
    qs = [p.detach().double().clone().requires_grad_() for p in params]
    cfg = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, window=2, max_window=8)
    opt, ref = TLR(params, backend="triton", **cfg), ReferenceTLR(qs, **cfg)
    built, aligns = [], []
    for t in range(10):
        for i, (p, q) in enumerate(zip(params, qs)):
            g = torch.randn(p.shape, dtype=torch.float64)
            p.grad = torch.empty(9, dtype=p.dtype)[1:].copy_(g) if i == 1 and t >= 6 else g.to(p.dtype)
            q.grad = p.grad.double()
        builds = launch.tables.builds
        opt.step()
        ref.step()
        built.append(launch.tables.builds > builds)
        entry = opt._plans[id(opt.param_groups[0])].launches.get("launches")
        aligns.append(entry and [item[5] for item in entry[1]])  # each bucket's ALIGN
        assert_matches_reference(opt, ref, params, qs, **FP32, msg=f"step {t}")
    assert [t for t, b in enumerate(built) if b] == [0, 1, 6], built
    assert aligns == [None] + [[4, 1]] * 5 + [[1, 1]] * 4, aligns


@pytest.mark.parametrize("size", [6, 24])
def test_a_weight_resized_under_its_state_is_refused_before_any_change(size):
    """``p.data`` replaced by a tensor of another size (the kernels take sizes from the weights:
    a larger one would run past its state): a clear error, and no group steps, not even the
    first, which is fine."""
    a, b = torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True)
    opt = TLR([{"params": [a]}, {"params": [b]}], lr=0.05, momentum=0.9, window=2, backend="triton")
    for _ in range(3):
        a.grad, b.grad = torch.randn(12), torch.randn(12)
        opt.step()
    b.data, b.grad = torch.randn(size), torch.randn(size)
    before = [a.detach().clone(), *(g["alpha"].clone() for g in opt.param_groups),
              *(g["step"].clone() for g in opt.param_groups)]
    with pytest.raises(ValueError, match=f"parameter 0 of group 1 does not fit it: momentum_buffer holds 12 "
                                         f"elements, the parameter {size}"):
        opt.step()
    after = [a, *(g["alpha"] for g in opt.param_groups), *(g["step"] for g in opt.param_groups)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_state_follows_a_weight_to_another_dtype():
    """``p.data = p.data.double()`` mid-run: the state follows (the kernels read it at the
    weights' width: it ran past fp32 buffers before), and the run continues as one whose state
    was converted by hand."""
    def run(by_hand: bool):
        torch.manual_seed(0)
        w = torch.randn(7, requires_grad=True)
        opt = TLR([w], lr=0.05, momentum=0.9, weight_decay=1e-2, window=2, backend="triton")
        for t in range(6):
            if t == 3:
                w.data = w.data.double()
                if by_hand:
                    st = opt.state[w]
                    for k in ("momentum_buffer", "window_start", "prev_window_sum"):
                        st[k] = st[k].double()
            w.grad = torch.randn(7, generator=torch.Generator().manual_seed(t)).to(w.dtype)
            opt.step()
        return w, opt

    w, opt = run(False)
    v, ref = run(True)
    assert w.dtype == torch.float64 and opt.state[w]["momentum_buffer"].dtype == torch.float64
    assert torch.equal(w, v) and torch.equal(opt.param_groups[0]["alpha"], ref.param_groups[0]["alpha"])


@needs_native
@pytest.mark.parametrize("moved", ["weights", "gradients"])
def test_a_step_that_raises_after_the_tensors_moved_leaves_nothing_stale(moved):
    """Group 0's tensors move, then group 1 is refused (a bad hyper-parameter): the record of
    group 0 keeps the addresses its kept launches hold, so the next steps use the new storage,
    not the old (a review found the record updated before the step could fail: the kernels then
    kept writing the old, possibly freed, weights). Bit for bit the fully checked run."""
    def run(steady: bool):
        torch.manual_seed(0)
        w, v = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
        opt = TLR([{"params": [w]}, {"params": [v]}], lr=0.05, momentum=0.9, window=2, backend="triton")
        with pytest.MonkeyPatch.context() as m:
            if not steady:
                m.setattr(optimizer_module, "same_layout", lambda params, record, moved: native.CHANGED)
            w.grad, v.grad = torch.zeros(8), torch.zeros(8)
            old = None
            for t in range(7):
                if t == 3:
                    if moved == "weights":
                        old, w.data = w.data, w.data.clone()
                    else:
                        old, w.grad = w.grad, w.grad.clone()
                    opt.param_groups[1]["weight_decay"] = -1.0
                    with pytest.raises(ValueError, match="Invalid weight_decay value: -1.0"):
                        opt.step()
                    opt.param_groups[1]["weight_decay"] = 0.0
                    old.fill_(1e6)  # the old storage, kept alive: any use of it shows
                for p in (w, v):
                    p.grad.copy_(torch.randn(8, generator=torch.Generator().manual_seed(t)))
                opt.step()
        return w, v, opt

    w, v, opt = run(True)
    w2, v2, opt2 = run(False)
    assert torch.equal(w, w2) and torch.equal(v, v2) and w.abs().max() < 100
    assert all(torch.equal(a["alpha"], b["alpha"]) for a, b in zip(opt.param_groups, opt2.param_groups))


@needs_native
def test_tensor_subclasses_get_no_layout_record():
    """A tensor subclass that dispatches to Python (a DTensor's kind: its storage is not its
    data) is not plain: its group gets no record, and every step takes the full checks."""
    class Wrapper(torch.Tensor):
        @staticmethod
        def __new__(cls, elem):
            return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(str(func))

    assert native.layout_record([torch.randn(2), Wrapper(torch.randn(3))]) is None
    assert native.layout_record([torch.randn(2), torch.randn(3)]) is not None


@needs_native
def test_steady_step_leaves_a_sparse_gradient_to_the_full_checks():
    """A sparse gradient where the steady step served: rejected before anything changes."""
    emb = torch.randn(5, 2, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    opt = TLR([emb, w], lr=0.05, backend="triton")
    emb.grad, w.grad = torch.ones(5, 2), torch.ones(3)
    for _ in range(3):
        opt.step()
    assert opt._plans[id(opt.param_groups[0])].record is not None
    before = [emb.detach().clone(), w.detach().clone(), opt.param_groups[0]["alpha"].clone()]
    emb.grad = torch.ones(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, [emb, w, opt.param_groups[0]["alpha"]]))


def test_without_the_native_module_every_step_takes_the_full_checks(monkeypatch):
    from tlr_triton.kernels import cpu

    monkeypatch.setattr(cpu, "_LOADED", [None])
    params = make_params(dtype=torch.float32)
    opt = TLR(params, lr=0.05, momentum=0.9, window=2, backend="triton")
    set_grads([params], 0)
    for _ in range(3):
        opt.step()
    assert opt._plans[id(opt.param_groups[0])].record is None


@pytest.mark.parametrize("cfg", [dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.9, nesterov=True, scope="tensor"),
                                 dict(momentum=0.9, statistic="direction"), dict(weight_decay=1e-2)])
def test_alpha_set_by_hand_mid_window_matches_reference(cfg):
    """α changed between steps inside a window (by hand, or by AlphaRestart): the step kernel sees
    that it differs from the α its blocks last moved with, recovers A with that one and retakes
    the window snapshot with the new α. The reference sums A, which α does not enter."""
    from tlr_triton.reference import _f32

    steps = []

    def change(opt, ref):
        steps.append(len(steps))
        if len(steps) in (4, 11, 12):  # mid-window, and twice in a row
            factor = 3.0 if len(steps) != 11 else 0.25
            if opt.param_groups[0]["scope"] == "group":
                opt.param_groups[0]["alpha"].mul_(factor)
                ref.param_groups[0]["alpha"] = _f32(ref.param_groups[0]["alpha"] * factor)
            for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
                if "alpha" in opt.state.get(p, {}):
                    opt.state[p]["alpha"].mul_(factor)
                    ref.state[q]["alpha"] = _f32(ref.state[q]["alpha"] * factor)

    lockstep([{}], steps=20, dtype=torch.float32, **FP32, lr=0.05, window=3, max_window=12, after_step=change,
             backend="triton", **cfg)


def test_switching_backends_mid_run_keeps_matching_the_reference():
    params = make_params(dtype=torch.float64)
    qs = twin(params)
    opt = TLR(params, lr=0.05, window=3, backend="triton")  # momentum 0: window snapshots
    ref = ReferenceTLR(qs, lr=0.05, window=3)
    for t in range(10):
        opt.param_groups[0]["backend"] = "triton" if t < 4 or t >= 7 else "torch"
        set_grads([params, qs], t)
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, params, qs, msg=f"step {t}")
    assert "window_start" in window_state(opt, params[0]) or "window_start" in opt.state[params[0]]


def test_triton_on_cpu_without_interpreter_fails_at_step(monkeypatch):
    params = make_params(dtype=torch.float32)
    opt = TLR(params, backend="triton")  # constructing is fine
    set_grads([params], 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_auto_picks_the_torch_path_on_cpu():
    params = make_params(dtype=torch.float32)
    opt = TLR(params)
    set_grads([params], 0)
    opt.step()
    assert isinstance(opt.param_groups[0]["step"], int) and not opt._step_supports_amp_scaling


@pytest.mark.parametrize("cfg", [dict(window=1), dict(window=2, momentum=0.9, statistic="direction", scope="tensor"),
                                 dict(window=2, momentum=0.9, weight_decay=1e-2), dict(window=1, max_window=3)])
def test_step_never_reads_device_values(cfg, forbid_host_reads):
    params = make_params(dtype=torch.float32)
    opt = TLR(params, lr=0.05, backend="triton", **cfg)
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    forbid_host_reads()  # from the first step on (state creation, tables, counter)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    opt.found_inf = torch.zeros(())
    opt.step()


def test_gpu_check_script_dry_mode_runs():
    """bench/gpu_check.py's correctness part, through the interpreter, so the script cannot rot."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--dry"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reference: OK" in out.stdout
    assert "TLRAdamW Triton path: OK" in out.stdout
    assert "training (digits MLP" in out.stdout


def test_custom_op_passes_opcheck():
    """The launch as a torch.library custom op: schema, mutations, fake tensors, AOT dispatch."""
    from tlr_triton.kernels.launch import triton_step_op

    live = [p for p in make_params(dtype=torch.float32) if p.numel()]
    grads = [torch.randn_like(p) for p in live]
    state = [[torch.zeros_like(p) for p in live] for _ in range(3)]
    args = (live, grads, state[0], [True] * len(live), state[1], state[2], [torch.tensor(0.05)],
            torch.zeros((), dtype=torch.int64), 2, 4, 0.1, torch.tensor([1, 3]), 16.0, torch.zeros(4, dtype=torch.float64),
            0.9, 0.0, 0.0, False, False, 0.25, "gradient", "group", 1.0, None, None, None, [0] * len(live), [False],
            0.0, 1.0)
    result = torch.library.opcheck(triton_step_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compiled_step_matches_reference():
    """torch.compile traces step() with the launch as one custom op, without graph breaks."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    params = make_params(dtype=torch.float32)
    qs = twin(params)
    opt = TLR(params, lr=0.05, momentum=0.9, window=2, backend="triton")
    ref = ReferenceTLR(qs, lr=0.05, momentum=0.9, window=2)
    step = torch.compile(opt.step, backend="eager")
    for t in range(6):
        set_grads([params, qs], t)
        step()
        ref.step()
        assert_matches_reference(opt, ref, params, qs, **FP32, msg=f"step {t}")
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # not one per closing step


def test_triton_checkpoint_loads_into_the_torch_path_and_continues():
    """A Triton-path checkpoint (device step counter, window snapshots) resumes on the PyTorch path."""
    params = make_params(dtype=torch.float64)
    qs = twin(params)
    opt = TLR(params, lr=0.05, window=3, statistic="direction", momentum=0.9, backend="triton")
    ref = ReferenceTLR(qs, lr=0.05, window=3, statistic="direction", momentum=0.9)
    for t in range(4):
        set_grads([params, qs], t)
        opt.step()
        ref.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["backend"] = "auto"  # as written on a CUDA machine with the default backend
    resumed_params = twin(params)
    resumed = TLR(resumed_params, lr=0.05, window=3, statistic="direction", momentum=0.9)
    resumed.load_state_dict(saved)  # "auto" on CPU tensors: the PyTorch path
    assert resumed.param_groups[0]["step"] == 4 and isinstance(resumed.param_groups[0]["step"], int)
    assert "window_start" in resumed.state[resumed_params[0]]  # converted to A at the first step
    for t in range(4, 9):
        set_grads([resumed_params, qs], t)
        resumed.step()
        ref.step()
        assert_matches_reference(resumed, ref, resumed_params, qs, msg=f"step {t}")


@pytest.mark.parametrize("cfg", [dict(momentum=0.9, weight_decay=0.1, maximize=True),
                                 dict(momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
                                 dict(weight_decay=0.1, maximize=True, statistic="direction")])
def test_equals_torch_sgd_while_alpha_is_constant(cfg):
    """Before the first closing the Triton path is torch.optim.SGD with lr = α (maximize negates g only)."""
    params = make_params(dtype=torch.float32)
    twins = twin(params)
    opt = TLR(params, lr=0.05, window=50, backend="triton", **cfg)
    sgd = torch.optim.SGD(twins, lr=0.05, foreach=False, **{k: v for k, v in cfg.items() if k != "statistic"})
    for t in range(4):
        set_grads([params, twins], t)
        opt.step()
        sgd.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_a_deepcopy_steps_and_continues_bit_identically():
    params = make_params(dtype=torch.float32)
    opt = TLR(params, lr=0.05, momentum=0.9, window=1, max_window=4, backend="triton")
    for t in range(3):
        set_grads([params], t)
        opt.step()
    dup = copy.deepcopy(opt)
    dup_params = dup.param_groups[0]["params"]
    for t in range(3, 9):
        set_grads([params, dup_params], t)
        opt.step()
        dup.step()
    assert all(torch.equal(p, q) for p, q in zip(params, dup_params))
    assert torch.equal(opt.param_groups[0]["alpha"], dup.param_groups[0]["alpha"])
    assert torch.equal(opt.param_groups[0]["window_state"], dup.param_groups[0]["window_state"])


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(scope="tensor", statistic="direction"),
                                 dict(momentum=0.9, nesterov=True, weight_decay=1e-2, dtype=torch.bfloat16)])
def test_blowup_guard_matches_reference(cfg):
    """Gradients 30 times larger inside a grown window: the window kernel closes it at the end of
    that unit (after the move), α is capped, P ← A in the move kernel; as the reference."""
    cfg = dict(cfg)
    dtype = cfg.pop("dtype", torch.float32)
    tol = FP32 if dtype == torch.float32 else HALF[dtype]
    lengths = []
    lockstep([{}], steps=40, dtype=dtype, **tol, lr=0.05, backend="triton", window=2, max_window=16, window_reset=0.1,
             scale_at=lambda t: 30.0 if t >= 27 else 1.0,
             after_step=lambda opt, ref: lengths.append(int(opt.param_groups[0]["window_state"][1])), **cfg)
    assert max(lengths[:27]) >= 3 and lengths[27] == 1, lengths


@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_blowup_guard_ignores_a_jump_under_steps_too_small_to_move_the_weights(scope):
    """The jump above with α = 1e-6: the step kernel's α²·‖A‖² partials keep it below
    MOVE_FLOOR²·Σ‖w‖², so the window kernel does not close the window; as the reference."""
    lengths = []
    lockstep([{}], steps=30, **FP32, lr=1e-6, backend="triton", window=2, max_window=16, window_reset=0.1,
             momentum=0.9, scope=scope, scale_at=lambda t: 30.0 if t >= 27 else 1.0,
             after_step=lambda opt, ref: lengths.append(int(opt.param_groups[0]["window_state"][1])))
    assert max(lengths[:27]) >= 3 and lengths[27] != 1, lengths


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(momentum=0.9, blowup_ratio=1e6),
                                 dict(momentum=0.9, scope="tensor", nesterov=True, weight_decay=1e-2)])
def test_blowup_guard_growth_test_matches_reference(cfg, monkeypatch):
    """The guard's growth test on the device (window kernel, Σ‖w‖² from the step kernel's
    partials): a quadratic beyond heavy-ball's stability, as tests/test_parity.py's, matches the
    reference at every step; the reference with the test turned off takes another course."""
    from tlr_triton import functional, reference

    def run(**kw):
        torch.manual_seed(0)
        alphas = []

        def record(opt, ref):  # the reference's α (one per group, or per tensor)
            alphas.append([ref.param_groups[0]["alpha"]] + [st["alpha"] for st in ref.state.values() if "alpha" in st])

        # fp32 against float64 through a blow-up: rounding grows with the iterates, hence 1e-4
        lockstep([{}], steps=40, dtype=torch.float32, rtol=1e-4, atol=1e-4, alpha_rtol=1e-4, lr=0.05, window=2,
                 max_window=16, window_reset=0.1, curvature=45.0, scale_at=lambda t: 0.3, after_step=record, **cfg, **kw)
        return alphas

    with_test = run(backend="triton")
    monkeypatch.setattr(reference, "GROWTH", float("inf"))
    monkeypatch.setattr(functional, "GROWTH", float("inf"))
    without = run(backend="torch")  # the growth test off: the references' α take another course
    assert with_test != without


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(momentum=0.9, scope="tensor"),
                                 dict(momentum=0.0, statistic="direction")])
def test_blowup_guard_decay_test_matches_reference(cfg, monkeypatch):
    """The guard's decay test on the device (Σ⟨A, w⟩ from the step kernel's partials, the peak α in
    window_energy[3], the ceiling in the α kernel): a consistent gradient raises α, then the data
    term falls silent and the windows are weight decay's pull alone; every step matches the
    reference, and no α grows past the data term's peak (with the test off it does)."""
    from tlr_triton import functional, reference

    def run(**kw):
        torch.manual_seed(0)
        alphas = []

        def record(opt, ref):  # the largest of the reference's α (one per group, or per tensor)
            alphas.append(max([ref.param_groups[0]["alpha"]] + [st["alpha"] for st in ref.state.values()
                                                                  if "alpha" in st]))

        lockstep([{}], steps=48, **FP32, lr=0.01, weight_decay=0.1, window=2, max_window=16, window_reset=0.1,
                 scale_at=lambda t: 1.0 if t < 20 else 1e-7, signal_at=lambda t: 1.0 if t < 20 else 0.0,
                 after_step=record, **cfg, **kw)
        return alphas

    with_test = run(backend="triton")
    peak = max(with_test[:24])
    assert peak > 0.02 and max(with_test[24:]) <= peak
    monkeypatch.setattr(reference, "DECAY_SHARE", 0.0)
    monkeypatch.setattr(functional, "DECAY_SHARE", 0.0)
    without = run(backend="torch")
    assert max(without[24:]) > 2 * peak


def test_guard_constants_are_the_same_in_kernels_and_functional():
    from tlr_triton import functional
    from tlr_triton.kernels import tlr_step

    assert tlr_step.GROWTH.value == functional.GROWTH
    assert tlr_step.MOVE_FLOOR.value == functional.MOVE_FLOOR
    assert tlr_step.DECAY_SHARE.value == functional.DECAY_SHARE


def test_kernels_are_the_leaf_of_the_import_graph():
    """kernels/ imports nothing from tlr_triton (which imports it lazily on the Triton path)."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n == "tlr_triton" or n.startswith("tlr_triton.") for n in names), (path.name, names)


def test_move_kernel_grid_is_persistent_and_strides_over_the_blocks():
    """The move kernel's grid does not grow with the model (an ordinary step, where it moves
    nothing, costs O(1) programs); with more blocks than programs each program strides over
    several, and the result still matches the reference (3 tensors of 40 blocks each, 64
    programs off the GPU, a fixed window of 2 so that half the steps move in the move kernel)."""
    assert launch.move_programs(torch.device("cpu"), 10_000) == launch._MOVE_PROGRAMS_OFF_GPU
    assert launch.move_programs(torch.device("cpu"), 3) == 3
    params = [torch.randn(40 * 1024, dtype=torch.float32, requires_grad=True) for _ in range(3)]
    _against_reference(params, 4, FP32, lr=0.05, momentum=0.9, window=2)


def _bytes_moved_per_step(cfg, steps, scale_at=lambda t: 1.0, numel=2048):
    """Run TLR on the Triton path and count, lane by lane in the interpreter, the bytes of
    weights, gradients and state that each step's kernels load and store (masked-off lanes
    move nothing, on a GPU as here). Block-wide accesses of 4-byte elements are those of the
    fp32 tensors; the scalar and fp64 ones (tables, α, partials) are per block, not per element.
    Returns [(step kind, bytes per element)]."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store
    moved = [0]

    def tally(ptrs, mask):
        if ptrs.data.size > 1 and ptrs.get_element_ty().primitive_bitwidth == 32:
            moved[0] += 4 * int(mask.data.sum())

    def counted_load(ptrs, mask, *args):
        tally(ptrs, mask)
        return load(ptrs, mask, *args)

    def counted_store(ptrs, value, mask, *args):
        tally(ptrs, mask)
        return store(ptrs, value, mask, *args)

    torch.manual_seed(0)
    params = [torch.randn(numel, dtype=torch.float32, requires_grad=True)]
    opt = TLR(params, backend="triton", **cfg)
    kinds = []
    try:
        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        for t in range(steps):
            done, k = (int(x) for x in opt.param_groups[0]["window_state"])
            unit_ends = (t + 1) % opt.param_groups[0]["window"] == 0
            params[0].grad = scale_at(t) * torch.randn(numel)
            moved[0] = 0
            opt.step()
            closed = unit_ends and int(opt.param_groups[0]["window_state"][0]) == 0
            kind = "ordinary" if not unit_ends else ("closing" if done + 1 >= k else "late" if closed else "unit end")
            kinds.append((kind, moved[0] / numel))
    finally:
        del builder.create_masked_load, builder.create_masked_store  # back to the class's methods
    return kinds


# Bytes per element and step: fused SGD moves 20 (fp32, momentum: reads w, g, b, writes w, b) or
# 12 without momentum. A snapshot (default: fp32 weights, no schedule) adds reads of S and P where
# the window statistics are needed. With dampening a tensor's first step retakes the snapshot
# (reads and writes S: 28); an accumulated A (until 2026-12-05 with dampening) costs 8 bytes every step.
@pytest.mark.parametrize("cfg,expected", [
    (dict(momentum=0.9, weight_decay=5e-4), dict(ordinary=20, closing=44)),
    (dict(momentum=0.9, nesterov=True), dict(ordinary=20, closing=48)),
    (dict(momentum=0.9, statistic="direction"), dict(ordinary=20, closing=44)),
    (dict(), dict(ordinary=12, closing=36)),
    (dict(momentum=0.9, dampening=0.1), dict(ordinary=20, closing=44, first=28)),
])
def test_an_ordinary_step_moves_what_fused_sgd_moves(cfg, expected):
    kinds = _bytes_moved_per_step(dict(lr=0.01, window=3, **cfg), steps=9)
    assert {k for k, _ in kinds} == {"ordinary", "closing"}, kinds
    if "first" in expected:  # the first step, and the rest
        assert kinds[0] == ("ordinary", expected["first"]), kinds
        kinds = kinds[1:]
    for kind, per_element in kinds:
        assert per_element == expected[kind], (kind, per_element, kinds)


def test_the_default_adaptive_window_moves_what_fused_sgd_moves_between_unit_ends():
    """At the defaults (momentum, weight decay, adaptive window watched by the blow-up guard):
    20 bytes per element on ordinary steps, 28 at a unit's end (S and P read for the guard's
    ‖A‖² and ⟨A, P⟩), 44 at a closing, 48 at the guard's late close (which rebuilds P and S)."""
    kinds = _bytes_moved_per_step(dict(lr=0.01, momentum=0.9, weight_decay=5e-4, window=2, max_window=16,
                                       window_reset=0.1), steps=30, scale_at=lambda t: 30.0 if t >= 25 else 1.0)
    seen = {}
    for kind, per_element in kinds:
        seen.setdefault(kind, set()).add(per_element)
    assert seen == {"ordinary": {20}, "unit end": {28}, "closing": {44}, "late": {48}}, kinds


def test_gradient_copies_outlive_every_bucket_until_the_launches():
    """Transposed gradients in a group of two buckets (fp32 and fp64): the first bucket's
    contiguous copies must stay alive until the kernels read them, or the next bucket's
    allocations take their memory (found in review of the TLRAdamW launcher, which copied it)."""
    def run(backend):
        gen = torch.Generator().manual_seed(1)
        a = torch.randn(8, 8, generator=gen).requires_grad_()
        b = torch.randn(8, 8, generator=gen, dtype=torch.float64).requires_grad_()
        opt = TLR([a, b], lr=0.05, momentum=0.9, window=2, backend=backend)
        for _ in range(5):
            a.grad = torch.randn(8, 8, generator=gen).t()
            b.grad = (100 * torch.randn(8, 8, generator=gen, dtype=torch.float64)).t()
            opt.step()
        return a.detach(), b.detach(), opt.state[a]["momentum_buffer"]

    for x, y in zip(run("triton"), run("torch")):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
