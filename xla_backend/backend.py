"""The backend ``torch.compile(..., backend="syncfree_xla")`` calls for each Dynamo graph.

The wiring of the stages, and nothing else: options -> Dynamo scope (``dynamo``) ->
Dynamo passes (``passes``) -> AOTAutograd (forward / backward / inference aten graphs) ->
aten rewrites (``rewrites``) -> split and trace (``lower``) -> graph cache (``cache``) ->
compile and replay (``runtime``).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import re
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import unset_fake_temporarily

import passes
from passes import pipeline as pass_pipeline

from . import aot, counters, rewrites, warn_once
from . import options as options_mod
from .device import configure_pjrt, cpu_client
from .dynamo import grad_scaler, interrupts, step_counters
from .dynamo import scope as dynamo_scope
from .errors import DeviceMismatchError, UnsupportedOnXla
from .rewrites.lowering_gaps import gap_decompositions, restore_composite_autograd
from .rewrites.norms import norm_decompositions

configure_pjrt()

# torch_xla must see PJRT_DEVICE before it is imported
from .cache import aot_cache, graph_cache  # noqa: E402
from .runtime import compile_pool, host_memory, partition, rng_state, step  # noqa: E402
from .runtime.graph import xla_device  # noqa: E402

if cpu_client():  # device buffers are host memory: keep a step's temporaries mapped
    host_memory.keep_step_heaps()
restore_composite_autograd()  # torch_xla is imported: its registrations are known

log = logging.getLogger(__name__)

#: Watchers told about every graph compiled here (``on_dynamo_graph(gm, options)`` before
#: the passes, ``on_aot(gm, outcome)`` with what the AOTAutograd cache did, and
#: ``on_aten_graph(name, gm)`` before lowering), so ``xla_backend.tools.explain`` can
#: report per graph. Empty unless it runs; must not modify ``gm``.
OBSERVERS: list[Any] = []


def _source_name(node: torch.fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source.name() if source is not None else node.name


def check_input_devices(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Rejects non-XLA tensors up front, naming the argument, instead of deep in torch_xla.

    0-d CPU tensors are allowed: PyTorch treats them as scalars next to device
    tensors, and optimizers keep their step counters in them.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor) or value.device.type == "xla":
            continue
        if value.device.type == "cpu" and value.dim() == 0:
            continue
        name = _source_name(node)
        if name.startswith("___from_numpy("):  # Dynamo's name for a numpy array it lifted
            raise DeviceMismatchError(
                f"syncfree_xla: the compiled function reads a numpy array, "
                f"{name[len('___from_numpy('):-1]}, of shape {tuple(value.shape)}; Dynamo "
                f"passes it as a CPU tensor, and this backend runs on the XLA device. Read "
                f"the number outside the compiled function and pass it in, as in "
                f"step(x, y, lr=float(lr_schedule[it])), or keep the array as a tensor on "
                f"the XLA device."
            )
        if re.fullmatch(r"L\[[^]]+\](\.\w+)+", name):  # L['m'].w: not a parameter or buffer
            raise DeviceMismatchError(
                f"syncfree_xla: {name} is a {value.device.type} tensor of shape "
                f"{tuple(value.shape)} kept as a plain attribute, which model.to() does not "
                f"move, and this backend runs on the XLA device. Register it with "
                f"register_buffer() so that model.to(torch_xla.device()) moves it, or make "
                f"it on torch_xla.device()."
            )
        raise DeviceMismatchError(
            f"syncfree_xla: {name} is a {value.device.type} tensor of shape "
            f"{tuple(value.shape)}, but this backend runs on the XLA device. Move the model "
            f"and its inputs there first: model.to(torch_xla.device()), "
            f"x = x.to(torch_xla.device())."
        )


#: Dynamo-graph functions whose ``sparse=True`` makes autograd produce a sparse gradient.
_SPARSE_GRADIENT_OPS = (torch.nn.functional.embedding, torch.nn.functional.embedding_bag)


def check_dense_gradients(gm: torch.fx.GraphModule) -> None:
    """Rejects ``Embedding(sparse=True)`` up front: torch_xla has no sparse tensors.

    Without this the backward fails deep in torch_xla ("Could not run
    'aten::_sparse_coo_tensor_with_dims_and_tensors' ... 'SparseXLA' backend").
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SPARSE_GRADIENT_OPS:
            continue
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except TypeError:
            continue  # torch reports a bad call itself
        if bound.arguments.get("sparse") is True:
            frames = [line.strip() for line in node.meta.get("stack_trace", "").splitlines()
                      if line.strip().startswith("File ")]
            where = frames[-1] if frames else node.name
            raise UnsupportedOnXla(
                f"syncfree_xla: {node.target.__name__} with sparse=True ({where}) would "
                f"produce a sparse gradient, which torch_xla cannot represent. Use "
                f"sparse=False, and a dense optimizer (Adam instead of SparseAdam)."
            )


_autograd_reaches_xla = False


def check_autograd_reaches_xla(example_inputs: Sequence[Any]) -> None:
    """Fails a training graph up front when autograd cannot run a backward on XLA.

    Autograd's engine sets up one queue per device at the process's first backward. A
    backward run before torch_xla's runtime started (an eager CPU reference, say)
    leaves XLA without one, and every later XLA backward fails with an INTERNAL ASSERT
    in ``engine.cpp`` (pytorch/xla#4174). A backward of one lazy scalar finds out,
    without running anything on the device; once it passes it always will.
    """
    global _autograd_reaches_xla
    if _autograd_reaches_xla or not torch.is_grad_enabled() or not any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return
    with unset_fake_temporarily(), torch.enable_grad():
        probe = torch.zeros((), device=xla_device(), requires_grad=True)
        try:
            torch.autograd.grad(probe * 2, probe)
        except RuntimeError as e:
            if "device_ready_queues_" not in str(e):
                raise
            raise RuntimeError(
                "syncfree_xla: autograd cannot run a backward on the XLA device in this "
                "process: a backward ran before torch_xla's runtime started, and autograd "
                "set up its device queues without XLA's (pytorch/xla#4174). Call "
                "torch_xla.device() before the first backward (an eager CPU reference's "
                "included), or run that backward in another process.") from None
    _autograd_reaches_xla = True


def _boxed(fn: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """Marks ``fn`` as taking one list, so AOTAutograd can free its inputs early."""

    def call(args: list[Any]) -> Any:
        return fn(args)

    call._boxed_call = True  # type: ignore[attr-defined]
    return call


def _int_tensor(value: int | None) -> torch.Tensor:
    """A Python int input as ``passes.tensorify_int_inputs`` takes it: 0-d int64, host."""
    return torch.tensor(0 if value is None else value, dtype=torch.int64)


def _converting_inputs(compiled: Callable, ints: list[int],
                       moves: Mapping[int, torch.device]) -> Callable:
    """``compiled``, taking the ints Dynamo passes at ``ints`` as 0-d tensors and the host
    tensors at ``moves`` moved to their device (``passes.hoist_device_moves``)."""
    if not ints and not moves:
        return compiled

    def convert(args: Sequence[Any]) -> list[Any]:
        args = list(args)
        for k in ints:
            args[k] = _int_tensor(args[k])
        for k, device in moves.items():
            args[k] = args[k].to(device)
        return args

    if getattr(compiled, "_boxed_call", False):
        def boxed(args: list[Any]) -> Any:
            converted = convert(args)
            args.clear()  # a boxed call frees its inputs as it goes
            return compiled(converted)

        boxed._boxed_call = True  # type: ignore[attr-defined]
        return boxed
    return lambda *args: compiled(*convert(args))


class SyncfreeXla:
    """The backend: a callable Dynamo hands each graph, with a ``reset`` it calls too.

    ``torch._dynamo.reset()`` calls ``reset()`` (through ``torch.compile``'s wrapper, as
    for ``torch._dynamo.backends.cudagraphs``), which forgets what this process compiled
    and warned about, as a fresh process would have it. Two things stay, on purpose: the
    graph cache's stores, which are the cache itself (a fresh process finds the same
    entries on disk), and the device RNG stream, which is training state, not
    compilation state.
    """

    compiler_name = "syncfree_xla"

    def __init__(self) -> None:
        self._graph_ids = itertools.count()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 options: Mapping[str, Any] | None = None, mode: str | None = None
                 ) -> Callable:
        """Compiles one Dynamo graph. ``options`` and ``mode`` come from ``torch.compile``."""
        options_mod.check_mode(mode)
        opts = options_mod.resolve(options)
        counters.incr(counters.GRAPHS_RECEIVED)
        grad_scaler.graph_compiling()
        interrupts.install()
        moves = passes.hoist_device_moves(gm, example_inputs)
        example_inputs = [aot.moved_example(x, moves[k]) if k in moves else x
                          for k, x in enumerate(example_inputs)]
        check_input_devices(gm, example_inputs)
        check_dense_gradients(gm)
        check_autograd_reaches_xla(example_inputs)
        for observer in list(OBSERVERS):
            observer.on_dynamo_graph(gm, opts)
        int_inputs: list[int] = []
        if opts.syncfree_passes:  # Dynamo-level rewrites
            if not any(isinstance(x, (list, tuple, dict)) for x in example_inputs):
                int_inputs = passes.tensorify_int_inputs(gm, example_inputs)
            if int_inputs:
                example_inputs = [_int_tensor(x.node.hint) if k in int_inputs else x
                                  for k, x in enumerate(example_inputs)]
            passes.run_pipeline(gm, passes.DYNAMO_PASSES)
        passes.run_pipeline(gm, rewrites.DYNAMO_REWRITES)
        if opts.cpu_rewrites and cpu_client():  # above AOTAutograd: rewrites the backward too
            passes.run_pipeline(gm, rewrites.CPU_DYNAMO_REWRITES)
        compilers = aot.Compilers(
            forward=self._aten_compiler("forward", opts),
            backward=self._aten_compiler("backward", opts),
            inference=self._aten_compiler("inference", opts),
            decompositions={**norm_decompositions(), **gap_decompositions()},
        )
        if any(isinstance(x, (list, tuple, dict)) for x in example_inputs):
            # nested inputs: Dynamo's own wrapper flattens them; not cached
            return aot_autograd(fw_compiler=compilers.forward, bw_compiler=compilers.backward,
                                inference_compiler=compilers.inference,
                                keep_inference_input_mutations=True,
                                decompositions=compilers.decompositions)(gm, example_inputs)
        found = aot_cache.lookup(gm, example_inputs, opts, compilers.decompositions)
        if found.artifacts is not None:
            try:
                compiled = aot.from_artifacts(gm, example_inputs, compilers, found.artifacts)
            except Exception as e:  # a stored result that does not fit costs AOTAutograd
                found.reject(e)
            else:
                found.hit()
                self._tell_aot(gm, "skipped: its graphs and metadata came from the cache")
                return _converting_inputs(compiled, int_inputs, moves)
        self._tell_aot(gm, "ran; " + found.outcome)
        return _converting_inputs(aot.compile_graph(gm, example_inputs, compilers,
                                                    found.store if found.cacheable else None),
                                  int_inputs, moves)

    @staticmethod
    def _tell_aot(gm: torch.fx.GraphModule, outcome: str) -> None:
        for observer in list(OBSERVERS):
            if hasattr(observer, "on_aot"):
                observer.on_aot(gm, outcome)

    def _aten_compiler(self, kind: str, opts: options_mod.Options
                       ) -> Callable[[torch.fx.GraphModule, Sequence[Any]], Callable]:
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
            name = f"{kind} graph {next(self._graph_ids)}"
            passes.run_pipeline(gm, rewrites.ATEN_REWRITES)
            gm, seeded = rng_state.functionalize(gm)
            for observer in list(OBSERVERS):
                observer.on_aten_graph(name, gm)
            if seeded:
                example_inputs = [*example_inputs, rng_state.example_seed(gm)]
            compiled = partition.lower(gm, example_inputs, name=name, fallback=opts.fallback,
                                      options=opts)
            if seeded:
                compiled = rng_state.SeededCall(compiled, xla_device())
            return _boxed(compiled)

        return compile_graph

    def reset(self) -> None:
        """Forgets this process's executables, finished compiles and warnings."""
        self._graph_ids = itertools.count()
        graph_cache.reset()
        compile_pool.reset()
        warn_once.reset_all()
        pass_pipeline.reset()
        step.joiner.reset()
        interrupts.uninstall()


#: The backend instance the ``torch_dynamo_backends`` entry point names.
syncfree_xla = SyncfreeXla()

# Dynamo settings for our frames only (float lr as an input, captured .item()).
dynamo_scope.install(syncfree_xla)
# The end of a compiled call is where a joined step runs (runtime.step, rule 1).
dynamo_scope.RETURN_HOOKS.append(step.joiner.returned)
# The user's capturable=False, which a frame writing into a param group puts back as traced.
dynamo_scope.RETURN_HOOKS.append(step_counters.give_back_capturable)
