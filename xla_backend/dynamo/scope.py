"""What Dynamo decides before our backend sees a graph, for our frames only.

Why this exists: what Dynamo decides before a backend ever sees a graph is the
backend's problem too. ``import torch_xla`` flips two process-wide Dynamo settings
(``torch_xla/__init__.py``): ``specialize_float=True`` and
``automatic_dynamic_shapes=False``. With them a learning rate that a scheduler changes
every step is a guarded constant, so every step recompiles (and after
``recompile_limit`` the step silently runs eagerly). And with PyTorch's default
``capture_scalar_outputs=False`` every ``.item()`` is a graph break plus a host sync.

While a function compiled by ``syncfree_xla`` runs, this module puts in force:

* ``specialize_float=False`` and ``automatic_dynamic_shapes=True`` (PyTorch's own
  defaults): a float that changes between calls (``param_groups[i]["lr"]``) becomes a
  0-d float64 graph *input* after one recompile, instead of a constant;
* ``enable_cpp_symbolic_shape_guards=False``: see :data:`DYNAMO_SETTINGS`;
* ``skip_tensor_guards_with_matching_dict_tags=False``: a parameter whose
  ``requires_grad`` changed in place (layers unfrozen mid-training) retraces the step;
* ``capture_scalar_outputs=True``: ``.item()`` / ``float(t)`` stay in the graph as
  symbolic scalars, which ``passes.tensorify_scalar_reads`` turns into 0-d tensor math;
* a branch-free ``GradScaler._maybe_opt_step`` (``grad_scaler.masked_maybe_opt_step``): the
  stock one reads ``found_inf`` on the host to decide whether to step; and
  ``GradScaler.scale``, ``unscale_`` and ``update`` that Dynamo traces
  (``grad_scaler.STAND_INS``): torch.amp is on its skip list;
* a ``_BatchNorm.forward`` whose cumulative average (``momentum=None``) Dynamo traces
  (``batch_norm.traceable_forward``); the stock one breaks the graph and runs the layer
  in lazy mode, with a biased running variance;
* an ``AveragedModel.update_parameters`` (SWA and EMA) that never reads its
  ``n_averaged`` counter on the host (``averaged_model.traceable_update_parameters``);
* ``p -= x`` on a tensor traced as ``p`` itself
  (``augmented_assignment.augmented_assignment_keeps_tensor``): Dynamo binds the name to
  a stand-in, and a hand-written SGD loop's ``p.grad = None`` after it is lost;
* torch's own ``GRU.forward`` on the scan-based GRU that ``import torch_xla`` installs
  as ``torch.nn.GRU`` (:func:`_torch_gru_forward`);
* a ``math.exp`` and a ``math.pow`` that Dynamo keeps symbolic (:func:`_traceable_exp`,
  :func:`_traceable_pow`);
* torchvision's IoU losses without a boolean-mask assignment
  (``box_losses.traceable_loss_inter_union``), where torchvision is imported;
* under ``torch.compile(dynamic=True)`` only, PyTorch's reference layer and group norm
  as their ``AutogradXLA`` kernels (:func:`_norms_for_symbolic_sizes`).

How: Dynamo enters ``backend.backend_ctx_ctor()`` (when the backend has one) around
every call of the compiled function, resume frames after graph breaks included, which
is exactly where frames are traced and where GradScaler runs. ``torch.compile`` however
wraps the backend in ``_TorchCompileWrapper`` and then in ``WrapBackendDebug``, and
neither forwards the attribute, so the hook is lost. :func:`install` gives
``WrapBackendDebug`` a ``__getattr__`` that forwards *only* ``backend_ctx_ctor``, and
only for backends :func:`install` marked (ours). For every other backend lookup fails
with ``AttributeError`` exactly as before and Dynamo uses its null context, so their
settings and behaviour are untouched. The forwarded hook honours the options
``torch.compile`` passes the backend, read once per ``torch.compile`` call: with
``options={"syncfree_passes": False}`` (or ``SYNCFREE_XLA_SYNCFREE_PASSES=0`` set
before that call) none of this is in force.

Limits (said out loud):

* ``torch._dynamo.config``, the ``GradScaler`` class, ``math.exp`` and ``math.pow`` are
  process-wide. While one of our compiled functions runs (and only then) the settings
  and the stand-ins are in effect for the whole process: another ``torch.compile``'d
  function called from inside our step (nested compile), or one traced on another
  thread at the same moment, sees them too (code that is not being traced gets
  ``math``'s own functions). Anything not overlapping our calls sees the unpatched state.
* ``automatic_dynamic_shapes=True`` is narrowed to Python scalars
  (:func:`_static_tensor_shapes`): a tensor whose shape changes between calls is
  retraced with the new static shape, as torch_xla's own setting does. XLA compiles one
  executable per concrete shape either way, and torch_xla's autograd kernels
  (``native_layer_norm``) cannot run on symbolic sizes. ``torch.compile(dynamic=True)``
  still traces symbolic sizes; each concrete size then gets its own XLA executable.
* ``torch._dynamo.optimize(syncfree_xla)`` honours the hook without the forwarder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch._dynamo
from torch._dynamo.repro.after_dynamo import WrapBackendDebug
from torch.optim import _adafactor as torch_adafactor

from .. import options as options_mod
from . import (
    augmented_assignment,
    averaged_model,
    batch_norm,
    box_losses,
    grad_scaler,
    step_counters,
)

log = logging.getLogger(__name__)

__all__ = ["DYNAMO_SETTINGS", "RETURN_HOOKS", "backend_ctx", "install", "installed", "running"]

#: The Dynamo settings our frames are traced with (see the module docstring).
DYNAMO_SETTINGS: dict[str, Any] = {
    "capture_scalar_outputs": True,
    "specialize_float": False,
    "automatic_dynamic_shapes": True,
    # A float lr made a graph input brings a symbolic-shape guard; Dynamo would build
    # it as a C++ extension with the system compiler, 10-14 s in every fresh process
    # on two cores. Its Python form costs microseconds per call.
    "enable_cpp_symbolic_shape_guards": False,
    # With PyTorch's default a parameter's guards are skipped while its module's
    # __dict__ is unchanged, so unfreezing layers (p.requires_grad_(True)) reran the
    # graph traced with them frozen: they got no gradient and were silently never
    # trained (pytorch/pytorch#139476). Checking them costs microseconds per call.
    "skip_tensor_guards_with_matching_dict_tags": False,
}

#: One patch object, entered at each outermost call: building one defines a class (~50 us).
_DYNAMO_PATCH = torch._dynamo.config.patch(DYNAMO_SETTINGS)

_FORWARDED = "backend_ctx_ctor"
_MARK = "__syncfree_xla_scoped__"


def _enabled(options: Mapping[str, Any] | None) -> bool:
    try:
        return options_mod.resolve(options).syncfree_passes
    except ValueError:
        return True  # the backend itself reports bad options, with a clear message


_scope_lock = threading.Lock()
_scope_depth = 0
_scope_stack: contextlib.ExitStack | None = None
#: Called with no argument each time the last of our running calls returns: the end of
#: a compiled step, which the runtime joins into one computation (``runtime.step``).
RETURN_HOOKS: list[Callable[[], None]] = []


@contextlib.contextmanager
def _scope() -> Iterator[None]:
    """Puts the settings in force while at least one of our calls runs, on any thread.

    Counted rather than nested: two threads entering and leaving in interleaved order
    would otherwise each restore what the other had set, and leave the patched values
    in force for every backend after both returned.
    """
    global _scope_depth, _scope_stack
    with _scope_lock:
        if _scope_depth == 0:
            stack = contextlib.ExitStack()
            stack.enter_context(_DYNAMO_PATCH)
            stack.enter_context(_static_tensor_shapes())
            if not torch._dynamo.config.assume_static_by_default:  # dynamic=True
                stack.enter_context(_norms_for_symbolic_sizes())
            stack.enter_context(grad_scaler.masked_step())
            stack.enter_context(batch_norm.cumulative_average_traced())
            stack.enter_context(averaged_model.update_traced())
            stack.enter_context(augmented_assignment.augmented_assignment_keeps_tensor())
            stack.enter_context(step_counters.counters_on_device_when_traced())
            stack.enter_context(_adafactor_groups_by_dtype())
            stack.enter_context(_torch_gru_forward())
            stack.enter_context(_math_traced())
            stack.enter_context(box_losses.box_losses_traced())
            _scope_stack = stack
        _scope_depth += 1
    try:
        yield
    except BaseException:
        _leave()
        raise
    if _leave():
        for hook in list(RETURN_HOOKS):
            hook()


def running() -> bool:
    """Whether one of our compiled calls is running (on any thread)."""
    with _scope_lock:
        return _scope_depth > 0


def _leave() -> bool:
    """One of our calls returned; whether it was the last one running."""
    global _scope_depth, _scope_stack
    with _scope_lock:
        _scope_depth -= 1
        last = _scope_depth == 0
        if last and _scope_stack is not None:
            _scope_stack.close()
            _scope_stack = None
    return last


class _DropProfilerNotice(logging.Filter):
    """Keeps a warning every user of a torch optimizer would get off stderr.

    ``Optimizer.step`` runs inside ``torch.autograd.profiler.record_function``, which
    Dynamo leaves out of the graph with a warning: nothing the user wrote or can
    change, and nothing is lost (profiling a compiled step works as for any backend).
    Installed once on Dynamo's logger (:func:`install`); it drops the line only while
    one of our calls runs, so other backends still get it, and costs no call of ours.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return _scope_depth == 0 or record.msg != _PROFILER_NOTICE


_PROFILER_NOTICE = "Profiler function %s will be ignored"
_PROFILER_NOTICE_LOGGER = "torch._dynamo.variables.torch"
_DROP_PROFILER_NOTICE = _DropProfilerNotice()


@contextlib.contextmanager
def _static_tensor_shapes() -> Iterator[None]:
    """Automatic dynamism for Python scalars only; tensor shapes stay static.

    Dynamo's ``automatic_dynamic_shapes`` covers both: a float learning rate needs it
    (else it is a guarded constant), tensor sizes must not have it (see the module
    docstring). Dynamo asks ``process_automatic_dynamic`` once per scalar and per tensor
    it wraps; a tensor's entry is answered with its own static sizes, unmerged.
    """
    from torch._dynamo.pgo import auto_dynamic
    from torch._dynamo.variables import builder

    stock = builder.process_automatic_dynamic

    def scalars_only(tx: Any, name: str, entry: Any, **kwargs: Any) -> Any:
        if entry.size is auto_dynamic:  # a Python int or float
            return stock(tx, name, entry, **kwargs)
        return entry

    builder.process_automatic_dynamic = scalars_only
    try:
        yield
    finally:
        builder.process_automatic_dynamic = stock


#: torch_xla's own autograd kernels that ask for concrete sizes (``numel()``), so that
#: Dynamo cannot trace them with symbolic ones; PyTorch's reference implementations of
#: the same ops can be traced either way and differentiate through plain aten ops.
_SYMBOLIC_SIZE_REFS = ("native_layer_norm", "native_group_norm")


@contextlib.contextmanager
def _norms_for_symbolic_sizes() -> Iterator[None]:
    """Layer and group norm traceable under ``torch.compile(dynamic=True)``.

    While in force, the ``AutogradXLA`` kernels of :data:`_SYMBOLIC_SIZE_REFS` are the
    ``torch._refs`` ones; leaving removes them, and torch_xla's come back.
    """
    import torch._refs

    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in _SYMBOLIC_SIZE_REFS:
                lib.impl(name, getattr(torch._refs, name), "AutogradXLA")
        yield
    finally:
        lib._destroy()


def _adafactor_groups(tensorlists: list[list[Any]]) -> dict[tuple[Any, Any, bool], list[list[Any]]]:
    """Adafactor's foreach grouping by device, dtype and dimensionality, also when traced.

    torch 2.9 groups tensors under ``torch.compile`` as if of one unknown dtype
    (``Optimizer._group_tensors_by_device_and_dtype`` returns ``(None, None)`` while
    compiling), and then ``_multi_tensor_adafactor`` cannot derive its default ``eps1``
    from the dtype: ``foreach=True`` fails to trace with any backend. The grads' devices
    and dtypes are static facts to Dynamo, so the grouping can be done in full.
    """
    if not torch.compiler.is_compiling():
        return _STOCK_ADAFACTOR_GROUPS(tensorlists)
    grouped: dict[tuple[Any, Any, bool], list[list[Any]]] = {}
    for j, grad in enumerate(tensorlists[1]):  # as torch's: grads are the second list
        key = (grad.device, grad.dtype, grad.dim() > 1)
        if key not in grouped:
            grouped[key] = [[] for _ in tensorlists]
        for lists, tensors in zip(grouped[key], tensorlists):
            lists.append(tensors[j])
    return grouped


_STOCK_ADAFACTOR_GROUPS = torch_adafactor._group_tensors_by_device_dtype_and_is_multidim


@contextlib.contextmanager
def _adafactor_groups_by_dtype() -> Iterator[None]:
    """Swaps in :func:`_adafactor_groups` for the duration (read by Dynamo as it traces)."""
    torch_adafactor._group_tensors_by_device_dtype_and_is_multidim = _adafactor_groups
    try:
        yield
    finally:
        torch_adafactor._group_tensors_by_device_dtype_and_is_multidim = _STOCK_ADAFACTOR_GROUPS


@contextlib.contextmanager
def _torch_gru_forward() -> Iterator[None]:
    """torch's own ``GRU.forward`` on the GRU class ``import torch_xla`` puts in its place.

    torch_xla replaces ``torch.nn.GRU`` with a subclass whose forward runs AOTAutograd
    over the cell and lowers a scan of it itself (``torch_xla/_patched_functions.py``).
    Traced by Dynamo, that forward compiles the cell with this backend and calls the
    result under AOTAutograd's tracer, with tensors torch_xla's runtime cannot read: the
    process crashed. torch's forward computes the same function of the same parameters
    and traces as one ``aten.gru``. The class is found as ``torch.nn.GRU``, not imported.
    """
    stock = torch.nn.modules.rnn.GRU
    installed = torch.nn.GRU
    replaced = vars(installed).get("forward") if installed is not stock else None
    if replaced is None or not issubclass(installed, stock):
        yield
        return
    installed.forward = stock.forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        installed.forward = replaced  # type: ignore[method-assign]


_STOCK_EXP = math.exp
_LOG2_E = 1.0 / math.log(2.0)


def _traceable_exp(x: float) -> float:
    """``math.exp`` as Dynamo can keep symbolic: ``2 ** (x * log2(e))``.

    torch has no symbolic ``exp`` (it has ``cos``, ``sqrt`` and a few more), so Dynamo
    evaluates ``math.exp`` of a float the step takes as input and guards on its value: a
    ramp such as ``2 / (1 + math.exp(-10 * p)) - 1`` (a gradient reversal schedule) or
    ``1 - math.exp(-updates / 2000)`` (an EMA warm-up) recompiled the step at every
    value. A power of a number is symbolic, and ``tensorify_scalar_reads`` turns it into
    tensor math. Run eagerly (not being traced), or given a tensor (whose ``math.exp``
    is a Python float), this is ``math.exp`` itself.
    """
    if torch.compiler.is_compiling() and not isinstance(x, torch.Tensor):
        return 2.0 ** (x * _LOG2_E)
    return _STOCK_EXP(x)


_STOCK_POW = math.pow


def _traceable_pow(x: float, y: float) -> float:
    """``math.pow`` as Dynamo can keep symbolic: ``float(x) ** y``.

    Dynamo evaluates ``math.pow`` of a step count and guards on it: Hugging Face's
    Adafactor (``1.0 - math.pow(state["step"], decay_rate)``) recompiled every step until
    Dynamo's limit, then ran lazily with 25 host reads a step. ``**`` of a float is
    symbolic. Run eagerly, or given a tensor, this is ``math.pow`` itself. One difference,
    in a program eager rejects: a negative number to a fractional power raises in
    ``math.pow`` and is complex (or NaN, once tensor math) here.
    """
    if torch.compiler.is_compiling() and not isinstance(x, torch.Tensor) \
            and not isinstance(y, torch.Tensor):
        return torch.sym_float(x) ** y
    return _STOCK_POW(x, y)


@contextlib.contextmanager
def _math_traced() -> Iterator[None]:
    """Puts :func:`_traceable_exp` and :func:`_traceable_pow` in ``math`` for the duration."""
    math.exp, math.pow = _traceable_exp, _traceable_pow
    try:
        yield
    finally:
        math.exp, math.pow = _STOCK_EXP, _STOCK_POW


def backend_ctx(options: Mapping[str, Any] | None = None,
                **_compile_kwargs: Any) -> contextlib.AbstractContextManager[Any]:
    """The context Dynamo enters around each call of a function compiled by us.

    Takes the keyword arguments ``torch.compile`` passes to the backend, so that
    ``options={"syncfree_passes": False}`` (or ``SYNCFREE_XLA_SYNCFREE_PASSES=0``)
    keeps stock Dynamo behaviour too: captured scalars without the passes that
    rewrite them would crash AOTAutograd instead of merely syncing.
    """
    return _scope() if _enabled(options) else contextlib.nullcontext()


def _forward_backend_ctx_ctor(self: Any, name: str) -> Any:
    """``WrapBackendDebug.__getattr__``: runs only when normal lookup failed.

    Forwards ``backend_ctx_ctor`` only from a backend :func:`install` marked, found as
    the ``compiler_fn`` of ``torch.compile``'s ``_TorchCompileWrapper`` or as the wrapped
    function itself. The options torch.compile passes the backend are resolved here,
    once per ``torch.compile`` call, not at every step (that costs ~20 us). Any other
    name, or any other backend, raises ``AttributeError`` as before.
    """
    if name == _FORWARDED:
        inner = self.__dict__.get("_torchdynamo_orig_backend")
        compiler_fn = getattr(inner, "compiler_fn", None)
        if getattr(compiler_fn, _MARK, False):
            kwargs = getattr(inner, "kwargs", None) or {}
            return _scope if _enabled(kwargs.get("options")) else contextlib.nullcontext
        if getattr(inner, _MARK, False):
            return inner.backend_ctx_ctor
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


setattr(_forward_backend_ctx_ctor, _MARK, True)


def installed() -> bool:
    """Whether ``WrapBackendDebug`` forwards ``backend_ctx_ctor`` for marked backends."""
    hook = WrapBackendDebug.__dict__.get("__getattr__")
    return hook is not None and getattr(hook, _MARK, False)


def install(backend: Callable[..., Any]) -> None:
    """Makes ``torch.compile(..., backend=backend)`` run under this module's scope.

    Idempotent. Sets ``backend.backend_ctx_ctor`` to :func:`backend_ctx` and marks
    ``backend`` as one whose hook is forwarded. If some other code already gave
    ``WrapBackendDebug`` a ``__getattr__``, that one is left alone (never replace
    someone else's hook) and a warning says the settings will not be scoped.
    """
    backend.backend_ctx_ctor = backend_ctx  # type: ignore[attr-defined]
    setattr(backend, _MARK, True)
    profiler_logger = logging.getLogger(_PROFILER_NOTICE_LOGGER)
    if _DROP_PROFILER_NOTICE not in profiler_logger.filters:
        profiler_logger.addFilter(_DROP_PROFILER_NOTICE)
    if installed():
        return
    if "__getattr__" in WrapBackendDebug.__dict__:
        log.warning(
            "syncfree_xla: WrapBackendDebug already has a __getattr__ of someone else's; "
            "not replacing it, so torch.compile may ignore this backend's Dynamo settings "
            "(float learning rates may then recompile every step)"
        )
        return
    WrapBackendDebug.__getattr__ = _forward_backend_ctx_ctor  # type: ignore[attr-defined]
    log.debug("syncfree_xla: WrapBackendDebug now forwards %s", _FORWARDED)
