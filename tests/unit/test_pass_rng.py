"""functionalize_rng: random aten ops become a function of a trailing seed input.

The graphs come from plain torch on CPU (make_fx, AOTAutograd), so no XLA is needed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from functorch.compile import aot_function, make_boxed_func
from torch.fx.experimental.proxy_tensor import make_fx

from passes.base import GraphPass
from passes.rng import (
    RNG_SEED_NAME,
    SUPPORTED_TARGETS,
    _EagerOps,
    _mix64,
    functionalize_rng,
)

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _one_thread():
    """Small elementwise graphs run fastest single-threaded, most of all on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rewrite(fn: Callable[..., Any], *args: Any, **make_fx_kwargs: Any) -> torch.fx.GraphModule:
    gm = make_fx(fn, **make_fx_kwargs)(*args)
    result = functionalize_rng(gm)
    assert result.modified
    assert result.graph_module is gm
    return gm


def _seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _targets(gm: torch.fx.GraphModule) -> set[Any]:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _random_targets(gm: torch.fx.GraphModule) -> set[Any]:
    tag = torch.Tag.nondeterministic_seeded
    return {t for t in _targets(gm) if isinstance(t, torch._ops.OpOverload) and tag in t.tags}


# --------------------------------------------------------------------------
# The generator itself
# --------------------------------------------------------------------------


def _splitmix64_reference(state: int, count: int) -> list[int]:
    """Textbook SplitMix64 on Python ints (mod 2**64)."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def _signed(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


def test_int64_mix_matches_textbook_splitmix64():
    # counters G, 2G, 3G, ... are SplitMix64's states from seed 0 and seed 2**63 + 5
    for start in (0, 2**63 + 5):
        states = [(start + (i + 1) * 0x9E3779B97F4A7C15) % 2**64 for i in range(64)]
        got = _mix64(_EagerOps(), torch.tensor([_signed(s) for s in states], dtype=torch.int64))
        want = [_signed(v) for v in _splitmix64_reference(start, 64)]
        assert got.tolist() == want
    assert _splitmix64_reference(0, 1)[0] == 0xE220A8397B1DCDAF  # published first output


def test_pass_object_and_supported_targets():
    assert isinstance(functionalize_rng, GraphPass)
    assert functionalize_rng.name == "functionalize_rng"
    assert functionalize_rng.version == 1
    assert aten.native_dropout.default in SUPPORTED_TARGETS
    assert aten.rand_like.default in SUPPORTED_TARGETS


# --------------------------------------------------------------------------
# Contract: trailing seed in, trailing seed + 1 out; untouched without randomness
# --------------------------------------------------------------------------


def test_graph_without_randomness_is_untouched():
    gm = make_fx(lambda x: torch.relu(x) * 2)(torch.rand(3))
    before = gm.code
    result = functionalize_rng(gm)
    assert not result.modified
    assert gm.code == before
    assert all(n.name != RNG_SEED_NAME for n in gm.graph.nodes)


def test_seed_is_last_input_and_next_seed_is_last_output():
    x = torch.rand(4, 5)
    gm = _rewrite(lambda x, y: (torch.rand_like(x) + y, x * 2), x, x)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[-1].name == RNG_SEED_NAME
    assert len(placeholders) == 3
    seed_val = placeholders[-1].meta["val"]
    assert seed_val.shape == () and seed_val.dtype == torch.int64
    assert not _random_targets(gm)

    out = gm(x, x, _seed(41))
    assert isinstance(out, tuple) and len(out) == 3
    assert out[-1].dtype == torch.int64 and out[-1].item() == 42
    torch.testing.assert_close(out[1], x * 2)


def test_single_output_becomes_pair_and_list_output_stays_list():
    x = torch.rand(8)
    gm = _rewrite(lambda x: torch.rand_like(x), x)
    out = gm(x, _seed(0))
    assert isinstance(out, tuple) and len(out) == 2 and out[1].item() == 1

    gm = make_fx(lambda x: torch.rand_like(x) + x)(x)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ([output.args[0], next(iter(gm.graph.nodes))],)
    gm.recompile()
    assert functionalize_rng(gm).modified
    out = gm(x, _seed(9))
    assert isinstance(out, list) and len(out) == 3 and out[2].item() == 10


def test_new_nodes_carry_fake_values():
    gm = _rewrite(lambda x: F.dropout(x, 0.5, True) + torch.randn_like(x), torch.rand(6, 3))
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, node.name


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------


@pytest.mark.parametrize("decompose", [False, True])
def test_dropout_scaling_mask_and_keep_fraction(decompose: bool):
    p = 0.3
    x = torch.rand(400, 500) + 0.5  # no zeros, so a zero output means dropped
    kwargs: dict[str, Any] = {}
    if decompose:
        from torch._decomp import core_aten_decompositions

        kwargs["decomposition_table"] = core_aten_decompositions()
    gm = _rewrite(lambda x: F.dropout(x, p, True), x, **kwargs)
    assert not _random_targets(gm)

    y, next_seed = gm(x, _seed(3))
    assert y.shape == x.shape and y.dtype == x.dtype and next_seed.item() == 4
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005


def test_native_dropout_returns_output_and_bool_mask():
    p = 0.25
    x = torch.randn(300, 200)
    gm = _rewrite(lambda x: aten.native_dropout(x, p, True), x)
    out, mask, _ = gm(x, _seed(11))
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, x * mask / (1 - p))
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01


def test_dropout_masks_depend_only_on_seed():
    x = torch.ones(64, 64)
    gm = _rewrite(lambda x: aten.native_dropout(x, 0.5, True), x)
    _, m1, _ = gm(x, _seed(5))
    _, m1_again, _ = gm(x, _seed(5))
    _, m2, _ = gm(x, _seed(6))
    assert torch.equal(m1, m1_again)
    assert not torch.equal(m1, m2)
    # different seeds give (nearly) independent masks, not shifted copies
    assert abs((m1 == m2).float().mean().item() - 0.5) < 0.05


def test_two_dropouts_in_one_graph_are_independent():
    x = torch.ones(256, 256)

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return aten.native_dropout(x, 0.5, True)[1], aten.native_dropout(x, 0.5, True)[1]

    gm = _rewrite(f, x)
    m1, m2, _ = gm(x, _seed(0))
    assert abs((m1 == m2).float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize(("p", "train"), [(0.0, True), (1.0, True), (0.5, False)])
def test_dropout_edge_cases_match_pytorch(p: float, train: bool):
    x = torch.randn(10, 10)
    gm = _rewrite(lambda x: aten.native_dropout(x, p, train), x)
    out, mask, _ = gm(x, _seed(1))
    want_out, want_mask = aten.native_dropout(x, p, train)
    assert torch.equal(out, want_out)
    assert torch.equal(mask, want_mask)
    assert mask.dtype == torch.bool


# --------------------------------------------------------------------------
# rand / randn / bernoulli / uniform / normal / randint
# --------------------------------------------------------------------------


def test_uniform_statistics_and_no_adjacent_correlation():
    x = torch.empty(1000, 1000)
    gm = _rewrite(lambda x: (torch.rand_like(x), torch.rand_like(x)), x)
    u, v, _ = gm(x, _seed(2024))
    w, _, _ = gm(x, _seed(2025))
    u, v, w = u.flatten().double(), v.flatten().double(), w.flatten().double()
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.002
    assert abs(u.var().item() - 1 / 12) < 0.001
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.005
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.005  # two ops
    assert abs(torch.corrcoef(torch.stack([u, w]))[0, 1].item()) < 0.005  # two seeds
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert (counts - 1e5).abs().max().item() < 2000


def test_randn_statistics():
    gm = _rewrite(lambda: torch.randn(1000, 1000))
    (z, _) = gm(_seed(7))
    z = z.flatten().double()
    assert z.shape == (1_000_000,)
    assert abs(z.mean().item()) < 0.005
    assert abs(z.std().item() - 1.0) < 0.005
    assert abs((z**4).mean().item() - 3.0) < 0.05  # gaussian kurtosis
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 0.005


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_factory_dtypes_respected(dtype: torch.dtype):
    def f() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(200, 300, dtype=dtype), torch.randn(4, 5, dtype=dtype)

    gm = _rewrite(f)
    u, z, _ = gm(_seed(13))
    assert u.dtype == dtype and u.shape == (200, 300)
    assert z.dtype == dtype and z.shape == (4, 5)
    assert u.min().item() >= 0.0 and u.max().item() < 1.0  # never rounds up to 1
    assert abs(u.float().mean().item() - 0.5) < 0.01


def test_bernoulli_variants():
    probs = torch.full((500, 400), 0.2)

    def f(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            torch.bernoulli(x),  # bernoulli.default: x holds probabilities
            torch.bernoulli(x, 0.7),  # bernoulli.p
            aten.bernoulli.Tensor(x, torch.ones_like(x) * 0.5),
            torch.empty_like(x).bernoulli_(0.9),  # in-place on a fresh tensor
        )

    gm = _rewrite(f, probs)
    assert not _random_targets(gm)
    a, b, c, d, _ = gm(probs, _seed(0))
    for t, want in ((a, 0.2), (b, 0.7), (c, 0.5), (d, 0.9)):
        assert t.dtype == probs.dtype and t.shape == probs.shape
        assert set(t.unique().tolist()) <= {0.0, 1.0}
        assert abs(t.mean().item() - want) < 0.01


def test_uniform_and_normal_parameters():
    x = torch.empty(500, 400)

    def f(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            torch.empty_like(x).uniform_(-2.0, 3.0),
            torch.empty_like(x).normal_(5.0, 0.5),
            torch.normal(torch.full_like(x, -1.0), torch.full_like(x, 2.0)),
            torch.normal(3.0, 4.0, size=(500, 400)),
        )

    gm = _rewrite(f, x)
    assert not _random_targets(gm)
    u, n1, n2, n3, _ = gm(x, _seed(77))
    assert -2.0 <= u.min().item() and u.max().item() <= 3.0
    assert abs(u.mean().item() - 0.5) < 0.02
    for n, mean, std in ((n1, 5.0, 0.5), (n2, -1.0, 2.0), (n3, 3.0, 4.0)):
        assert n.shape == x.shape and n.dtype == torch.float32
        assert abs(n.mean().item() - mean) < 0.02 * std + 0.01
        assert abs(n.std().item() - std) < 0.02 * std


def test_randint_range_and_dtype():
    def f(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.randint(3, 13, (1000, 100)), torch.randint_like(x, 5)

    x = torch.empty(50, 60)
    gm = _rewrite(f, x)
    r, rl, _ = gm(x, _seed(4))
    assert r.dtype == torch.int64 and r.shape == (1000, 100)
    assert set(r.unique().tolist()) == set(range(3, 13))
    counts = torch.bincount(r.flatten() - 3).double()
    assert (counts / counts.sum() - 0.1).abs().max().item() < 0.005
    assert rl.dtype == x.dtype and rl.shape == x.shape
    assert set(rl.unique().tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_random_ops_feeding_random_ops_and_chained_in_place_ops():
    def f(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probs = torch.rand_like(x)
        e = torch.empty_like(x)
        e.uniform_()
        e.normal_(2.0, 1.0)  # overwrites the uniform numbers in place
        return torch.bernoulli(probs), probs, e, x.clone().bernoulli_(0.25)

    x = torch.empty(400, 500)
    gm = _rewrite(f, x)
    assert not _random_targets(gm)
    assert aten.empty_like.default not in _targets(gm)  # the filled buffers are gone
    hits, probs, e, b, _ = gm(x, _seed(8))
    assert abs(hits.mean().item() - 0.5) < 0.01
    # bernoulli(probs) draws with exactly these probabilities: P(hit | p) = p
    assert abs(hits[probs < 0.1].mean().item() - 0.05) < 0.01
    assert abs(hits[probs > 0.9].mean().item() - 0.95) < 0.01
    assert abs(e.mean().item() - 2.0) < 0.01 and abs(e.std().item() - 1.0) < 0.01
    assert abs(b.mean().item() - 0.25) < 0.01


def test_symbolic_shapes():
    def f(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, True) + torch.rand_like(x)

    gm = _rewrite(f, torch.rand(5, 7), tracing_mode="symbolic")
    for shape in ((3, 4), (10, 2)):
        y, _ = gm(torch.ones(shape), _seed(1))
        assert y.shape == shape


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def test_unknown_random_op_raises_naming_it_and_leaves_graph_alone():
    gm = make_fx(lambda p: torch.multinomial(p, 2))(torch.rand(4, 6))
    before = gm.code
    with pytest.raises(NotImplementedError, match="multinomial"):
        functionalize_rng(gm)
    assert gm.code == before


def test_generator_argument_raises():
    graph = torch.fx.Graph()
    generator = graph.placeholder("generator")
    rand = graph.call_function(aten.rand.generator, ([2, 3],), {"generator": generator})
    graph.output((rand,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(NotImplementedError, match=r"aten\.rand\.generator.*Generator"):
        functionalize_rng(gm)


def test_in_place_random_op_on_aliased_tensor_raises():
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        v = y.view(-1)
        v.uniform_()
        return y

    gm = make_fx(f)(torch.rand(3, 4))
    assert aten.uniform_.default in _targets(gm)
    with pytest.raises(NotImplementedError, match="uniform_"):
        functionalize_rng(gm)


def test_random_op_inside_a_subgraph_raises():
    gm = make_fx(lambda x: x + 1)(torch.rand(3))
    gm.add_submodule("branch", make_fx(lambda x: torch.rand_like(x))(torch.rand(3)))
    with pytest.raises(NotImplementedError, match=r"rand_like.*subgraph 'branch'"):
        functionalize_rng(gm)


def test_attention_without_dropout_is_not_random():
    q = torch.rand(2, 2, 3, 4)
    gm = make_fx(lambda q: F.scaled_dot_product_attention(q, q, q))(q)
    assert _random_targets(gm)  # tagged nondeterministic_seeded, yet dropout_p == 0
    assert not functionalize_rng(gm).modified


# --------------------------------------------------------------------------
# Through AOTAutograd: the rewritten forward trains
# --------------------------------------------------------------------------


def test_aot_autograd_dropout_forward_and_backward():
    p = 0.4
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(p))
    forward_graphs: list[torch.fx.GraphModule] = []
    seed = [_seed(100)]

    def fw_compiler(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        assert aten.native_dropout.default in _targets(gm)
        assert functionalize_rng(gm).modified
        forward_graphs.append(gm)

        def run(args: list[Any]) -> Any:
            # The runtime's side of the contract: feed the seed, keep the next one.
            *outs, seed[0] = gm(*args, seed[0])
            args.clear()
            return outs

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def bw_compiler(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        assert not functionalize_rng(gm).modified  # the backward only reads the mask
        return make_boxed_func(gm.forward)

    weight, bias = model[0].weight, model[0].bias

    def step(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.dropout(F.linear(x, w, b), p, True)

    compiled = aot_function(step, fw_compiler=fw_compiler, bw_compiler=bw_compiler)
    x = torch.randn(8, 16, requires_grad=True)
    hidden = F.linear(x, weight, bias).detach()

    y = compiled(x, weight, bias)
    assert len(forward_graphs) == 1
    mask = y != 0
    torch.testing.assert_close(y, hidden * mask / (1 - p))
    assert 0.3 < mask.float().mean().item() < 0.9

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    # d y / d hidden = mask / (1 - p); chain through the linear layer by hand.
    grad_hidden = grad_out * mask / (1 - p)
    torch.testing.assert_close(x.grad, grad_hidden @ weight.detach())
    torch.testing.assert_close(weight.grad, grad_hidden.t() @ x.detach())
    assert seed[0].item() == 101

    y2 = compiled(x, weight, bias)  # the fed-back seed gives a fresh mask
    assert not torch.equal(y2 != 0, mask)
    assert seed[0].item() == 102


def test_aot_forward_graph_is_rewritten_and_returns_mask_for_backward():
    captured: list[torch.fx.GraphModule] = []

    def fw_compiler(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        captured.append(gm)
        return make_boxed_func(gm.forward)

    fn = aot_function(lambda x: F.dropout(x, 0.5, True), fw_compiler=fw_compiler)
    fn(torch.rand(4, 4, requires_grad=True))
    gm = captured[0]
    n_outputs = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    assert functionalize_rng(gm).modified
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert not getitems and not _random_targets(gm)
    x = torch.rand(4, 4) + 1
    out = gm(x, _seed(0))
    assert len(out) == n_outputs + 1
    y, mask = out[0], out[1]
    assert mask.dtype == torch.bool
    torch.testing.assert_close(y, x * mask * 2.0)
