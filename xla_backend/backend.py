"""The function ``torch.compile(..., backend="syncfree_xla")`` calls for each Dynamo graph.

Dynamo graph -> AOTAutograd (forward / backward / inference aten graphs) -> passes
-> lowering to one XLA computation per graph.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd

import passes

from . import counters, dynamo_scope, rewrites
from . import options as options_mod
from .device import configure_pjrt
from .rewrites.norms import norm_decompositions

configure_pjrt()

# torch_xla must see PJRT_DEVICE before it is imported
from . import lowering, partition, rng_state  # noqa: E402

log = logging.getLogger(__name__)
_graph_ids = itertools.count()

#: Watchers told about every graph compiled here (``on_dynamo_graph(gm, options)`` before
#: the passes, ``on_aten_graph(name, gm)`` before lowering), so ``xla_backend.explain``
#: can report sync points per graph. Empty unless it runs; must not modify ``gm``.
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
        raise lowering.DeviceMismatchError(
            f"syncfree_xla: {_source_name(node)} is a {value.device.type} tensor of shape "
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
            raise lowering.UnsupportedOnXla(
                f"syncfree_xla: {node.target.__name__} with sparse=True ({where}) would "
                f"produce a sparse gradient, which torch_xla cannot represent. Use "
                f"sparse=False, and a dense optimizer (Adam instead of SparseAdam)."
            )


def _boxed(fn: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """Marks ``fn`` as taking one list, so AOTAutograd can free its inputs early."""

    def call(args: list[Any]) -> Any:
        return fn(args)

    call._boxed_call = True  # type: ignore[attr-defined]
    return call


def _compile_aten_graph(kind: str, opts: options_mod.Options
                        ) -> Callable[[torch.fx.GraphModule, Sequence[Any]], Callable]:
    def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        name = f"{kind} graph {next(_graph_ids)}"
        passes.run_pipeline(gm, rewrites.ATEN_REWRITES)
        gm, seeded = rng_state.functionalize(gm)
        for observer in list(OBSERVERS):
            observer.on_aten_graph(name, gm)
        if seeded:
            example_inputs = [*example_inputs, rng_state.example_seed(gm)]
        compiled = partition.lower(gm, example_inputs, name=name, fallback=opts.fallback,
                                  options=opts)
        if seeded:
            compiled = rng_state.SeededCall(compiled, lowering.xla_device())
        return _boxed(compiled)

    return compile_graph


def syncfree_xla(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 options: Mapping[str, Any] | None = None) -> Callable:
    """The backend. ``options`` comes from ``torch.compile(..., options={...})``."""
    opts = options_mod.resolve(options)
    counters.incr(counters.GRAPHS_RECEIVED)
    check_input_devices(gm, example_inputs)
    check_dense_gradients(gm)
    for observer in list(OBSERVERS):
        observer.on_dynamo_graph(gm, opts)
    if opts.syncfree_passes:  # Dynamo-level rewrites; placeholders stay as they are
        passes.run_pipeline(gm, passes.DYNAMO_PASSES)
    compile_fn = aot_autograd(
        fw_compiler=_compile_aten_graph("forward", opts),
        bw_compiler=_compile_aten_graph("backward", opts),
        inference_compiler=_compile_aten_graph("inference", opts),
        keep_inference_input_mutations=True,
        decompositions=norm_decompositions(),
    )
    return compile_fn(gm, example_inputs)


# Dynamo settings for our frames only (float lr as an input, captured .item()).
dynamo_scope.install(syncfree_xla)
