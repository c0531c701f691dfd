"""Python scalars read from tensors become 0-d tensor math (``tensorify_scalar_reads``).

Runs on the *Dynamo* graph (torch-level ops), before AOTAutograd, with Dynamo's
``capture_scalar_outputs=True`` and ``specialize_float=False`` (see
``xla_backend.dynamo.scope``). It covers two sources of Python numbers:

1. A tensor read as a number feeding tensor math, as in a warm-up driven by a step
   counter::

       lr_scale = min(1.0, (step.item() + 1) / warmup)   # or float(step)
       loss = loss_fn(model(x), y) * lr_scale

   Dynamo records::

       s = step.item()                    # call_method item -> SymInt (unbacked u0)
       f = torch.sym_float(s)             # only for float(step)
       a = f + 1; b = a / 10              # operator.add / truediv on Sym values
       c = torch.sym_min(1.0, b)
       loss = mse * c                     # a tensor op takes the number

   rewritten to::

       t = step.detach().reshape(()).to(torch.int64)  # SymInt -> int64, SymFloat -> float64
       a = t.to(torch.float64) + 1; b = a / 10
       c = torch.clamp(b, max=1.0)
       loss = mse * c.to(mse.dtype)       # cast only where a 0-d tensor would promote

   Why: ``.item()`` copies a device value to the host (a sync), and on the captured
   path AOTAutograd's ``tensorify_python_scalars`` fails on unbacked integers turned
   into floats (``KeyError: u0``, an upstream bug). As 0-d tensors the values stay
   where the counter lives and the step is one graph with no transfer.

2. A Python float Dynamo keeps symbolic (an optimizer's ``lr``, or AdamW's
   ``betas[0]`` that OneCycleLR changes every step). Dynamo passes it as a 0-d
   float64 placeholder plus ``.item()``; the optimizer then uses it as ``-lr``
   (SGD, RMSprop), ``1 - beta1`` as a ``lerp_`` weight, ``beta1 ** step``... AOTAutograd
   tensorifies a float input only if some op takes the *bare* symbol, and otherwise
   specializes it: a recompile every step. Here the same arithmetic becomes tensor
   math on ``torch.mul(torch.ones_like(placeholder), lr)``: the value is exactly the
   float (``1.0 * x == x``), and that one op takes the bare symbol, so AOTAutograd
   turns it into the placeholder and keeps the float an input. The ``.item()`` stays.

Why the semantics are kept:

* A Python float is an IEEE double and a Python int an integer, so a SymFloat
  becomes a float64 tensor and a SymInt an int64 tensor (integers beyond int64 are
  out of scope: these are counters). ``detach`` keeps ``.item()``'s cut in autograd.
* Each rewritten op is the same IEEE operation on the same dtype: operands are cast
  to the result's dtype first, exactly as Python converts an int operand of a float
  op, and ``int / int`` divides in double as Python does (exact below 2**53).
  ``//`` and ``%`` are rewritten only for integer results, where torch's floor
  division and remainder match Python's. ``**`` is libm's ``pow`` on the host; a
  device may round it differently in the last bit.
* ``min``/``max`` become ``clamp``/``minimum``/``maximum``; they agree with Python
  except on NaN (Python's ``min`` depends on argument order there).
* A tensor op given a Python number converts it to the dtype the op computes in; a
  0-d float64 tensor is converted the same way next to a tensor with dimensions, and
  where it would promote the result instead (next to another 0-d tensor, e.g. a scalar
  loss or Adam's step count) it is cast to that dtype first. ``lerp`` weights are cast
  to the input's dtype. ``number / tensor`` is ``tensor.reciprocal() * number`` in
  PyTorch (two roundings), so it is rewritten to exactly that.

A foreach ``mul``/``div``/``add`` of a tensor list by the scalar (Adam's foreach path:
``torch._foreach_div_(bias_correction1, lr)``) takes the 0-d tensor, cast to the list's
dtype, through the overload PyTorch has for it. ``_foreach_add(a, b, alpha=s)`` (SGD's
foreach path: ``alpha=-lr``) becomes ``_foreach_add(a, _foreach_mul(b, s))``, and
``_foreach_addcdiv_(a, b, c, value=s)`` (RMSprop's) ``_foreach_add_(a, b / c * s)``, the
order of Dynamo's own polyfill for one tensor's ``addcmul_``. ``_foreach_lerp_(a, b, s)``
(the foreach Adam family's ``1 - beta1``) takes the list overload, ``[s] * len(a)``:
lerp with a 0-d weight computes exactly what lerp with a Python weight does, and
``_foreach_pow(s, steps)`` (its capturable bias correction) ``_foreach_pow([s] * n, steps)``.

Anything else (a Sym value returned from the graph, passed as a keyword other than
those above, compared, used as a size, mixed with a Sym value from elsewhere such as a
shape, an op not listed in ``SYM_OPS`` / ``TENSOR_CONSUMERS``) leaves the whole
connected group of scalar ops untouched, as Dynamo and AOTAutograd would have it, and
the pass says so at debug level. A value that must cross a graph break (used after
``loss.backward()``) is a graph output, so it stays a Python number, read on the host.
"""

from __future__ import annotations

import builtins
import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from .base import GraphPass, PassResult
from .dynamo_graph import annotate, fake_mode, is_dynamo_float_input, is_sym, is_tensor, value

log = logging.getLogger(__name__)

__all__ = ["SYM_OPS", "TENSOR_CONSUMERS", "rewritable_reads", "tensorify_scalar_reads"]

_BINARY: dict[Any, Callable[[Any, Any], Any]] = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    operator.pow: operator.pow,
    operator.floordiv: operator.floordiv,  # integer results only
    operator.mod: operator.mod,  # integer results only
}
_INT_ONLY = frozenset({operator.floordiv, operator.mod})
#: What Dynamo records for ``math.sqrt``, ``math.cos`` and the other ``math`` functions
#: torch has a symbolic form of, applied to a Sym value (the bias correction of Adam as
#: torch wrote it before 1.12; a cosine schedule of a float progress), and their tensor
#: ops.
_MATH: dict[Any, Callable[[Any], Any]] = {
    getattr(torch, f"_sym_{name}"): getattr(torch, name)
    for name in ("sqrt", "cos", "cosh", "sin", "sinh", "tan", "tanh", "asin", "acos",
                 "atan", "log2")
}
_UNARY = frozenset({operator.neg, torch.sym_float, *_MATH})
_MIN = frozenset({torch.sym_min, builtins.min})
_MAX = frozenset({torch.sym_max, builtins.max})

#: The Python-scalar ops on Sym values this pass turns into tensor ops.
SYM_OPS: frozenset[Any] = frozenset({*_BINARY, *_UNARY, *_MIN, *_MAX})

_ARITH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
})
_ARITH_METHODS = frozenset({"add", "sub", "mul", "div", "true_divide"})
_INPLACE_METHODS = frozenset({"add_", "sub_", "mul_", "div_"})
# Only ``number ** tensor`` (Adam's ``beta1 ** step``): with the number as the
# exponent, PyTorch picks special kernels by its value (square, sqrt, ...).
_POW_BASE = frozenset({operator.pow, torch.pow})
# ``grad.add(buf, alpha=momentum)`` (SGD's Nesterov step, with OneCycleLR or CyclicLR
# cycling the momentum) and ``grad.add(param, alpha=weight_decay)`` (L2 decay in SGD,
# Adam, RMSprop...): the keyword scalar has no tensor form, so ``a + b * alpha``, the
# order torch_xla lowers the op in.
_ALPHA_FUNCTIONS = frozenset({torch.add, torch.sub})
_ALPHA_METHODS = frozenset({"add", "sub", "add_", "sub_"})
_LERP = frozenset({torch.lerp, "lerp", "lerp_"})
# ``out.clamp(min=-c, max=c)`` with a bound computed from the step: the Tensor overload
# takes 0-d bounds, all of them tensors, so a constant bound beside it becomes one too.
_CLAMP = frozenset({torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_"})
# ``torch.tensor(max_norm, dtype=..., device=...)`` (torch_xla's clip_grad_norm_): the
# number made a tensor is the 0-d tensor converted, as a copy.
_FACTORIES = frozenset({torch.tensor, torch._refs.tensor, torch.scalar_tensor, torch.as_tensor})
# ``torch._foreach_mul_(tensors, lr)`` and friends, as Adam's foreach path applies a
# learning rate; these three have an overload taking a 0-d tensor for the scalar.
_FOREACH = frozenset({
    torch._foreach_mul, torch._foreach_mul_, torch._foreach_div, torch._foreach_div_,
    torch._foreach_add, torch._foreach_add_,
})
# ``torch._foreach_add_(params, updates, alpha=-lr)`` (SGD, RMSprop, Adadelta): the
# keyword scalar has no tensor form, so the updates are scaled first,
# ``params + updates * alpha``.
_FOREACH_ALPHA = frozenset({torch._foreach_add, torch._foreach_add_})
# ``torch._foreach_addcdiv_(params, grads, avg, value=-lr)`` (RMSprop without momentum):
# rewritten in the order of Dynamo's own polyfill for ``Tensor.addcmul_`` with a Sym
# ``value``, ``params + t1 * t2 * value`` (``/ t2`` for addcdiv).
_FOREACH_VALUE = {torch._foreach_addcdiv_: torch._foreach_div,
                  torch._foreach_addcmul_: torch._foreach_mul}
# ``torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)`` (the foreach Adam family, with
# OneCycleLR cycling beta1): the scalar weight has no 0-d tensor overload, so the
# tensor list overload gets the one weight once per tensor.
_FOREACH_LERP = frozenset({torch._foreach_lerp, torch._foreach_lerp_})
# ``torch._foreach_pow(beta1, steps)`` (the capturable foreach Adam family's bias
# correction): the scalar base has no 0-d tensor overload either, so likewise.
_FOREACH_POW_BASE = frozenset({torch._foreach_pow})

#: Tensor ops that may take the scalar: either operand of arithmetic, the base of a
#: power, the ``other`` of an in-place update, the weight of ``lerp``, the scalar of
#: a foreach ``mul``/``div``/``add``.
TENSOR_CONSUMERS: frozenset[Any] = (
    _ARITH_FUNCTIONS | _ARITH_METHODS | _INPLACE_METHODS | _POW_BASE | _LERP | _FOREACH
    | frozenset(_FOREACH_VALUE) | _FOREACH_LERP | _FOREACH_POW_BASE | _ALPHA_FUNCTIONS
    | _ALPHA_METHODS | _CLAMP | _FACTORIES
)

ARITH, INPLACE, LERP, ALPHA, CLAMP = "arith", "inplace", "lerp", "alpha", "clamp"
FACTORY = "factory"
FOREACH, FOREACH_ALPHA, FOREACH_VALUE = "foreach", "foreach_alpha", "foreach_value"
FOREACH_LERP, FOREACH_POW_BASE = "foreach_lerp", "foreach_pow_base"


def _number(arg: Any) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


def _tensor_list(arg: Any) -> bool:
    return isinstance(arg, (list, tuple)) and bool(arg) and all(is_tensor(a) for a in arg)


def _dtype_of(sym: Any) -> torch.dtype | None:
    if isinstance(sym, torch.SymFloat):
        return torch.float64
    if isinstance(sym, torch.SymInt):
        return torch.int64
    return None  # SymBool: not rewritten


def _is_root(node: Node) -> bool:
    """``t.item()`` (also what ``float(t)`` / ``int(t)`` record) giving an int or float."""
    return (
        node.op == "call_method"
        and node.target == "item"
        and len(node.args) == 1
        and not node.kwargs
        and isinstance(node.args[0], Node)
        and _dtype_of(value(node)) is not None
    )


def _sym_op_ok(node: Node, member: set[Node]) -> bool:
    """A scalar op the pass can rewrite, all of whose Sym inputs it rewrites too."""
    if node.op != "call_function" or node.target not in SYM_OPS or node.kwargs:
        return False
    out = _dtype_of(value(node))
    if out is None or (node.target in _INT_ONLY and out is not torch.int64):
        return False
    unary = node.target in _UNARY
    if len(node.args) != (1 if unary else 2):
        return False
    for arg in node.args:
        if isinstance(arg, Node):
            if arg not in member:
                return False
        elif not _number(arg):
            return False
    return True


def _lerp_weight(user: Node) -> Any:
    """The weight of a foreach ``lerp``: positional, or ``weight=`` as timm's EMA passes it."""
    return user.args[2] if len(user.args) == 3 else user.kwargs["weight"]


def _consumer_kind(user: Node, member: set[Node]) -> str | None:
    """How a tensor op takes a Sym value (ARITH, INPLACE, LERP, FOREACH...), or None."""
    target = user.target if user.op in ("call_function", "call_method") else None
    if user.op == "call_function" and target in _FOREACH_VALUE:
        ok = (len(user.args) == 3 and user.kwargs.keys() == {"value"}
              and user.kwargs["value"] in member
              and all(_tensor_list(a) for a in user.args)
              and len({value(a).dtype for a in user.args[0]}) == 1)
        return FOREACH_VALUE if ok else None
    if user.op == "call_function" and target in _FOREACH_LERP:
        ok = (len(user.args) == 2 and user.kwargs.keys() == {"weight"}
              or len(user.args) == 3 and not user.kwargs)
        ok = (ok and _lerp_weight(user) in member
              and _tensor_list(user.args[0]) and _tensor_list(user.args[1])
              and len({value(a).dtype for a in user.args[0]}) == 1)
        return FOREACH_LERP if ok else None
    if user.op == "call_function" and target in _FOREACH_POW_BASE:
        ok = (len(user.args) == 2 and not user.kwargs and user.args[0] in member
              and _tensor_list(user.args[1])
              and len({value(a).dtype for a in user.args[1]}) == 1)
        return FOREACH_POW_BASE if ok else None
    if user.op == "call_function" and target in _FOREACH:
        if len(user.args) != 2 or not _tensor_list(user.args[0]) or \
                len({value(a).dtype for a in user.args[0]}) != 1:
            return None
        if not user.kwargs and user.args[1] in member:
            return FOREACH
        alpha_ok = (target in _FOREACH_ALPHA and user.kwargs.keys() == {"alpha"}
                    and user.kwargs["alpha"] in member and _tensor_list(user.args[1]))
        return FOREACH_ALPHA if alpha_ok else None
    if ((user.op == "call_function" and target in _ALPHA_FUNCTIONS)
            or (user.op == "call_method" and target in _ALPHA_METHODS)) \
            and user.kwargs.get("alpha") in member:
        ok = (user.kwargs.keys() == {"alpha"} and len(user.args) == 2 and is_tensor(user)
              and all(is_tensor(a) and a not in member for a in user.args)
              and value(user.args[1]).dtype == value(user).dtype)
        return ALPHA if ok else None
    if user.op == "call_function" and target in _FACTORIES:
        # not a graph output: that is how Dynamo returns a number (``scalar_tensor``),
        # and one that crosses a graph break is read on the host once, as a number
        ok = (len(user.args) == 1 and user.args[0] in member and is_tensor(user)
              and value(user).dim() == 0 and user.kwargs.keys() <= {"dtype", "device"}
              and all(u.op != "output" for u in user.users))
        return FACTORY if ok else None
    if target in _CLAMP:
        bounds = [*user.args[1:], *user.kwargs.values()]
        ok = (1 <= len(user.args) <= 3 and user.kwargs.keys() <= {"min", "max"}
              and is_tensor(user.args[0]) and user.args[0] not in member and is_tensor(user)
              and all(b is None or b in member or _number(b) for b in bounds))
        return CLAMP if ok else None
    if target in _LERP:
        kind, positions, arity = LERP, (2,), 3
    elif user.op == "call_method" and target in _INPLACE_METHODS:
        kind, positions, arity = INPLACE, (1,), 2
    elif user.op == "call_function" and target in _POW_BASE:
        kind, positions, arity = ARITH, (0,), 2
    elif ((user.op == "call_function" and target in _ARITH_FUNCTIONS)
          or (user.op == "call_method" and target in _ARITH_METHODS)):
        kind, positions, arity = ARITH, ((1,) if user.op == "call_method" else (0, 1)), 2
    else:
        return None
    if len(user.args) != arity or not is_tensor(user):
        return None
    if any(isinstance(v, Node) and v in member for v in user.kwargs.values()):
        return None
    syms = [i for i, a in enumerate(user.args) if isinstance(a, Node) and a in member]
    if len(syms) != 1 or syms[0] not in positions:
        return None
    if not all(is_tensor(a) for i, a in enumerate(user.args) if i != syms[0]):
        return None
    return kind


def _components(nodes: list[Node], member: set[Node]) -> dict[Node, Node]:
    """Union-find over Sym nodes linked by data flow: node -> representative."""
    parent = {n: n for n in nodes}

    def find(n: Node) -> Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for arg in n.all_input_nodes:
            if arg in member:
                parent[find(arg)] = find(n)
    return {n: find(n) for n in nodes}


def _plan(gm: torch.fx.GraphModule) -> list[Node]:
    """The Sym nodes to rewrite, in graph order (whole groups or nothing)."""
    member: set[Node] = set()
    nodes: list[Node] = []
    for node in gm.graph.nodes:
        if _is_root(node) or (is_sym(node) and any(a in member for a in node.all_input_nodes)):
            member.add(node)
            nodes.append(node)
    if not nodes:
        return []
    root_of = _components(nodes, member)
    rejected: dict[Node, str] = {}
    for node in nodes:
        if not _is_root(node) and not _sym_op_ok(node, member):
            rejected.setdefault(root_of[node], f"cannot rewrite {node.format_node()}")
        for user in node.users:
            if user in member:
                continue
            if _consumer_kind(user, member) is None:
                rejected.setdefault(root_of[node], f"cannot feed a tensor to {user.format_node()}")
    for reason in rejected.values():
        log.debug("tensorify_scalar_reads: left a scalar read alone: %s", reason)
    return [n for n in nodes if root_of[n] not in rejected]


def rewritable_reads(gm: torch.fx.GraphModule) -> set[Node]:
    """The ``.item()`` reads :data:`tensorify_scalar_reads` would turn into tensor math."""
    return {n for n in _plan(gm) if _is_root(n)}


class _Emitter:
    """Inserts tensor ops for the planned Sym nodes, tracking each result's dtype."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.graph = gm.graph
        self.mode = fake_mode(gm)
        self.tensor: dict[Node, Node] = {}
        self.dtype: dict[Node, torch.dtype] = {}
        self.created: set[Node] = set()

    def node(self, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
        new = self.graph.create_node(op, target, args, kwargs or {})
        annotate(new, self.mode)
        self.created.add(new)
        return new

    def cast(self, t: Node, have: torch.dtype, want: torch.dtype) -> Node:
        return t if have == want else self.node("call_method", "to", (t, want))

    def operand(self, arg: Any, want: torch.dtype) -> Any:
        if isinstance(arg, Node):
            return self.cast(self.tensor[arg], self.dtype[arg], want)
        return arg  # a Python constant: tensor-op-constant keeps the tensor's dtype

    def emit(self, node: Node) -> None:
        want = _dtype_of(value(node))
        assert want is not None
        # inserting before the next node keeps the new nodes in the order made
        with self.graph.inserting_before(node.next):
            if _is_root(node) and is_dynamo_float_input(node.args[0]):
                # Dynamo's float input already is a float64 0-d tensor. The value is
                # taken as ones * item rather than the placeholder itself so that an op
                # still takes the bare symbol: AOTAutograd's tensorify_python_scalars
                # counts a float input as tensorified only then, and otherwise
                # specializes it (a recompile per value). 1.0 * x == x exactly.
                ones = self.node("call_function", torch.ones_like, (node.args[0],))
                result = self.node("call_function", torch.mul, (ones, node))
                result = self.cast(result, torch.float64, want)
            elif _is_root(node):
                src = self.node("call_method", "detach", (node.args[0],))
                src = self.node("call_method", "reshape", (src, ()))
                result = self.node("call_method", "to", (src, want))
            elif node.target is torch.sym_float:
                result = self.operand(node.args[0], want)
            elif node.target is operator.neg:
                result = self.node("call_function", operator.neg,
                                   (self.operand(node.args[0], want),))
            elif node.target in _MATH:
                result = self.node("call_function", _MATH[node.target],
                                   (self.operand(node.args[0], want),))
            elif node.target in _BINARY:
                a, b = (self.operand(x, want) for x in node.args)
                result = self.node("call_function", _BINARY[node.target], (a, b))
            else:  # min / max
                a, b = (self.operand(x, want) for x in node.args)
                is_min = node.target in _MIN
                if isinstance(a, Node) and isinstance(b, Node):
                    result = self.node("call_function", torch.minimum if is_min else torch.maximum,
                                       (a, b))
                else:
                    t, c = (a, b) if isinstance(a, Node) else (b, a)
                    bound = {"max": c} if is_min else {"min": c}
                    result = self.node("call_function", torch.clamp, (t,), bound)
        self.tensor[node] = result
        self.dtype[node] = want

    def feed(self, user: Node, sym: Node, member: set[Node]) -> None:
        """Hands ``user`` the tensor for ``sym``, cast where a Python number would differ.

        ``lerp`` wants its weight in the input's dtype. Elsewhere the 0-d tensor is cast
        when it would change the dtype the op computes in (next to another 0-d tensor,
        where a Python number would not have promoted the result), and a float64 one
        for a float32 op.
        """
        kind = _consumer_kind(user, member)
        t, have = self.tensor[sym], self.dtype[sym]
        if kind == FACTORY:
            # torch.tensor(number, dtype) rounds the double once to dtype, as .to does
            kwargs = {"dtype": value(user).dtype, "copy": True}
            if "device" in user.kwargs:
                kwargs["device"] = user.kwargs["device"]
            user.op, user.target, user.args, user.kwargs = "call_method", "to", (t,), kwargs
            return
        if kind in (FOREACH, FOREACH_ALPHA, FOREACH_VALUE, FOREACH_LERP, FOREACH_POW_BASE):
            # the Tensor overload casts the 0-d tensor to each tensor's dtype, as a
            # Python number is; cast first so no backend can promote instead
            tensors = user.args[1] if kind == FOREACH_POW_BASE else user.args[0]
            want = value(tensors[0]).dtype
            wrong = have != want
        elif kind == LERP:
            want = value(user.args[0]).dtype
            wrong = have != want
        elif kind in (ALPHA, CLAMP):
            want = value(user).dtype
            wrong = have != want
        else:
            other = next(a for a in user.args if a is not sym)
            want = value(user.args[0] if kind == INPLACE else user).dtype
            like = value(other)
            if user.args[0] is sym and user.target is operator.truediv:
                like = torch.empty((1,) * like.dim(), dtype=want, device="meta")
            # float32 takes a Python float as float32, so the cast is exact; torch_xla 2.9
            # lowers some ops (add) of a float32 tensor and a 0-d float64 one in float64
            wrong = _promoted(like, have) != want or (have, want) == (torch.float64,
                                                                     torch.float32)
        with self.graph.inserting_before(user):
            if wrong:
                t = self.cast(t, have, want)
            if kind == FOREACH_ALPHA:
                scaled = self.node("call_function", torch._foreach_mul, (user.args[1], t))
                user.args, user.kwargs = (user.args[0], scaled), {}
                return
            if kind == ALPHA:
                scaled = self.node("call_function", torch.mul, (user.args[1], t))
                user.args, user.kwargs = (user.args[0], scaled), {}
                return
            if kind == CLAMP:
                def constant(b: Any) -> Any:
                    return self.node("call_function", torch.scalar_tensor, (b,),
                                     {"dtype": want}) if _number(b) else b
                user.args = tuple(constant(b) for b in user.args)
                user.kwargs = {k: constant(b) for k, b in user.kwargs.items()}
            if kind == FOREACH_LERP:
                starts, ends = user.args[:2]
                user.args, user.kwargs = (starts, ends, [t] * len(starts)), {}
                return
            if kind == FOREACH_POW_BASE:
                # number ** tensor is pow(tensor(number, dtype=exponent's), exponent)
                _, exponents = user.args
                user.args = ([t] * len(exponents), exponents)
                return
            if kind == FOREACH_VALUE:
                params, t1, t2 = user.args
                combined = self.node("call_function", _FOREACH_VALUE[user.target], (t1, t2))
                scaled = self.node("call_function", torch._foreach_mul, (combined, t))
                user.target, user.args, user.kwargs = torch._foreach_add_, (params, scaled), {}
                return
            if user.args[0] is sym and user.target is operator.truediv:
                # number / tensor is Tensor.__rtruediv__: tensor.reciprocal() * number,
                # two roundings; a tensor division would round once and differ.
                recip = self.node("call_method", "reciprocal", (user.args[1],))
                user.target, user.args = operator.mul, (recip, t)
                return
        user.replace_input_with(sym, t)


def _promoted(other: torch.Tensor, scalar_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``other OP t`` for a 0-d tensor ``t`` of ``scalar_dtype``."""
    like = torch.empty((1,) * other.dim(), dtype=other.dtype, device="meta")
    return torch.result_type(like, torch.empty((), dtype=scalar_dtype, device="meta"))


def _run(gm: torch.fx.GraphModule) -> PassResult:
    planned = _plan(gm)
    if not planned:
        return PassResult(gm, False)
    member = set(planned)
    emitter = _Emitter(gm)
    for node in planned:
        emitter.emit(node)
    for node in planned:
        for user in list(node.users):
            if user not in member and user not in emitter.created:
                emitter.feed(user, node, member)
    for node in reversed(planned):
        if not node.users:
            gm.graph.erase_node(node)
    roots = sum(1 for n in planned if n.op == "call_method")
    log.debug("tensorify_scalar_reads: %d scalar reads, %d scalar ops now tensor ops",
              roots, len(planned) - roots)
    return PassResult(gm, True)


tensorify_scalar_reads = GraphPass(name="tensorify_scalar_reads", version=12, run=_run)
