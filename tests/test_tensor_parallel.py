"""Tensor parallelism on the CPU: gloo, 2 and 4 processes (torch.multiprocessing spawn).

A 2-layer Llama-style model (``examples/tensor_parallel.py``: RMSNorm, GQA attention with
rotary embeddings, SiLU-gated MLP; q/k/v, gate/up column-parallel, o/down row-parallel, the LM
head column-parallel with gathered logits) is transformed on every rank. Each rank reports
its scales, outputs, audit ratios and collectives; the test process compares them with each
other and with the single-process transform of the same (unsharded) model.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch

from fxscale.bound import Bound
from fxscale.rules import Arg, evaluate
from fxscale.rules.parallel import _reduced

c10d = torch.ops._c10d_functional
CONFIG = {"d": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "hidden": 128, "vocab": 96, "max_t": 32}
BOUND = 4.0  # declared max |x| of the input hidden states
SHAPE = (2, 8, 64)


def _inputs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*SHAPE, generator=g).clamp(-BOUND, BOUND)


def _extreme(seed: int) -> torch.Tensor:
    """Every element at the declared bound, random signs: the worst case for max |x|."""
    g = torch.Generator().manual_seed(seed)
    return BOUND * torch.randn(*SHAPE, generator=g).sign()


def _collectives(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "_c10d_functional"]


_fx = torch.ops.fxscale
_RUNTIME_AMAX = (_fx.stats.default, _fx.scale_from_amax.default, _fx.scaled_linear_requantise.default)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import fxscale
    from examples.tensor_parallel import llama, parallelise

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = parallelise(llama(**CONFIG))
        x = _inputs(0)
        with pytest.warns(UserWarning, match="static shapes"):
            sm = fxscale.transform(model, (x,), input_bounds=BOUND)
        rows = sm.report.rows
        res = {
            "scales": {r["node"]: r["scale"] for r in rows if r["scale"] is not None},
            "unsound": [(r["node"], r["observed"], r["bound"]) for r in rows
                        if r["observed"] is not None and r["bound"] is not None and r["observed"] > r["bound"]],
            "runtime_amax": [n.name for n in sm.graph.nodes if n.target in _RUNTIME_AMAX],
            "y": sm(_inputs(1)),
            "eager": model(_inputs(1)),
            "y_extreme": sm(_extreme(2)),
            "ratios": [(r["node"], r["ratio"], r["static"]) for r in fxscale.audit(sm, _extreme(3))],
            "collectives": _collectives(sm),
        }
        if world == 2:  # ranks whose graphs differ (a shard of another shape): refused
            import torch.distributed._functional_collectives as funcol
            from torch.fx.experimental.proxy_tensor import make_fx

            from passes.distributed import agree_observed

            gm = make_fx(lambda t: funcol.all_reduce(t * 2, "sum", dist.group.WORLD), tracing_mode="fake")(
                torch.randn(4 + rank, 8))
            try:
                agree_observed(gm)
                res["uneven"] = "no error"
            except ValueError as e:
                res["uneven"] = str(e)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(_worker, args=(world, _free_port(), d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def single():
    """The single-process transform of the unsharded model: outputs on the same inputs."""
    import fxscale
    from examples.tensor_parallel import llama

    model = llama(**CONFIG)
    sm = fxscale.transform(model, (_inputs(0),), input_bounds=BOUND)
    return {"y": sm(_inputs(1)), "y_extreme": sm(_extreme(2)), "eager": model(_inputs(1))}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test__tensor_parallel__ranks_agree_and_match_single_process(world, single):
    ranks = _run(world)
    r0 = ranks[0]
    # Every rank derives identical scales (static: none decided at run time).
    assert r0["scales"], "no scales in the report"
    for r, res in enumerate(ranks[1:], 1):
        assert res["scales"] == r0["scales"], f"rank {r}'s scales differ from rank 0's"
    assert r0["runtime_amax"] == [], f"run-time amax at {r0['runtime_amax']}: scales should all be static"
    # Outputs: replicated logits, the same on every rank, equal to the single-process
    # transform up to float32 summation order (the row-parallel partial sums).
    for res in ranks:
        for key in ("y", "y_extreme"):
            ref = single[key]
            err = (res[key] - ref).abs().max().item() / ref.abs().max().item()
            assert err < 1e-5, f"{key}: relative max difference {err:.3g} from the single-process transform"
        assert torch.allclose(res["eager"], single["eager"], rtol=1e-4, atol=1e-5)  # (the TP model itself)
    # Sound: no observed value beyond its proven bound; audit ratios <= 1 at the declared bound.
    for res in ranks:
        assert res["unsound"] == []
        assert res["ratios"] and all(ratio <= 1.0 for _, ratio, _ in res["ratios"]), max(res["ratios"], key=lambda t: t[1])
        assert all(static for *_, static in res["ratios"])
    # The transformed graph holds the model's own collectives (the plan's: an all-reduce after
    # each row-parallel linear, the logits' all-gather) and nothing more: no amax collective.
    expected = [str(c10d.all_reduce.default), str(c10d.wait_tensor.default)] * (2 * CONFIG["n_layers"])
    expected += [str(c10d.all_gather_into_tensor.default), str(c10d.wait_tensor.default)]
    for res in ranks:
        assert res["collectives"] == expected
    if world == 2:  # refused on every rank, naming the first node that differs
        for res in ranks:
            assert "the ranks captured different graphs" in res["uneven"] and "on rank 1" in res["uneven"], res["uneven"]


# ---------------------------------------------------------------------------- the rules alone
def _uniform(xs: list[torch.Tensor]) -> Bound:
    """One bound valid for every rank's value: the max over ranks of each norm (as agreed)."""
    bs = [Bound.of_tensor(x) for x in xs]
    return Bound(*(max(float(getattr(b, f)) for b in bs) for f in Bound.__dataclass_fields__))


def _holds(b: Bound, actual: torch.Tensor) -> None:
    """Every norm of ``actual`` (computed directly, not through a bound) within ``b``'s."""
    x = actual.double()
    true = {"absmax": x.abs().max(), "rownorm": x.norm(dim=-1).max(), "rowsum": x.abs().sum(-1).max()}
    if x.dim() == 1:  # one row of single-element columns
        true |= {"colnorm": x.abs().max(), "colsum": x.abs().max(), "spectral": x.norm()}
    else:
        true |= {"colnorm": x.norm(dim=-2).max(), "colsum": x.abs().sum(-2).max(),
                 "spectral": torch.linalg.matrix_norm(x, ord=2).max()}
    for f, v in true.items():
        assert float(v) <= float(getattr(b, f)) * (1 + 1e-9), f"{f}: {float(v)} > {getattr(b, f)}"


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("seed", range(4))
def test__reduce_rules__sum_over_ranks_within_sum_of_bounds(n, seed):
    g = torch.Generator().manual_seed(seed)
    # Aligned signs (the worst case for a sum) and independent ones.
    base = torch.randn(6, 8, generator=g)
    xs = [base * (1 + 0.1 * r) if seed % 2 else torch.randn(6, 8, generator=g) for r in range(n)]
    b = _uniform(xs)
    _holds(_reduced(b, "sum", n), torch.stack(xs).sum(0))
    _holds(_reduced(b, "avg", n), torch.stack(xs).mean(0))
    _holds(_reduced(b, "max", n).tighten((6, 8)), torch.stack(xs).amax(0))
    rs = evaluate(c10d.reduce_scatter_tensor.default, (Arg(b, (6, 8)), "sum", n, "0"), {}, [(6 // math.gcd(6, n), 8)])[0]
    _holds(rs, torch.stack(xs).sum(0)[: 6 // math.gcd(6, n)])


@pytest.mark.parametrize("shape", [(8,), (4, 8), (2, 4, 8)])
@pytest.mark.parametrize("n", [2, 4])
def test__all_gather_rule__concatenation_within_bound(shape, n):
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(*shape, generator=g) for _ in range(n)]
    b = _uniform(xs)
    out_shape = (shape[0] * n, *shape[1:])
    got = evaluate(c10d.all_gather_into_tensor.default, (Arg(b, shape), n, "0"), {}, [out_shape])[0]
    _holds(got, torch.cat(xs, 0))


def test__collective_rules__runtime_bounds_are_not_agreed():
    """A measured (0-d tensor) bound may differ across ranks: the result is left unbounded."""
    b = Bound(torch.tensor(1.0), torch.tensor(2.0))
    assert math.isinf(float(_reduced(b, "sum", 2).absmax))
    got = evaluate(c10d.all_gather_into_tensor.default, (Arg(b, (4, 8)), 2, "0"), {}, [(8, 8)])[0]
    assert math.isinf(float(got.absmax))
