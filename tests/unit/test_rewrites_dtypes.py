"""The dtype and 0-d rewrites of ``xla_backend.rewrites``, on CPU graphs, no XLA.

Each case traces a function to an aten graph with ``make_fx`` (fake tensors, as
AOTAutograd hands the backend), rewrites it, and checks that the rewritten graph gives
eager's result on real inputs, that it has the expected shape (casts in front of the
op, no ``dim=0`` op of a 0-d tensor, no gather from an empty tensor, a chain of 0-d
float32 ops in float64), and that every node's ``meta["val"]`` still agrees with what
the node computes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from xla_backend.rewrites import ATEN_REWRITES
from xla_backend.rewrites.nan_semantics import NAN_SEMANTICS
from xla_backend.rewrites.scalar_doubles import SCALAR_DOUBLES
from xla_backend.rewrites.type_promotion import promote_dtypes
from xla_backend.rewrites.zero_dim import unsqueeze_0d_dims, zeros_for_empty_inputs

aten = torch.ops.aten


def _graph(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.fx.GraphModule:
    return make_fx(fn, tracing_mode="fake")(*inputs)


def _calls(gm: torch.fx.GraphModule, target: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _run_checked(gm: torch.fx.GraphModule, *inputs: torch.Tensor) -> object:
    """Runs ``gm`` node by node, checking each value against its ``meta["val"]``."""
    env: dict[torch.fx.Node, object] = {}
    it = iter(inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it)
        elif node.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = node.target(*args, **kwargs)
            got, want = env[node], node.meta.get("val")
            if isinstance(want, torch.Tensor):
                assert isinstance(got, torch.Tensor), node.format_node()
                assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), (
                    f"{node.format_node()}: {got.dtype}{tuple(got.shape)} but meta says "
                    f"{want.dtype}{tuple(want.shape)}")
        elif node.op == "output":
            return torch.fx.node.map_arg(node.args[0], env.__getitem__)
    raise AssertionError("no output node")


def _assert_same(got: object, want: object) -> None:
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, equal_nan=True)


def _rewrites_like_eager(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor
                         ) -> torch.fx.GraphModule:
    gm = _graph(fn, *inputs)
    # the NaN rewrite replaces clamp and argmax themselves; tests/xla/test_rewrites_nan.py
    modified = [p(gm).modified for p in ATEN_REWRITES if p is not NAN_SEMANTICS]
    assert any(modified), gm.code
    _assert_same(_run_checked(gm, *[x.clone() for x in inputs]), fn(*[x.clone() for x in inputs]))
    return gm


INT = torch.tensor([3, -2, 0])
BOOL = torch.tensor([True, False, True])

PROMOTION = {
    "clamp-int-by-float": (lambda t: t.clamp(-1.5, 1.5), INT, aten.clamp.default),
    "clamp_min-int-by-float": (lambda t: torch.clamp_min(t, 0.5), INT, aten.clamp_min.default),
    "clamp-bool-by-int": (lambda t: t.clamp(min=-2, max=2), BOOL, aten.clamp.default),
    "clamp-int-by-float-tensors": (lambda t: t.clamp(t * 0.5, t * 1.5), INT, aten.clamp.Tensor),
    "remainder-int-by-float": (lambda t: t % 1.5, INT, aten.remainder.Scalar),
    "where-bool-and-int": (lambda t: torch.where(t > 0, t > 1, t), INT, aten.where.self),
    "where-int-and-float": (lambda t: torch.where(t > 0, t, t * 0.5), INT, aten.where.self),
    "cat-bool-and-int": (lambda t: torch.cat([t > 0, t]), INT, aten.cat.default),
    "exp-of-bool": (torch.exp, BOOL, aten.exp.default),
    "sigmoid-of-bool": (torch.sigmoid, BOOL, aten.sigmoid.default),
    "sqrt-of-bool": (torch.sqrt, BOOL, aten.sqrt.default),
    "mul-bool-by-float": (lambda t: t * 0.5, BOOL, aten.mul.Tensor),
    "cumsum-of-bool": (lambda t: t.cumsum(0), BOOL, aten.cumsum.default),
    "cumprod-of-bool": (lambda t: t.cumprod(0), BOOL, aten.cumprod.default),
}


@pytest.mark.parametrize("case", sorted(PROMOTION))
def test_operands_are_cast_to_the_result_dtype(case):
    fn, x, target = PROMOTION[case]
    gm = _rewrites_like_eager(fn, x)
    (op,) = _calls(gm, target)
    want = op.meta["val"].dtype
    for arg in op.all_input_nodes:
        val = arg.meta["val"]
        if val.dtype != want:
            assert op.target is aten.where.self and arg is op.args[0], op.format_node()
    assert _calls(gm, aten._to_copy.default), gm.code


def test_where_condition_and_masked_fill_mask_stay_bool():
    def fn(t):
        return torch.where(t, t * 0.5, 2.0).masked_fill(t, 1.0)

    gm = _rewrites_like_eager(fn, BOOL)
    (where,) = _calls(gm, aten.where.self)
    (fill,) = _calls(gm, aten.masked_fill.Scalar)
    assert where.args[0].meta["val"].dtype == torch.bool
    assert fill.args[1].meta["val"].dtype == torch.bool


def test_ops_of_one_dtype_and_comparisons_are_left_alone():
    def fn(t, u):
        return t.clamp(-1, 1), torch.where(t > 0, t, u), t < 0.5, (t > 0) & (u > 0)

    gm = _graph(fn, INT, INT.flip(0))
    assert not promote_dtypes(gm).modified
    assert not _calls(gm, aten._to_copy.default)


def test_subtraction_of_a_bool_tensor_still_raises_as_in_eager():
    gm = _graph(lambda t: t - 0.5, BOOL)  # the meta kernel lets it through
    assert not promote_dtypes(gm).modified
    with pytest.raises(RuntimeError, match="Subtraction"):
        gm(BOOL)


ZERO_D = {
    "sum": (lambda t: t.sum(0), aten.sum.dim_IntList),
    "sum-keepdim": (lambda t: t.sum(-1, keepdim=True), aten.sum.dim_IntList),
    "mean": (lambda t: t.mean(0), aten.mean.dim),
    "amax": (lambda t: t.amax(0), aten.amax.default),
    "argmax": (lambda t: t.argmax(0), aten.argmax.default),
    "argmax-keepdim": (lambda t: t.argmax(0, keepdim=True), aten.argmax.default),
    "cumsum": (lambda t: t.cumsum(0), aten.cumsum.default),
    "max-dim": (lambda t: t.max(0), aten.max.dim),
    "min-dim-keepdim-values": (lambda t: t.min(-1, keepdim=True).values * 2, aten.min.dim),
    "sort": (lambda t: t.sort(0), aten.sort.default),
    "topk": (lambda t: t.topk(1, 0), aten.topk.default),
    "flip": (lambda t: t.flip(0), aten.flip.default),
    "var": (lambda t: t.var(0, correction=0), aten.var.correction),
    "norm": (lambda t: t.norm(dim=0), aten.linalg_vector_norm.default),
    "softmax": (lambda t: t.softmax(0), aten._softmax.default),
    "squeeze": (lambda t: (t * 2).squeeze(0), aten.squeeze.dim),
    "index_select": (lambda t: t.index_select(0, torch.zeros(1, dtype=torch.long)),
                     aten.index_select.default),
    "index_select-0d-index": (lambda t: t.index_select(0, torch.zeros((), dtype=torch.long)),
                              aten.index_select.default),
    "gather": (lambda t: torch.gather(t, 0, torch.zeros((), dtype=torch.long)),
               aten.gather.default),
    "index_copy": (lambda t: t.index_copy(0, torch.zeros((), dtype=torch.long), t * 2),
                   aten.index_copy.default),
    "scatter_add": (lambda t: t.scatter_add(0, torch.zeros((), dtype=torch.long), t),
                    aten.scatter_add.default),
}


@pytest.mark.parametrize("case", sorted(ZERO_D))
def test_dim_ops_of_a_0d_tensor_see_a_1d_one(case):
    fn, target = ZERO_D[case]
    gm = _rewrites_like_eager(fn, torch.tensor(1.5))
    (op,) = _calls(gm, target)
    assert op.args[0].meta["val"].dim() == 1, gm.code


def test_ops_over_all_dims_of_a_0d_tensor_are_left_alone():
    gm = _graph(lambda t: (t.sum(), t.amax([]), t.argmax()), torch.tensor(1.5))
    assert not unsqueeze_0d_dims(gm).modified


@pytest.mark.parametrize("shape,dim", [((0, 4), 1), ((3, 0), 0), ((2, 0, 3), 2)])
def test_gather_from_an_empty_tensor_is_zeros_of_the_index_shape(shape, dim):
    def fn(t):
        index_shape = list(t.shape)
        index_shape[dim] = 2 if dim == len(shape) - 1 and 0 not in shape[dim:] else 0
        return torch.gather(t, dim, torch.zeros(index_shape, dtype=torch.long))

    gm = _rewrites_like_eager(fn, torch.zeros(shape))
    assert not _calls(gm, aten.gather.default), gm.code
    (zeros,) = _calls(gm, aten.new_zeros.default)
    assert zeros.meta["val"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("op", ["cumsum", "cumprod"])
def test_scan_over_an_empty_dim_is_zeros_of_its_shape(op, dtype):
    gm = _rewrites_like_eager(lambda t: getattr(t, op)(1), torch.zeros(2, 0, dtype=dtype))
    assert not _calls(gm, getattr(aten, op).default), gm.code


def test_gather_from_a_nonempty_tensor_is_left_alone():
    gm = _graph(lambda t: torch.gather(t, 1, torch.zeros((2, 0), dtype=torch.long)),
                torch.ones(2, 3))
    assert not zeros_for_empty_inputs(gm).modified


# --- chains of 0-d float32 ops in float64 (scalar_doubles) -------------------------------

BETA2 = 0.9999
RHO_INF = 2 / (1 - BETA2) - 1


def _rho(step):
    """RAdam's length of the approximated SMA at ``step``: cancels near 5."""
    return RHO_INF - 2 * step * BETA2 ** step / (1 - BETA2 ** step)


def _rectified(step, x):
    """RAdam's capturable rectification, and the counter's update, as torch writes them."""
    rho = _rho(step)
    rect = ((rho - 4) * (rho - 2) * RHO_INF / ((RHO_INF - 4) * (RHO_INF - 2) * rho)) ** 0.5
    return torch.where(rho > 5, x * rect, x), step + 1


def _scalar_doubles(gm: torch.fx.GraphModule) -> bool:
    modified = SCALAR_DOUBLES(gm).modified
    for node in gm.graph.nodes:  # no float64 leaves a chain
        if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor):
            if node.meta["val"].dtype == torch.float64:
                assert all(u.op != "output" for u in node.users), gm.code
    return modified


@pytest.mark.parametrize("counter", [torch.tensor(6.0), torch.tensor(6)], ids=["float", "int"])
def test_a_cancelling_scalar_chain_is_computed_as_eager_computes_python_floats(counter):
    x = torch.tensor([1.0, -2.0, 3.0])
    rho = _rho(6.0)  # Python doubles, as eager's non-capturable RAdam at step 6
    rect = ((rho - 4) * (rho - 2) * RHO_INF / ((RHO_INF - 4) * (RHO_INF - 2) * rho)) ** 0.5
    want = x * torch.tensor(rect, dtype=torch.float32)

    def fn(step, x):
        return _rectified(step.float(), x)

    gm = _graph(fn, counter, x)
    float32, _ = gm(counter, x)
    assert not torch.allclose(float32, want, rtol=0.1), "float32 should cancel"
    assert _scalar_doubles(gm)
    got, new_counter = _run_checked(gm, counter, x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert new_counter.dtype == torch.float32 and float(new_counter) == 7.0
    (gt,) = _calls(gm, aten.gt.Scalar)
    assert gt.args[0].meta["val"].dtype == torch.float64  # compared as a double


def test_foreach_chains_over_step_counters_are_widened_too():
    def fn(s1, s2, x):
        corrections = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(BETA2, [s1, s2])), 1)
        return [x / c.sqrt() for c in corrections]

    s1, s2, x = torch.tensor(1.0), torch.tensor(3.0), torch.tensor([1.0, 2.0])
    gm = _graph(fn, s1, s2, x)
    assert _scalar_doubles(gm)
    got = _run_checked(gm, s1, s2, x)
    for value, step in zip(got, (1, 3)):
        want = x / torch.tensor((1 - BETA2 ** step) ** 0.5, dtype=torch.float32)
        torch.testing.assert_close(value, want, rtol=1e-6, atol=0)
    assert _calls(gm, aten._foreach_pow.ScalarAndTensor)[0].meta["val"][0].dtype == torch.float64


def test_single_scalar_ops_and_scalars_of_tensors_are_left_alone():
    def fn(s, x):
        return x * (s + 1), x.sum() * 2 + 1, s * x.mean()

    s, x = torch.tensor(2.0), torch.tensor([1.0, 2.0])
    gm = _graph(fn, s, x)
    assert not SCALAR_DOUBLES(gm).modified
    assert not _calls(gm, aten._to_copy.default)
