"""Make randomness an explicit function of a seed input (``functionalize_rng``).

Why: the backend traces each aten graph once and then replays the compiled XLA
computation. torch_xla's random ops take their seed from a device-data constant
captured while tracing, so every replay would draw the same numbers: identical
dropout masks every step. This pass removes the random aten ops and computes
counter-based pseudo-random numbers from plain integer aten ops on a seed that
the graph receives as an input. Same seed, same numbers, on every backend.

Contract (it holds exactly when the pass reports ``modified=True``):

* inputs gain one trailing int64 0-d seed: a placeholder named ``rng_seed``
  after all existing placeholders;
* outputs gain one trailing next seed, ``rng_seed + 1``: a tuple or list output
  gets one more element (same container type); a graph that returned a single
  value now returns the 2-tuple ``(value, next_seed)``.

The runtime feeds each call's next seed into the following call, so the seed
stays on the device and no host round trip is needed. Graphs without random
ops are left untouched (``modified=False``) and take no seed.

Generator (all arithmetic is int64 with wraparound, arithmetic right shifts
masked to act as logical shifts, constants >= 2**63 written as negative int64;
int64 must stay 64-bit on the device, i.e. ``XLA_USE_32BIT_LONG`` unset):

* ``seedmix = mix64(rng_seed)``, once per graph, where ``mix64`` is the
  SplitMix64 finaliser (a bijection on 64-bit words);
* random op number ``k`` (graph order) draws element ``i`` (row-major index) as
  ``h = mix64(seedmix + G * (k * 2**40 + i))`` with ``G`` the SplitMix64 golden
  gamma. Within one seed every (op, element) pair gets a distinct counter, so
  streams never overlap (ops must have < 2**40 elements, graphs < 2**21 ops);
* uniform ``[0, 1)``: the top ``m`` bits of ``h`` times ``2**-m``, where ``m``
  is the significand width of the output dtype (at most 24, computed in
  float32; 53 for float64, computed in float64), so the cast to the output
  dtype is exact and never rounds up to 1;
* normal: Box-Muller. In float32 both uniforms come from disjoint 24-bit fields
  of one ``h`` (tails reach about 5.8 sigma); float64 draws a second ``h`` at
  counter offset ``2**62``;
* bernoulli / dropout: a 24-bit uniform compared with the probability;
* randint: ``h >>> 1`` (63 bits) modulo the range (bias < range / 2**63).

The rewritten aten overloads are listed in ``SUPPORTED_TARGETS``. In-place ones
(``bernoulli_``, ``uniform_``, ``normal_``, as make_fx records dropout and
``empty(...).uniform_()``) are rewritten when they fill a fresh tensor.

Random ops this pass cannot rewrite (a user ``Generator``, an in-place random
op whose target may be aliased, an op it does not know) raise
``NotImplementedError`` naming the op, before the graph is touched, so the
backend can fall back. Ops tagged ``nondeterministic_seeded`` only because they
*may* use randomness (scaled-dot-product attention with ``dropout_p=0``, RNNs
with ``dropout=0`` or ``train=False``) are left alone.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx import Node
from torch.fx.node import map_arg

from .base import GraphPass, PassResult

log = logging.getLogger(__name__)

aten = torch.ops.aten

__all__ = ["RNG_SEED_NAME", "SUPPORTED_TARGETS", "functionalize_rng"]

RNG_SEED_NAME = "rng_seed"

_U64 = 1 << 64


def _s64(value: int) -> int:
    """Two's-complement view of a 64-bit word, so it fits an int64 scalar."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)
_STREAM_SHIFT = 40  # counter space per op: 2**40 elements
_MAX_STREAMS = 1 << 21  # k * 2**40 stays below the 2**62 second-draw offset
_SECOND_DRAW = 1 << 62
_MAX_NUMEL = 1 << _STREAM_SHIFT

# A value while emitting: an fx Node when building a graph, a Tensor when eager.
Value = Any


# --------------------------------------------------------------------------
# Emitting ops: the same arithmetic runs eagerly (tests) or records fx nodes.
# --------------------------------------------------------------------------


class _EagerOps:
    """Runs each op at once; lets tests check the arithmetic against references."""

    def __call__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Value:
        return target(*args, **kwargs)


class _GraphOps(_EagerOps):
    """Records each op as a call_function node at the graph's insert point.

    When the graph carries fake values, each new node gets ``meta["val"]`` too,
    because later passes and the lowering read shapes and dtypes from there.
    """

    def __init__(self, graph: torch.fx.Graph, fake_mode: Any, origin: Node | None) -> None:
        self.graph = graph
        self.fake_mode = fake_mode
        self.stack_trace = origin.meta.get("stack_trace") if origin is not None else None

    def __call__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Node:
        node = self.graph.call_function(target, tuple(args), dict(kwargs))
        if self.stack_trace is not None:
            node.meta["stack_trace"] = self.stack_trace
        if self.fake_mode is not None:
            val = self._fake_val(target, node.args, node.kwargs)
            if val is not None:
                node.meta["val"] = val
        return node

    def _fake_val(self, target: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        missing = False

        def to_val(n: Node) -> Any:
            nonlocal missing
            if "val" not in n.meta:
                missing = True
                return None
            val = n.meta["val"]
            mode = getattr(val, "fake_mode", None)
            if isinstance(val, torch.Tensor) and mode is not None and mode is not self.fake_mode:
                # make_fx in real mode gives every value its own fake mode;
                # rebuild the value in ours (shapes are static there).
                with self.fake_mode:
                    return torch.empty_strided(
                        val.shape, val.stride(), dtype=val.dtype, device=val.device
                    )
            return val

        fargs = map_arg(args, to_val)
        fkwargs = map_arg(kwargs, to_val)
        if missing:
            return None
        try:
            with self.fake_mode:
                return target(*fargs, **fkwargs)
        except Exception:  # meta is advisory; the rewritten graph is still right
            log.debug("functionalize_rng: no fake value for %s", target, exc_info=True)
            return None


Ops = _EagerOps  # _GraphOps is one too


# --------------------------------------------------------------------------
# The generator, written once against Ops.
# --------------------------------------------------------------------------


def _lsr(ops: Ops, x: Value, k: int) -> Value:
    """Logical right shift on int64: arithmetic shift, then clear the sign copies."""
    return ops(
        aten.bitwise_and.Scalar,
        ops(aten.bitwise_right_shift.Tensor_Scalar, x, k),
        (1 << (64 - k)) - 1,
    )


def _mix64(ops: Ops, z: Value) -> Value:
    """SplitMix64 finaliser on int64 words (mul wraps mod 2**64)."""
    z = ops(aten.mul.Tensor, ops(aten.bitwise_xor.Tensor, z, _lsr(ops, z, 30)), _MIX1)
    z = ops(aten.mul.Tensor, ops(aten.bitwise_xor.Tensor, z, _lsr(ops, z, 27)), _MIX2)
    return ops(aten.bitwise_xor.Tensor, z, _lsr(ops, z, 31))


def _hash(ops: Ops, key: Value, idx: Value) -> Value:
    """64 random bits per element: mix64(key + G * idx)."""
    return _mix64(ops, ops(aten.add.Tensor, ops(aten.mul.Tensor, idx, _GOLDEN), key))


def _stream_key(ops: Ops, seedmix: Value, stream: int) -> Value:
    """Offset of op ``stream`` in counter space: G * stream * 2**40 (a 0-d op)."""
    if stream == 0:
        return seedmix
    return ops(aten.add.Tensor, seedmix, _s64(_GOLDEN * (stream << _STREAM_SHIFT)))


def _field(ops: Ops, h: Value, shift: int, bits: int, dtype: torch.dtype) -> Value:
    """Bits [shift, shift+bits) of ``h`` as a float in [0, 1) with ``bits`` bits."""
    v = ops(
        aten.bitwise_and.Scalar,
        ops(aten.bitwise_right_shift.Tensor_Scalar, h, shift),
        (1 << bits) - 1,
    )
    return ops(aten.mul.Tensor, ops(aten._to_copy.default, v, dtype=dtype), 2.0**-bits)


def _precision(dtype: torch.dtype, node: Node | None = None) -> tuple[torch.dtype, int]:
    """(compute dtype, uniform bits) such that casting to ``dtype`` is exact."""
    if not dtype.is_floating_point:
        where = _name(node) if node is not None else "a random op"
        raise NotImplementedError(f"functionalize_rng: {where} wants floats of dtype {dtype}")
    if dtype == torch.float64:
        return torch.float64, 53
    return torch.float32, min(24, 1 - round(math.log2(torch.finfo(dtype).eps)))


def _cast(ops: Ops, v: Value, have: torch.dtype, want: torch.dtype) -> Value:
    return v if have == want else ops(aten._to_copy.default, v, dtype=want)


# --------------------------------------------------------------------------
# Output specs: shape / dtype / device of the random tensor an op makes.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _SymDim:
    """A symbolic dimension, read at run time from dim ``dim`` of argument ``arg``."""

    arg: str
    dim: int


Dim = int | Node | _SymDim
Args = dict[str, Any]  # schema argument name -> value, as the node has it now


@dataclass(frozen=True)
class _Spec:
    shape: tuple[Dim, ...]
    dtype: torch.dtype
    device: torch.device


def _index(ops: Ops, spec: _Spec, args: Args) -> Value:
    """Row-major element index, int64, shaped like the output."""
    dims: list[Any] = []
    for d in spec.shape:
        if isinstance(d, _SymDim):
            dims.append(ops(aten.sym_size.int, args[d.arg], d.dim))
        else:
            dims.append(d)
    numel: Any = 1
    for d in dims:
        if isinstance(numel, int) and isinstance(d, int):
            numel *= d
        else:
            numel = ops(operator.mul, numel, d)
    idx = ops(aten.arange.default, numel, dtype=torch.int64, device=spec.device)
    return ops(aten.view.default, idx, dims)


def _uniform(
    ops: Ops, key: Value, spec: _Spec, args: Args, compute: torch.dtype, bits: int
) -> Value:
    return _field(ops, _hash(ops, key, _index(ops, spec, args)), 64 - bits, bits, compute)


def _gaussian(ops: Ops, key: Value, spec: _Spec, args: Args) -> tuple[Value, torch.dtype]:
    """Standard normal by Box-Muller, in float32 (float64 for float64 outputs)."""
    compute, _ = _precision(spec.dtype)
    idx = _index(ops, spec, args)
    h = _hash(ops, key, idx)
    if compute == torch.float64:
        u1 = _field(ops, h, 11, 53, compute)
        key2 = ops(aten.add.Tensor, key, _s64(_GOLDEN * _SECOND_DRAW))
        u2 = _field(ops, _hash(ops, key2, idx), 11, 53, compute)
    else:
        u1 = _field(ops, h, 40, 24, compute)
        u2 = _field(ops, h, 16, 24, compute)
    # 1 - u1 lies in (0, 1], so the log is finite.
    radius = ops(
        aten.sqrt.default,
        ops(aten.mul.Tensor, ops(aten.log.default, ops(aten.rsub.Scalar, u1, 1.0)), -2.0),
    )
    angle = ops(aten.cos.default, ops(aten.mul.Tensor, u2, 2.0 * math.pi))
    return ops(aten.mul.Tensor, radius, angle), compute


# --------------------------------------------------------------------------
# Per-op rewrites. Each ``_prep_*`` validates a node without touching the graph
# and returns an emitter ``(ops, key, args) -> replacement``. Emitters read
# tensor arguments from ``args``, bound when they run, because an earlier
# rewrite may have replaced the node an argument pointed to.
# --------------------------------------------------------------------------

Emit = Callable[[Ops, Value, Args], Value]

_INPLACE_TARGETS = frozenset(
    {aten.bernoulli_.float, aten.bernoulli_.Tensor, aten.uniform_.default, aten.normal_.default}
)


@dataclass(frozen=True)
class _Plan:
    node: Node
    emit: Emit
    spec: _Spec
    multi: bool = False  # replacement is a tuple, consumed through getitem users


def _name(node: Node) -> str:
    return f"{node.target} (node {node.name!r})"


def _refuse(node: Node, why: str) -> NotImplementedError:
    """The error the backend catches to fall back; it names the op."""
    return NotImplementedError(f"functionalize_rng: {_name(node)} {why}")


def _bind(node: Node) -> Args:
    """Schema argument name -> value, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: Args = {}
    for i, arg in enumerate(schema.arguments):  # kwarg-only arguments come last
        if not arg.kwarg_only and i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _number(node: Node, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(node, f"has non-constant {what} {value!r}")
    return float(value)


def _integer(node: Node, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(node, f"has non-constant {what} {value!r}")
    return value


def _out_val(node: Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)) and val:
        val = val[0]
    return val if isinstance(val, torch.Tensor) else None


def _tensor_val(node: Any) -> torch.Tensor | None:
    if isinstance(node, Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def _spec(
    node: Node,
    args: Args,
    *,
    like: str | None = None,
    size: bool = False,
    default_dtype: torch.dtype | None = None,
) -> _Spec:
    """Where the random tensor's shape, dtype and device come from.

    The node's own fake value is the truth; explicit ``size``/``dtype``/``device``
    arguments and the fake value of argument ``like`` are the fallbacks.
    """
    out = _out_val(node)
    like_val = _tensor_val(args[like]) if like is not None else None
    ref = out if out is not None else like_val

    shape: list[Dim] = []
    if size:
        sizes = args["size"]
        if not isinstance(sizes, (list, tuple)):
            raise _refuse(node, f"has a non-list size {sizes!r}")
        for d in sizes:
            if not (isinstance(d, Node) or (isinstance(d, int) and not isinstance(d, bool))):
                raise _refuse(node, f"has size entry {d!r}")
            shape.append(d)
    elif ref is not None:
        for i, d in enumerate(ref.shape):
            if isinstance(d, int):
                shape.append(d)
            elif (
                like is not None
                and like_val is not None
                and like_val.dim() == ref.dim()
                and str(like_val.shape[i]) == str(d)
            ):
                shape.append(_SymDim(like, i))
            else:
                raise _refuse(node, "has a symbolic shape it cannot rebuild")
    else:
        raise _refuse(node, "needs meta['val'] to learn its output shape")

    static = [d for d in shape if isinstance(d, int)]
    if len(static) == len(shape) and math.prod(static) >= _MAX_NUMEL:
        raise _refuse(node, "draws more than 2**40 elements")

    dtype = args.get("dtype")
    if out is not None:
        out_dtype = out.dtype
    elif isinstance(dtype, torch.dtype):
        out_dtype = dtype
    elif like_val is not None:
        out_dtype = like_val.dtype
    else:
        out_dtype = default_dtype or torch.get_default_dtype()

    if ref is not None:
        out_device = ref.device
    elif args.get("device") is not None:
        out_device = torch.device(args["device"])
    else:
        out_device = torch.device("cpu")
    return _Spec(tuple(shape), out_dtype, out_device)


def _check_generator(node: Node, args: Args) -> None:
    if args.get("generator") is not None:
        raise _refuse(node, "uses an explicit Generator")


def _check_inplace(node: Node, args: Args, order: dict[Node, int]) -> None:
    """An in-place random op may be rewritten only if nobody else sees the old tensor.

    That holds when its ``self`` is a fresh tensor (output of a non-aliasing,
    non-mutating op, or of an earlier in-place random op, which this pass turns
    into a fresh tensor) with no other readers before the in-place op.
    """
    target = args["self"]
    fresh = (
        isinstance(target, Node)
        and target.op == "call_function"
        and all(order[u] > order[node] for u in target.users if u is not node)
        and (
            target.target in _INPLACE_TARGETS
            or (
                isinstance(target.target, torch._ops.OpOverload)
                and not target.target._schema.is_mutable
                and all(r.alias_info is None for r in target.target._schema.returns)
            )
        )
    )
    if not fresh:
        raise _refuse(node, "mutates a tensor that may be aliased")


def _prep_rand(node: Node, args: Args) -> _Plan:
    spec = _spec(node, args, like="self") if "self" in args else _spec(node, args, size=True)
    compute, bits = _precision(spec.dtype, node)

    def emit(ops: Ops, key: Value, args: Args) -> Value:
        return _cast(ops, _uniform(ops, key, spec, args, compute, bits), compute, spec.dtype)

    return _Plan(node, emit, spec)


def _prep_randn(node: Node, args: Args) -> _Plan:
    spec = _spec(node, args, like="self") if "self" in args else _spec(node, args, size=True)
    _precision(spec.dtype, node)

    def emit(ops: Ops, key: Value, args: Args) -> Value:
        z, compute = _gaussian(ops, key, spec, args)
        return _cast(ops, z, compute, spec.dtype)

    return _Plan(node, emit, spec)


def _prep_normal(node: Node, args: Args) -> _Plan:
    tensor_args = [name for name in ("mean", "std") if isinstance(args[name], Node)]
    for name in ("mean", "std"):
        if name not in tensor_args:
            _number(node, args[name], name)
    if "self" in args:  # normal_functional / normal_: shaped like self
        spec = _spec(node, args, like="self")
    elif "size" in args:  # normal.float_float
        spec = _spec(node, args, size=True)
    else:  # Tensor_Tensor / Tensor_float / float_Tensor: shaped like the broadcast
        like = tensor_args[0]
        out = _out_val(node)
        for name in tensor_args:
            val = _tensor_val(args[name])
            if out is not None and val is not None and str(val.shape) == str(out.shape):
                like = name
        spec = _spec(node, args, like=like)
    _precision(spec.dtype, node)

    def emit(ops: Ops, key: Value, args: Args) -> Value:
        mean, std = args["mean"], args["std"]
        z, compute = _gaussian(ops, key, spec, args)
        if isinstance(std, Node) or std != 1.0:
            z = ops(aten.mul.Tensor, z, std)
        if isinstance(mean, Node) or mean != 0.0:
            z = ops(aten.add.Tensor, z, mean)
        if tensor_args:  # tensor mean/std may promote z past ``compute``
            return ops(aten._to_copy.default, z, dtype=spec.dtype)
        return _cast(ops, z, compute, spec.dtype)

    return _Plan(node, emit, spec)


def _prep_uniform(node: Node, args: Args) -> _Plan:
    low = _number(node, args["from"], "from")
    high = _number(node, args["to"], "to")
    spec = _spec(node, args, like="self")
    compute, bits = _precision(spec.dtype, node)

    def emit(ops: Ops, key: Value, args: Args) -> Value:
        u = _uniform(ops, key, spec, args, compute, bits)
        if high - low != 1.0:
            u = ops(aten.mul.Tensor, u, high - low)
        if low != 0.0:
            u = ops(aten.add.Tensor, u, low)
        return _cast(ops, u, compute, spec.dtype)

    return _Plan(node, emit, spec)


def _prep_bernoulli(node: Node, args: Args) -> _Plan:
    # bernoulli.default draws with the probabilities held in self
    p_arg = "self" if node.target == aten.bernoulli.default else "p"
    p_const = None if isinstance(args[p_arg], Node) else _number(node, args[p_arg], "p")
    spec = _spec(node, args, like="self")

    def emit(ops: Ops, key: Value, args: Args) -> Value:
        u = _uniform(ops, key, spec, args, torch.float32, 24)
        if p_const is None:
            hit = ops(aten.lt.Tensor, u, args[p_arg])
        else:
            hit = ops(aten.lt.Scalar, u, p_const)
        return ops(aten._to_copy.default, hit, dtype=spec.dtype)

    return _Plan(node, emit, spec)


def _prep_randint(node: Node, args: Args) -> _Plan:
    low = _integer(node, args.get("low", 0), "low")
    high = _integer(node, args["high"], "high")
    if high <= low:
        raise _refuse(node, f"has an empty range [{low}, {high})")
    if "self" in args:
        spec = _spec(node, args, like="self")
    else:
        spec = _spec(node, args, size=True, default_dtype=torch.int64)

    def emit(ops: Ops, key: Value, args: Args) -> Value:
        h = _hash(ops, key, _index(ops, spec, args))
        v = ops(aten.remainder.Scalar, _lsr(ops, h, 1), high - low)
        if low != 0:
            v = ops(aten.add.Tensor, v, low)
        return _cast(ops, v, torch.int64, spec.dtype)

    return _Plan(node, emit, spec)


def _prep_dropout(node: Node, args: Args) -> _Plan:
    p = _number(node, args["p"], "p")
    train = args["train"]
    multi = node.target == aten.native_dropout.default
    if multi:
        for user in node.users:
            if user.target is not operator.getitem or user.args[1] not in (0, 1):
                raise _refuse(node, f"has a non-getitem user {user.name!r}")
    spec = _spec(node, args, like="input")

    def emit(ops: Ops, key: Value, args: Args) -> Value:
        x = args["input"]
        if train is False or p == 0.0:  # PyTorch: the input, and an all-true mask
            out = ops(aten.clone.default, x)
            mask = ops(aten.ones_like.default, x, dtype=torch.bool)
        elif p >= 1.0:  # PyTorch: zeros, and an all-false mask
            out = ops(aten.zeros_like.default, x)
            mask = ops(aten.zeros_like.default, x, dtype=torch.bool)
        else:  # keep with probability 1 - p, scale kept values by 1 / (1 - p)
            mask = ops(aten.ge.Scalar, _uniform(ops, key, spec, args, torch.float32, 24), p)
            out = ops(aten.mul.Tensor, ops(aten.mul.Tensor, mask, x), 1.0 / (1.0 - p))
        return (out, mask) if multi else out

    return _Plan(node, emit, spec, multi=multi)


_Prep = Callable[[Node, Args], _Plan]

_HANDLERS: dict[Any, _Prep] = {
    aten.rand.default: _prep_rand,
    aten.rand.generator: _prep_rand,
    aten.rand_like.default: _prep_rand,
    aten.randn.default: _prep_randn,
    aten.randn.generator: _prep_randn,
    aten.randn_like.default: _prep_randn,
    aten.normal.Tensor_Tensor: _prep_normal,
    aten.normal.Tensor_float: _prep_normal,
    aten.normal.float_Tensor: _prep_normal,
    aten.normal.float_float: _prep_normal,
    aten.normal_functional.default: _prep_normal,
    aten.normal_.default: _prep_normal,
    aten.uniform.default: _prep_uniform,
    aten.uniform_.default: _prep_uniform,
    aten.bernoulli.default: _prep_bernoulli,
    aten.bernoulli.p: _prep_bernoulli,
    aten.bernoulli.Tensor: _prep_bernoulli,
    aten.bernoulli_.float: _prep_bernoulli,
    aten.bernoulli_.Tensor: _prep_bernoulli,
    aten.randint.default: _prep_randint,
    aten.randint.generator: _prep_randint,
    aten.randint.low: _prep_randint,
    aten.randint.low_generator: _prep_randint,
    aten.randint_like.default: _prep_randint,
    aten.randint_like.low_dtype: _prep_randint,
    aten.native_dropout.default: _prep_dropout,
    aten.dropout.default: _prep_dropout,
}

#: The aten overloads this pass rewrites.
SUPPORTED_TARGETS: frozenset[Any] = frozenset(_HANDLERS)

_RNG_HIGHER_ORDER = frozenset({"run_and_save_rng_state", "run_with_rng_state"})


def _is_random(target: Any) -> bool:
    tag = torch.Tag.nondeterministic_seeded
    if isinstance(target, torch._ops.OpOverload):
        return tag in target.tags
    if isinstance(target, torch._ops.OpOverloadPacket):
        return any(tag in getattr(target, o).tags for o in target.overloads())
    if isinstance(target, torch._ops.HigherOrderOperator):
        return getattr(target, "__name__", "") in _RNG_HIGHER_ORDER
    return False


def _deterministic_by_args(node: Node) -> bool:
    """Tagged ops that only draw random numbers for dropout > 0 in training."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    bound = _bind(node)
    for flag in ("train", "training"):
        if bound.get(flag) is False:
            return True
    for rate in ("dropout_p", "dropout"):
        value = bound.get(rate)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            return True
    return False


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------


def _plan(gm: torch.fx.GraphModule) -> list[_Plan]:
    """Validate every random op up front, so a refusal leaves the graph untouched."""
    for name, sub in gm.named_modules():
        if name and isinstance(sub, torch.fx.GraphModule):
            for node in sub.graph.nodes:
                if node.op == "call_function" and _is_random(node.target):
                    if not _deterministic_by_args(node):
                        raise _refuse(node, f"is a random op inside subgraph {name!r}")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    plans: list[_Plan] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        prep = _HANDLERS.get(node.target)
        if prep is None:
            if _is_random(node.target) and not _deterministic_by_args(node):
                raise _refuse(node, "is a random op this pass cannot rewrite")
            continue
        args = _bind(node)
        _check_generator(node, args)
        if node.target in _INPLACE_TARGETS:
            _check_inplace(node, args, order)
        plans.append(prep(node, args))
    if len(plans) > _MAX_STREAMS:
        raise NotImplementedError(
            f"functionalize_rng: {len(plans)} random ops, over {_MAX_STREAMS}"
        )
    return plans


def _check_graph_shape(gm: torch.fx.GraphModule) -> Node:
    """The seed contract needs plain positional inputs and outputs; returns the output node."""
    graph = gm.graph
    if isinstance(graph._codegen, torch.fx.graph._PyTreeCodeGen):
        raise NotImplementedError(
            "functionalize_rng: pytree-structured graphs (torch.export) are not supported"
        )
    for node in graph.nodes:
        if node.op == "placeholder" and str(node.target).startswith("*"):
            raise NotImplementedError(f"functionalize_rng: variadic placeholder {node.name!r}")
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    if isinstance(output.args[0], dict):
        raise NotImplementedError(
            "functionalize_rng: dict-structured graph outputs are not supported"
        )
    return output


def _add_seed(gm: torch.fx.GraphModule, plans: list[_Plan]) -> tuple[Node, Any]:
    """Append the ``rng_seed`` placeholder, with a fake value when the graph has them."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    vals = [n.meta["val"] for n in placeholders if "val" in n.meta]
    fake_mode = None
    if vals:
        from torch._guards import detect_fake_mode

        try:
            fake_mode = detect_fake_mode(vals)
        except AssertionError:  # values from several fake modes (make_fx, real mode)
            fake_mode = next(v.fake_mode for v in vals if getattr(v, "fake_mode", None) is not None)
    anchor = placeholders[-1].next if placeholders else next(iter(graph.nodes))
    with graph.inserting_before(anchor):
        seed = graph.placeholder(RNG_SEED_NAME)
    if fake_mode is not None:
        with fake_mode:
            seed.meta["val"] = torch.empty((), dtype=torch.int64, device=plans[0].spec.device)
    return seed, fake_mode


def _erase_if_dead(node: Node) -> None:
    """Drop a pure node nobody reads any more (e.g. the buffer an in-place op filled)."""
    if node.op == "call_function" and not node.users and not node.is_impure():
        inputs = list(node.all_input_nodes)
        node.graph.erase_node(node)
        for inp in inputs:
            _erase_if_dead(inp)


def _rewrite(plan: _Plan, ops: _GraphOps, key: Value) -> None:
    """Emit ``plan``'s replacement before its node and swap it in."""
    node, graph = plan.node, plan.node.graph
    args = _bind(node)  # now, since earlier rewrites may have replaced an argument
    filled = args["self"] if node.target in _INPLACE_TARGETS else None
    # Later readers of the tensor an in-place op overwrote (_check_inplace made sure
    # nobody read it before) must see the random values instead.
    readers = [u for u in filled.users if u is not node] if filled is not None else []
    with graph.inserting_before(node):
        result = plan.emit(ops, key, args)
    for reader in readers:
        reader.replace_input_with(filled, result)
    if plan.multi:
        for user in list(node.users):
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    for inp in inputs:
        _erase_if_dead(inp)


def _run(gm: torch.fx.GraphModule) -> PassResult:
    plans = _plan(gm)
    if not plans:
        return PassResult(gm, False)
    output = _check_graph_shape(gm)
    graph = gm.graph

    seed, fake_mode = _add_seed(gm, plans)
    with graph.inserting_before(plans[0].node):
        seedmix = _mix64(_GraphOps(graph, fake_mode, None), seed)
    for stream, plan in enumerate(plans):
        ops = _GraphOps(graph, fake_mode, plan.node)
        with graph.inserting_before(plan.node):
            key = _stream_key(ops, seedmix, stream)
        _rewrite(plan, ops, key)

    with graph.inserting_before(output):
        next_seed = _GraphOps(graph, fake_mode, None)(aten.add.Tensor, seed, 1)
    outs = output.args[0]
    if isinstance(outs, (tuple, list)):
        new_outs: Any = type(outs)([*outs, next_seed])
    else:
        new_outs = (outs, next_seed)
    output.args = (new_outs, *output.args[1:])
    out_val = output.meta.get("val")
    if isinstance(out_val, (tuple, list)) and "val" in next_seed.meta:
        output.meta["val"] = type(out_val)([*out_val, next_seed.meta["val"]])

    log.debug(
        "functionalize_rng: rewrote %d random ops: %s",
        len(plans),
        ", ".join(str(p.node.target) for p in plans),
    )
    return PassResult(gm, True)


functionalize_rng = GraphPass(name="functionalize_rng", version=1, run=_run)
