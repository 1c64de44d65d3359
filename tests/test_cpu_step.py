"""The fused C++ CPU step (kernels/cpu_step.cpp, loaded by tlr_triton.kernels.cpu) against torch's
own ops, on tensors large enough for its chunks and threads; its build, fallback and autograd
contract. (The float64 reference checks both CPU implementations: the ``cpu_step`` fixture.)"""

import shutil
import warnings

import pytest
import torch

from tlr_triton import TLR, functional
from tlr_triton.kernels import cpu

# above the kernel's 32768-element chunks (several chunks, both threads), odd sizes, a 0-dim
SHAPES = [(70_001,), (3, 40_000), (5,), (), (1000, 7)]

CONFIGS = {
    "default": dict(momentum=0.9, weight_decay=5e-4),
    "default-fixed-window": dict(momentum=0.9, weight_decay=5e-4, window=2),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, window=2, max_window=8),
    "dampening-direction": dict(momentum=0.8, dampening=0.3, statistic="direction", window=2, max_window=8),
    "plain-maximize": dict(momentum=0.0, weight_decay=1e-2, maximize=True, window=2, max_window=8),
    "no-guard": dict(momentum=0.9, blowup_ratio=None, window=1),
}

needs_build = pytest.mark.skipif(functional._cpu_extension() is None, reason="the fused CPU step cannot be built here")


def _run(fused: bool, cfg: dict, dtype, monkeypatch, steps=15, shapes=SHAPES):
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(functional, "_cpu_extension", lambda: None)
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
        opt = TLR(params, lr=0.05, **cfg)
        for t in range(steps):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen, dtype=dtype) + (0.5 if 5 <= t < 10 else 0.0)
                # tensor 2 starts late (its momentum buffer is born mid-run), tensor 4 skips steps
                p.grad = None if (i == 2 and t < 4) or (i == 4 and t % 4 == 1) else g.to(p.dtype)
            opt.step()
        return params, opt


@needs_build
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_matches_torch_ops(name, dtype, monkeypatch):
    """Weights, α, the window's state and every state tensor agree after 15 steps (windows
    closing, growing and cut), fused against torch's ops."""
    cfg = CONFIGS[name]
    fused, fo = _run(True, cfg, dtype, monkeypatch)
    plain, po = _run(False, cfg, dtype, monkeypatch)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, **tol)
    ga, gb = fo.param_groups[0], po.param_groups[0]
    torch.testing.assert_close(ga["alpha"], gb["alpha"], rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    assert torch.equal(ga["window_state"], gb["window_state"]) if "window_state" in ga else True
    for p, q in zip(fused, plain):
        sa, sb = fo.state[p], po.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor) and sa[key].is_floating_point():
                torch.testing.assert_close(sa[key], sb[key], **tol, msg=lambda m: f"state {key}: {m}")


@needs_build
def test_fused_step_takes_a_group_of_two_dtypes(monkeypatch):
    """float32 and float64 tensors in one group: one call per dtype, one α, the same result."""
    shapes = [(40_000,), (7,)]

    def run(fused):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(functional, "_cpu_extension", lambda: None)
            gen = torch.Generator().manual_seed(0)
            params = [torch.randn(s, generator=gen, dtype=d).requires_grad_()
                      for s, d in zip(shapes, (torch.float32, torch.float64))]
            opt = TLR(params, lr=0.05, momentum=0.9, weight_decay=1e-3, window=2)
            for _ in range(9):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                opt.step()
            return params, float(opt.param_groups[0]["alpha"])

    (a, alpha_a), (b, alpha_b) = run(True), run(False)
    assert alpha_a == pytest.approx(alpha_b, rel=1e-5) and alpha_a != pytest.approx(0.05)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


@needs_build
def test_an_ordinary_step_is_one_fused_call(monkeypatch):
    """An ordinary step runs the one C++ pass and no torch op over the tensors (the point of it)."""
    params = [torch.randn(s).requires_grad_() for s in SHAPES]
    opt = TLR(params, lr=0.05, momentum=0.9, weight_decay=5e-4)  # windows of 3-step units
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # step 0: state created
    ext = functional._cpu_extension()
    calls = []

    class Recording:
        def step(self, *args):
            calls.append("step")
            return ext.step(*args)

        def move(self, *args):
            calls.append("move")
            return ext.move(*args)

    monkeypatch.setattr(functional, "_cpu_extension", lambda: Recording())
    for name in ("_foreach_add_", "_foreach_add", "_foreach_mul_", "_fused_sgd_", "_foreach_addcmul_"):
        monkeypatch.setattr(torch, name, lambda *a, _n=name, **k: pytest.fail(f"torch.{_n} on the fused path"))
    opt.step()  # step 1: ordinary
    assert calls == ["step"]
    opt.step()  # step 2 ends the first unit, whose window closes: the move waits for α
    assert calls == ["step", "step", "move"]


@needs_build
def test_fused_step_tells_autograd_it_wrote_the_weights():
    """Written through raw pointers, the weights' version still advances as with torch's in-place
    ops: a graph that saved them and runs backward after the step raises instead of using the
    new values."""
    w = torch.randn(10, requires_grad=True)
    opt = TLR([w], lr=0.1, momentum=0.9)
    loss = (w ** 2).sum()  # saves w for backward
    w.grad = torch.ones(10)
    before = w._version
    opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fused_step_builds_where_a_compiler_exists():
    """The fallback is for machines without a compiler; with one (ninja is a dependency) the
    build must succeed."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine")
    assert functional._cpu_extension() is not None


@needs_build
def test_fused_step_runs_on_torchs_threads():
    """Built with OpenMP: ATen's parallel_for (a pragma in its headers) runs on torch's threads,
    not on one, and follows ``torch.set_num_threads``."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch runs one thread here")
    ext = functional._cpu_extension()
    try:
        assert ext.parallel_threads(64) == threads
        torch.set_num_threads(1)
        assert ext.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(threads)


@needs_build
def test_fused_step_gives_the_same_bits_on_one_thread_and_on_all(monkeypatch):
    """The unit's sums are taken per chunk and added in chunk order, so the thread count does
    not change a bit of the weights, α or the window's state (runs are reproducible across
    machines with other core counts)."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch runs one thread here")
    try:
        torch.set_num_threads(1)
        one, o1 = _run(True, CONFIGS["default"], torch.float32, monkeypatch, steps=24)
    finally:
        torch.set_num_threads(threads)
    many, om = _run(True, CONFIGS["default"], torch.float32, monkeypatch, steps=24)
    for p, q in zip(one, many):
        assert torch.equal(p, q)
    for key in ("alpha", "window_state", "window_energy"):
        assert torch.equal(o1.param_groups[0][key], om.param_groups[0][key]), key


def test_a_build_without_openmp_runs_on_one_thread_with_a_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp

    calls = []

    def load(*args, extra_cflags=(), extra_ldflags=(), **kwargs):
        calls.append(list(extra_cflags))
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("omp.h: no such file")
        return "serial module"

    monkeypatch.setattr(cpp, "load", load)
    monkeypatch.setattr(cpu, "_LOADED", [])
    monkeypatch.delenv("TLR_CPU_KERNEL", raising=False)
    with pytest.warns(RuntimeWarning, match="without OpenMP .*omp.h"):
        assert cpu.extension() == "serial module"
    assert len(calls) == 2 and "-fopenmp" not in calls[1]


def test_a_failed_build_warns_once_and_torch_ops_take_over(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(cpu, "_LOADED", [])
    monkeypatch.delenv("TLR_CPU_KERNEL", raising=False)
    w = torch.randn(5, requires_grad=True)
    opt = TLR([w], lr=0.1, momentum=0.9, window=1)
    w.grad = torch.ones(5)
    with pytest.warns(RuntimeWarning, match="could not be built .*no compiler"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        opt.step()
    assert cpu._LOADED == [None]


def test_no_extension_builder_means_torch_ops_with_a_warning(monkeypatch):
    """torch's extension builder imports setuptools, which a virtual environment may lack: the
    step then runs on torch's ops, it does not raise."""
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", None)  # import raises ImportError
    monkeypatch.setattr(cpu, "_LOADED", [])
    monkeypatch.delenv("TLR_CPU_KERNEL", raising=False)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu.extension() is None


def test_the_environment_can_turn_the_fused_step_off(monkeypatch):
    monkeypatch.setattr(cpu, "_LOADED", [])
    monkeypatch.setenv("TLR_CPU_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.extension() is None


@needs_build
def test_an_early_closing_takes_the_dot_that_the_pass_skipped(monkeypatch):
    """A unit's end that is not scheduled to close leaves P unread; when the blow-up guard
    closes the window there after all, ⟨A, P⟩ is taken then (``_host_dot``). The run is made
    to trip mid-window and agrees with torch's ops."""
    lazy = []
    real = functional._host_dot
    monkeypatch.setattr(functional, "_host_dot", lambda *a: lazy.append(1) or real(*a))

    def run(fused):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(functional, "_cpu_extension", lambda: None)
            gen = torch.Generator().manual_seed(0)
            params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
            opt = TLR(params, lr=0.05, momentum=0.9, window=2, max_window=16, window_reset=0.1)
            states = []
            for t in range(60):
                for p in params:  # noise until the window has grown, then 30 times larger
                    p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * (30.0 if t >= 43 else 1.0)
                opt.step()
                states.append(opt.param_groups[0]["window_state"].tolist())
            return params, opt, states

    fused, fo, fs = run(True)
    assert lazy, "the guard never closed a window early at an unscheduled unit end"
    plain, po, ps = run(False)
    assert fs == ps
    torch.testing.assert_close(fo.param_groups[0]["alpha"], po.param_groups[0]["alpha"], rtol=1e-12, atol=0)
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@needs_build
@pytest.mark.parametrize("cfg", [dict(momentum=0.9, weight_decay=1e-4), dict(momentum=0.9, maximize=True)],
                         ids=["weight-decay", "maximize"])
def test_a_buffer_that_torch_ops_left_non_contiguous_sends_the_step_back_to_them(cfg, monkeypatch):
    """A transposed gradient takes torch's ops, whose momentum buffer (u's own storage) keeps
    the gradient's strides; the next, contiguous step must not hand that buffer to the fused
    step (which takes contiguous tensors only) but run torch's ops again, as a run that never
    had the fused step does."""
    def run(fused):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(functional, "_cpu_extension", lambda: None)
            gen = torch.Generator().manual_seed(0)
            w = torch.randn(32, 64, generator=gen, dtype=torch.float64).requires_grad_()
            opt = TLR([w], lr=0.1, window=2, **cfg)
            for t in range(6):
                g = torch.randn(64, 32, generator=gen, dtype=torch.float64)
                w.grad = g.t() if t == 0 else g.t().contiguous()
                opt.step()
                if t == 0:
                    strided.append(not opt.state[w]["momentum_buffer"].is_contiguous())
            return w, opt

    strided = []
    (a, oa), (b, ob) = run(True), run(False)
    assert strided[0]  # the case this test is about: a buffer with the transposed gradient's strides
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oa.param_groups[0]["alpha"], ob.param_groups[0]["alpha"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-fused", "cpu-torch-ops"])
def test_the_window_is_written_the_same_without_numpy(fused, monkeypatch):
    """The host path writes window_state, window_energy and α through NumPy views where NumPy is
    installed (``functional._host_write``), else with torch's ops: the same run either way."""
    if fused and functional._cpu_extension() is None:
        pytest.skip("the fused CPU step cannot be built here")
    cfg = CONFIGS["default"]
    with_numpy, wo = _run(fused, cfg, torch.float64, monkeypatch, steps=24)

    def no_numpy(self, *args, **kwargs):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    without, nwo = _run(fused, cfg, torch.float64, monkeypatch, steps=24)
    for p, q in zip(with_numpy, without):
        assert torch.equal(p, q)
    ga, gb = wo.param_groups[0], nwo.param_groups[0]
    for key in ("alpha", "window_state", "window_energy"):
        assert torch.equal(ga[key], gb[key]), key
    assert int(ga["window_state"][1]) > 1  # the window grew: states were written at unit ends and closings
