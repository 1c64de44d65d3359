"""TLRAdamW's Triton path (kernels/adamw_step.py) through Triton's interpreter, against the
float64 reference (``ReferenceTLRAdamW``) and the PyTorch path.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton; sizes stay small.
"""

import io

import pytest
import torch

pytest.importorskip("triton")

from tlr_triton import TLRAdamW  # noqa: E402
from tlr_triton.kernels import adamw_step  # noqa: E402
from tlr_triton.reference import ReferenceTLRAdamW  # noqa: E402

SHAPES = ((6, 5), (7,), (3, 2, 2))
CONFIGS = [
    dict(window=1), dict(window=3, scope="tensor"), dict(window=2, maximize=True, weight_decay=0.0),
    dict(window=3, amsgrad=True, betas=(0.8, 0.95)), dict(window=2, weight_decay=0.1, eps=1e-6),
    dict(window=2, betas=(0.0, 0.0)),
]


def _params(seed, shapes=SHAPES, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _grads(params_lists, gen, step, dtype=torch.float64, skip=()):
    for i, first in enumerate(params_lists[0]):
        grad = None if i in skip else torch.randn(first.shape, generator=gen, dtype=torch.float64) * (1 + step % 4)
        for params in params_lists:
            params[i].grad = None if grad is None else grad.to(params[i].dtype)


def _alpha(opt, p):
    group = opt.param_groups[0]
    return float(opt.state[p]["alpha"] if group["scope"] == "tensor" else group["alpha"])


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_the_triton_path_follows_the_reference(dtype, rtol, config):
    """Weights and every α after each of 24 steps (closings every 1–3 steps), fp64 and fp32."""
    ours, ref = _params(4, dtype=dtype), _params(4)
    opt = TLRAdamW(ours, lr=2.0 ** -8, backend="triton", **config)
    reference = ReferenceTLRAdamW(ref, lr=2.0 ** -8, **config)
    gen = torch.Generator().manual_seed(5)
    alphas = set()
    for i in range(24):
        _grads([ours, ref], gen, i)
        opt.step()
        reference.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach().double(), q.detach(), rtol=rtol, atol=rtol)
            assert _alpha(opt, p) == pytest.approx(_alpha(reference, q), rel=max(rtol, 1e-7)), i
        alphas.add(_alpha(opt, ours[0]))
    assert len(alphas) > 3  # α was trained


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_keep_fp32_state_and_round_once(dtype):
    """bf16/fp16 weights: fp32 moments and window sums, one rounding of the weights per step
    (the PyTorch path's rule), so both paths agree to the weights' precision and α to fp32's."""
    init = _params(1)
    ours = [p.detach().to(dtype).requires_grad_() for p in init]
    theirs = [p.detach().to(dtype).requires_grad_() for p in init]
    opt = TLRAdamW(ours, lr=1e-2, window=2, backend="triton")
    other = TLRAdamW(theirs, lr=1e-2, window=2, backend="torch")
    gen = torch.Generator().manual_seed(2)
    for i in range(10):
        _grads([ours, theirs], gen, i)
        opt.step()
        other.step()
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.float32
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-2, atol=1e-2)
    assert float(opt.param_groups[0]["alpha"]) == pytest.approx(float(other.param_groups[0]["alpha"]), rel=1e-4)


def test_tensors_with_other_step_counts_and_missing_gradients():
    """A tensor that starts late or skips steps has its own bias corrections (its own launch);
    a tensor without a gradient is not touched; a schedule scales the step; both as the reference."""
    ours, ref = _params(7, dtype=torch.float32), _params(7)
    opt = TLRAdamW(ours, lr=2.0 ** -7, window=2, backend="triton")
    reference = ReferenceTLRAdamW(ref, lr=2.0 ** -7, window=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(reference, step_size=4, gamma=0.5)
    gen = torch.Generator().manual_seed(3)
    for i in range(14):
        skip = {1} if i < 3 else ({2} if i % 3 == 0 else set())
        _grads([ours, ref], gen, i, skip=skip)
        opt.step()
        reference.step()
        sched.step()
        ref_sched.step()
    assert opt.state[ours[1]]["step"] == 11 and opt.state[ours[2]]["step"] == 10
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=2e-5, atol=2e-5)
    assert _alpha(opt, ours[0]) == pytest.approx(_alpha(reference, ref[0]), rel=2e-5)


def test_odd_layouts_take_per_element_accesses():
    """A non-contiguous weight (a transposed view), sizes that are no multiple of the 16-byte
    vector and a 0-dim tensor: the launcher drops to ALIGN 1 (and a contiguous working copy
    for the view, copied back); the same result as the PyTorch path."""
    base = _params(9, shapes=((5, 7), (3,), ()), dtype=torch.float32)
    ours = [base[0].detach().clone().t().requires_grad_()] + [p.detach().clone().requires_grad_() for p in base[1:]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    assert not ours[0].is_contiguous()
    opt = TLRAdamW(ours, lr=1e-2, window=2, backend="triton")
    other = TLRAdamW(theirs, lr=1e-2, window=2, backend="torch")
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        _grads([ours, theirs], gen, i)
        opt.step()
        other.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_an_ordinary_step_is_one_launch_and_a_closing_three(monkeypatch):
    calls = []
    for name in ("adamw_step_kernel", "adamw_alpha_kernel", "adamw_move_kernel"):
        real = getattr(adamw_step, name)

        class Counting:
            def __init__(self, name, real):
                self.name, self.real = name, real

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls[-1].append(self.name)
                    return self.real[grid](*args, **kwargs)

                return launch

        monkeypatch.setattr(adamw_step, name, Counting(name, real))
    params = _params(0, dtype=torch.float32)
    opt = TLRAdamW(params, lr=1e-2, window=3, backend="triton")
    for i in range(6):
        calls.append([])
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    ordinary, closing = ["adamw_step_kernel"], ["adamw_step_kernel", "adamw_alpha_kernel", "adamw_move_kernel"]
    assert calls == [ordinary, ordinary, closing, ordinary, ordinary, closing]


@pytest.mark.parametrize("first, then", [("triton", "torch"), ("torch", "triton")])
def test_a_checkpoint_moves_between_the_paths(first, then):
    """The two paths keep the same state (P ← R and R ← 0 in place, or by swapping buffers):
    a run saved mid-window on one continues on the other as it would have on the first."""
    params = _params(2, dtype=torch.float32)
    opt = TLRAdamW(params, lr=1e-2, window=3, scope="tensor", backend=first)
    gen = torch.Generator().manual_seed(0)
    grads = []
    for i in range(12):
        grads.append([torch.randn(p.shape, generator=gen) for p in params])
    for i in range(7):
        for p, g in zip(params, grads[i]):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    for i in range(7, 12):
        for p, g in zip(params, grads[i]):
            p.grad = g.clone()
        opt.step()
    buf.seek(0)
    resumed = TLRAdamW(resumed_params, lr=1e-2, window=3, scope="tensor", backend=then)
    resumed.load_state_dict(torch.load(buf))
    resumed.param_groups[0]["backend"] = then  # the checkpoint carries the first run's choice
    for i in range(7, 12):
        for p, g in zip(resumed_params, grads[i]):
            p.grad = g.clone()
        resumed.step()
    for p, q in zip(params, resumed_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert float(opt.state[p]["alpha"]) == pytest.approx(float(resumed.state[q]["alpha"]), rel=1e-5)


def test_bad_backends_are_refused_by_name():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="backend"):
        TLRAdamW([w], backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        TLRAdamW([w]).add_param_group({"params": [torch.zeros(2, requires_grad=True)], "backend": "fast"})


def test_a_collective_needs_the_pytorch_path():
    w = torch.zeros(3, requires_grad=True)
    opt = TLRAdamW([w], backend="triton", window=3, shard_group=object())
    w.grad = torch.ones(3)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        opt.step()
    assert torch.equal(w, torch.zeros(3))


@pytest.mark.parametrize("cfg", [dict(window=2), dict(window=3, scope="tensor", amsgrad=True)])
def test_step_never_reads_device_values(cfg, forbid_host_reads):
    """The closing is scheduled by the host's counter and α is updated by a kernel: no step,
    the first one (state, tables) and the closings included, reads a tensor's value."""
    params = _params(3, dtype=torch.float32)
    opt = TLRAdamW(params, lr=torch.tensor(1e-2), backend="triton", **cfg)  # a tensor lr: its factor stays on the device
    grads = [[torch.randn(p.shape) for p in params] for _ in range(7)]
    forbid_host_reads()
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()


def test_gradient_copies_outlive_every_bucket_until_the_launches():
    """Non-contiguous (transposed) gradients in a group of two buckets (the second tensor starts a
    step late: another step count): the first bucket's contiguous copies must stay alive until the
    kernels read them, or the second bucket's allocations take their memory (review finding)."""
    def run(backend):
        gen = torch.Generator().manual_seed(1)
        a, b = (torch.randn(8, 8, generator=gen).requires_grad_() for _ in range(2))
        opt = TLRAdamW([a, b], lr=1e-2, window=2, backend=backend)
        for i in range(5):
            a.grad = torch.randn(8, 8, generator=gen).t()
            b.grad = (100 * torch.randn(8, 8, generator=gen)).t() if i > 0 else None
            opt.step()
        return a.detach(), b.detach(), opt.state[a]["exp_avg"]

    for x, y in zip(run("triton"), run("torch")):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_one_minus_beta_is_taken_in_float64():
    """β2 = 0.99999 in fp32: 1 − β2 from the fp64 β (as the PyTorch path's Python float), not from
    β rounded to fp32 first (2% off; review finding): v as close to the reference as the PyTorch
    path's."""
    errors = {}
    for backend in ("triton", "torch"):
        ours, ref = _params(4, dtype=torch.float32), _params(4)
        opt = TLRAdamW(ours, lr=1e-3, betas=(0.9, 0.99999), window=4, backend=backend)
        reference = ReferenceTLRAdamW(ref, lr=1e-3, betas=(0.9, 0.99999), window=4)
        gen = torch.Generator().manual_seed(0)
        for i in range(20):
            _grads([ours, ref], gen, i)
            opt.step()
            reference.step()
        errors[backend] = max(float(((opt.state[p]["exp_avg_sq"].double() - reference.state[q]["exp_avg_sq"]).abs()
                                     / reference.state[q]["exp_avg_sq"].abs().clamp_min(1e-30)).max())
                              for p, q in zip(ours, ref))
    assert errors["triton"] < 1e-5 and errors["triton"] < 10 * errors["torch"] + 1e-6, errors


def test_an_impossible_backend_in_a_later_group_changes_nothing(monkeypatch):
    """backend="triton" on CPU tensors without the interpreter is refused before any group steps."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = TLRAdamW([{"params": [a]}, {"params": [b], "backend": "triton"}], lr=0.1, window=3)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="group 1"):
        opt.step()
    assert torch.equal(a, torch.ones(3)) and not opt.state and opt.param_groups[0]["step"] == 0


def test_state_follows_weights_given_another_dtype():
    """``p.data = p.data.double()`` after some steps: the state follows the weights' dtype (fp64
    state for fp64 weights; the kernels would otherwise read fp32 state as fp64, past its end), and
    the Triton path still follows the float64 reference."""
    ours, ref = _params(4, dtype=torch.float32), _params(4)
    opt = TLRAdamW(ours, lr=2.0 ** -8, backend="triton", window=2)
    reference = ReferenceTLRAdamW(ref, lr=2.0 ** -8, window=2)
    gen = torch.Generator().manual_seed(5)
    for i in range(8):
        if i == 3:
            for p in ours:
                p.data = p.data.double()
        _grads([ours, ref], gen, i)
        opt.step()
        reference.step()
    for p, q in zip(ours, ref):
        assert p.dtype == torch.float64 and all(t.dtype == torch.float64 for k, t in opt.state[p].items()
                                                if isinstance(t, torch.Tensor) and k != "alpha")
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-5)
    assert _alpha(opt, ours[0]) == pytest.approx(_alpha(reference, ref[0]), rel=2e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weights_given_another_size_are_refused_before_anything_changes(backend):
    """A parameter whose data was replaced by a tensor of another size: a ValueError naming it,
    raised before any group steps (no state, weight, α or step counter changed)."""
    first, second = _params(4, dtype=torch.float32), _params(5, dtype=torch.float32)
    opt = TLRAdamW([{"params": first}, {"params": second}], lr=2.0 ** -8, backend=backend, window=2)
    gen = torch.Generator().manual_seed(5)
    for i in range(3):
        _grads([first + second], gen, i)
        opt.step()
    second[1].data = torch.zeros(9)
    second[1].grad = torch.ones(9)
    before = io.BytesIO()
    torch.save(opt.state_dict(), before)
    weights = [p.detach().clone() for p in first + second]
    with pytest.raises(ValueError, match=r"parameter 1 of group 1 does not fit it: exp_avg has shape \(7,\), the "
                                         r"parameter \(9,\)"):
        opt.step()
    after = io.BytesIO()
    torch.save(opt.state_dict(), after)
    assert before.getvalue() == after.getvalue()
    assert all(torch.equal(p.detach(), w) for p, w in zip(first + second, weights))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weights_given_another_shape_of_the_same_size_are_refused(backend):
    """p.data transposed (same number of elements, another shape): refused before anything changes,
    not half-way through the step (a review found the check compared sizes only)."""
    w = torch.randn(2, 3, requires_grad=True)
    opt = TLRAdamW([w], lr=2.0 ** -8, backend=backend, window=2)
    w.grad = torch.ones(2, 3)
    opt.step()
    w.data = w.data.t().contiguous()
    w.grad = torch.ones(3, 2)
    exp_avg = opt.state[w]["exp_avg"].clone()
    with pytest.raises(ValueError, match=r"exp_avg has shape \(2, 3\), the parameter \(3, 2\)"):
        opt.step()
    assert opt.state[w]["step"] == 1 and torch.equal(opt.state[w]["exp_avg"], exp_avg)


def test_a_fixed_window_on_the_triton_path_restarts_the_adaptive_window(monkeypatch):
    """backend="auto" on a GPU: fixed windows on the Triton path, "auto" on the PyTorch path (simulated
    here through the interpreter). auto → 3 → auto: the window state and the guard's references
    restart at the fixed closings, as the reference's (a review found them kept from before)."""
    import tlr_triton.adamw as module

    real = module._resolve_backend
    monkeypatch.setattr(module, "_resolve_backend",
                        lambda backend, device, index: "triton" if backend == "auto" else real(backend, device, index))
    ours, ref = _params(4, dtype=torch.float32), _params(4)
    opt = TLRAdamW(ours, lr=2.0 ** -6, backend="auto")
    reference = ReferenceTLRAdamW(ref, lr=2.0 ** -6)
    gen = torch.Generator().manual_seed(1)
    for i in range(30):
        for o in (opt, reference):
            o.param_groups[0]["window"] = 3 if 11 <= i < 20 else "auto"
        _grads([ours, ref], gen, i)
        opt.step()
        reference.step()
        group, rgroup = opt.param_groups[0], reference.param_groups[0]
        assert group["window_state"].tolist() == [rgroup["units_done"], rgroup["units"]], i
        assert group["window_energy"].tolist() == pytest.approx(rgroup["energy"], rel=1e-5), i
        assert _alpha(opt, ours[0]) == pytest.approx(_alpha(reference, ref[0]), rel=2e-5), i
