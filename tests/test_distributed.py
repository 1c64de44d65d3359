"""DDP and ZeroRedundancyOptimizer on CPU: 2 processes, gloo, against a single-process run.

Each case spawns two ranks; each rank trains on its half of every batch and writes its
final weights and α to a file; the parent compares them with one process training on
the whole batches. float64 models, so that the only differences are the order of
floating-point sums (DDP's gradient average, the all-reduce of the statistics).
"""

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tlr_triton import TLR, TLRAdamW

STEPS = 14
BATCH = 16


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, generator=g, dtype=torch.float64), torch.randn(BATCH, 1, generator=g, dtype=torch.float64))
            for _ in range(STEPS)]


def _groups(model, two_groups):
    params = list(model.parameters())
    if not two_groups:
        return params
    # the second group has one tensor: ZeRO gives it to one rank, the other holds none of it
    return [{"params": params[:-1]}, {"params": params[-1:], "lr": 0.02}]


def _alphas(opt, model):
    """Every α of a TLR: ("group", group index) and ("tensor", the tensor's position in the model)."""
    position = {id(p): i for i, p in enumerate(model.parameters())}
    out = {}
    for gi, g in enumerate(opt.param_groups):
        out[("group", gi)] = float(g["alpha"])
        for p in g["params"]:
            if "alpha" in opt.state.get(p, {}):
                out[("tensor", position[id(p)])] = float(opt.state[p]["alpha"])
    return out


def _train(model, opt, batches, rank=None, world=1, drop_grads=()):
    for t, (x, y) in enumerate(batches):
        if rank is not None:  # this rank's half of the batch
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if t in drop_grads:  # this rank has no gradient at this step
            for p in model.parameters():
                p.grad = None
        opt.step()


def _worker(rank, world, case, out_dir):
    # a file rendezvous: no port to pick, so no clash between tests or with other programs
    # a short timeout: a rank that skipped a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        model = _model()
        kw = dict(case["kw"])
        cls = TLRAdamW if case.get("adamw") else TLR
        if case.get("fsdp"):  # FSDP2: every parameter becomes a DTensor sharded over the ranks
            from torch.distributed.fsdp import fully_shard

            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
            ddp = model
        else:
            ddp = nn.parallel.DistributedDataParallel(model)
        if case.get("fsdp"):
            opt = local = cls(_groups(model, case["two_groups"]), **kw)
            held = None
        elif case["zero"]:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            groups = _groups(model, case["two_groups"])
            first = groups if not case["two_groups"] else groups[0]["params"]
            if case.get("shard_group", True):
                kw["shard_group"] = dist.group.WORLD
            opt = ZeroRedundancyOptimizer(first, optimizer_class=cls, **kw)
            if case["two_groups"]:
                opt.add_param_group(groups[1])
            local = opt.optim
            held = sum(len(g["params"]) for g in local.param_groups)
        else:
            opt = local = cls(_groups(model, case["two_groups"]), **kw)
            held = None
        _train(ddp, opt, _batches(), rank, world, drop_grads=case.get("drop_grads", {}).get(rank, ()))
        weights = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        torch.save({"weights": [p.detach().clone() for p in weights],
                    "group_alphas": [float(g["alpha"]) for g in local.param_groups],
                    "group_sizes": [len(g["params"]) for g in local.param_groups],
                    "alphas": _alphas(local, model), "held": held},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    # No rank tears its connections down while the other may still be in a collective.
    dist.barrier()
    dist.destroy_process_group()
    # Then leave without interpreter finalization: gloo's worker threads can still hold async
    # work (ZeroRedundancyOptimizer's parameter broadcasts) whose tensors are released while
    # the interpreter is torn down, which aborts the process with SIGABRT ("terminate called
    # without an active exception"; seen once here, described in pytorch/pytorch PR 179291).
    # The results are on disk and the process group is destroyed, so nothing is lost.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


CASES = {
    "ddp": dict(zero=False, two_groups=False, kw=dict(lr=0.05, momentum=0.9, weight_decay=1e-2, window=2)),
    "ddp, window auto, scope tensor": dict(zero=False, two_groups=False, kw=dict(lr=0.05, momentum=0.9, scope="tensor")),
    "zero": dict(zero=True, two_groups=False, kw=dict(lr=0.05, momentum=0.9, weight_decay=1e-2, window=2)),
    "zero, window auto": dict(zero=True, two_groups=False, kw=dict(lr=0.05, momentum=0.9, window=1, max_window=4)),
    "zero, scope tensor": dict(zero=True, two_groups=False, kw=dict(lr=0.05, momentum=0.9, window=2, scope="tensor")),
    "zero, a rank without a group's tensors": dict(zero=True, two_groups=True, kw=dict(lr=0.05, momentum=0.9, window=2)),
    "fsdp2": dict(fsdp=True, zero=False, two_groups=False, kw=dict(lr=0.05, momentum=0.9, weight_decay=1e-2, window=2)),
    "fsdp2, scope tensor, window auto": dict(fsdp=True, zero=False, two_groups=True,
                                             kw=dict(lr=0.05, momentum=0.9, scope="tensor", window=1, max_window=4)),
    # TLRAdamW (issue 12): the same cases, its statistic summed the same way
    "adamw ddp": dict(adamw=True, zero=False, two_groups=False, kw=dict(lr=0.01, weight_decay=1e-2, window=2)),
    "adamw zero": dict(adamw=True, zero=True, two_groups=False, kw=dict(lr=0.01, weight_decay=1e-2, window=2)),
    "adamw zero, scope tensor": dict(adamw=True, zero=True, two_groups=False, kw=dict(lr=0.01, window=2, scope="tensor")),
    "adamw zero, a rank without a group's tensors": dict(adamw=True, zero=True, two_groups=True,
                                                         kw=dict(lr=0.01, window=2)),
    "adamw fsdp2": dict(adamw=True, fsdp=True, zero=False, two_groups=False, kw=dict(lr=0.01, weight_decay=1e-2, window=2)),
    "adamw fsdp2, scope tensor": dict(adamw=True, fsdp=True, zero=False, two_groups=True,
                                      kw=dict(lr=0.01, scope="tensor", window=3)),
    # its adaptive window: every rank advances the same window state from the summed statistics
    "adamw zero, window auto, a rank without a group's tensors": dict(
        adamw=True, zero=True, two_groups=True, kw=dict(lr=0.01, window=1, max_window=4)),
    "adamw zero, window auto, scope tensor": dict(adamw=True, zero=True, two_groups=False,
                                                  kw=dict(lr=0.01, window=1, max_window=4, scope="tensor")),
    "adamw fsdp2, window auto, scope tensor": dict(adamw=True, fsdp=True, zero=False, two_groups=True,
                                                   kw=dict(lr=0.01, scope="tensor", window=1, max_window=4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_process(name, tmp_path):
    case = CASES[name]
    mp.start_processes(_worker, args=(2, case, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    model = _model()
    single = (TLRAdamW if case.get("adamw") else TLR)(_groups(model, case["two_groups"]), **case["kw"])
    _train(model, single, _batches())

    for r in ranks:  # every rank holds the single process's weights
        for p, q in zip(r["weights"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
    if not case["zero"]:  # DDP: every rank has the same α, that of the single process, with no extra collective;
        # FSDP2: each rank holds a shard of every tensor, and the all-reduced statistics give the same
        assert ranks[0]["alphas"] == pytest.approx(ranks[1]["alphas"], rel=1e-12)
        assert ranks[0]["alphas"] == pytest.approx(_alphas(single, model), rel=1e-6)  # α is float32: an ulp
        return
    # ZeRO: each rank holds part of every scope; the all-reduced statistics give every rank
    # the single process's α for each group (scope "tensor": the α of the tensors it holds)
    assert all(r["held"] < len(list(model.parameters())) for r in ranks)  # really sharded
    for r in ranks:
        assert r["group_alphas"] == pytest.approx([float(g["alpha"]) for g in single.param_groups], rel=1e-6)
    if case["two_groups"]:
        assert sorted(r["group_sizes"][1] for r in ranks) == [0, 1]  # one rank held none of group 1
    if case["kw"].get("scope") == "tensor":
        expected = _alphas(single, model)
        held = {k: v for r in ranks for k, v in r["alphas"].items() if k[0] == "tensor"}
        assert held and all(k in expected for k in held)
        assert held == pytest.approx({k: expected[k] for k in held}, rel=1e-6)


@pytest.mark.parametrize("name", ["zero", "adamw zero"])
def test_zero_without_shard_group_gives_each_rank_its_own_alpha(name, tmp_path):
    """The control: without the all-reduce, each rank's α sees only its shard and the ranks disagree."""
    case = dict(CASES[name], shard_group=False)
    mp.start_processes(_worker, args=(2, case, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["group_alphas"][0] != pytest.approx(ranks[1]["group_alphas"][0], rel=1e-3)


@pytest.mark.parametrize("name", ["zero", "adamw zero"])
def test_zero_rank_without_gradients_still_joins_the_collective(name, tmp_path):
    """Rank 1 has no gradient at steps 3 (a closing) and 4: it must still take part in the all-reduce
    (otherwise rank 0 would wait forever), and both ranks keep the same α."""
    case = dict(CASES[name], drop_grads={1: (3, 4)})
    mp.start_processes(_worker, args=(2, case, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["group_alphas"] == pytest.approx(ranks[1]["group_alphas"], rel=1e-12)
    for p, q in zip(ranks[0]["weights"], ranks[1]["weights"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # ZeRO broadcasts every shard from its owner


@pytest.mark.parametrize("name", ["adamw zero, window auto, a rank without a group's tensors",
                                  "adamw zero, window auto, scope tensor"])
def test_no_rank_with_gradients_at_a_unit_end_leaves_the_window_as_it_is(name, tmp_path):
    """Steps where no rank holds a gradient, at ends of units of the adaptive window: every rank
    still joins the sums (with zeros), and the window stays as it is — as one process that steps
    without gradients (a review found the window advanced, closing with zero statistics)."""
    drop = (5, 9, 10)
    case = dict(CASES[name], drop_grads={0: drop, 1: drop})
    mp.start_processes(_worker, args=(2, case, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = _model()
    single = TLRAdamW(_groups(model, case["two_groups"]), **case["kw"])
    _train(model, single, _batches(), drop_grads=drop)
    for r in ranks:
        for p, q in zip(r["weights"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
        assert r["group_alphas"] == pytest.approx([float(g["alpha"]) for g in single.param_groups], rel=1e-6)
