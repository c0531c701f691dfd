"""The AOTAutograd tier: a Dynamo graph seen before skips AOTAutograd in a new process.

AOTAutograd is the largest part of a cold first step (the metadata pass, the
joint-graph trace and the partitioner; about 4.5 s of the DESIGN.md transformer LM's
first step under a profiler, against 0.6 s for everything this backend does after
it). torch 2.9's own AOTAutograd cache serves Inductor only and pickles its entries;
this tier stores the same result as data (``xla_backend.aot``, ``cache.fx_codec``):
the aten graphs AOTAutograd made, and its runtime metadata as JSON.

The key is the Dynamo graph (after this backend's Dynamo-level passes, in the graph
tier's canonical form), each input's metadata (shape, strides, offset, dtype, device,
requires_grad, leaf-ness, parameter-ness, view-ness, which inputs alias each other),
the grad, inference, autocast and determinism modes and ``torch._functorch.config``
that AOTAutograd reads, its decompositions, the torch version, the format versions and
a digest of this backend's source (``graph_cache.code_digest``: what the decompositions
compute is in it).

Entries live in the same store as the graph tier's, so one cache directory, one
size limit and one ``syncfree-xla cache`` command cover both. Like the graph tier,
trouble reading or writing an entry costs AOTAutograd's time, never a crash: a bad
entry is logged once, discarded, and the graph goes through AOTAutograd.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._functorch.config as functorch_config
import torch.fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .. import aot, counters
from .. import options as options_mod
from ..rewrites.lowering_gaps import (
    DIFFERENTIATED_AS_DECOMPOSED,
    REDEFINED_AUTOGRAD,
    ungraded_ops,
)
from ..warn_once import WarnOnce
from . import fx_codec
from . import key as key_mod
from .graph_cache import (
    Uncacheable,
    canonical_graph,
    dumps,
    environment_components,
    store_for,
)
from .store import PREAMBLE, Store

log = logging.getLogger(__name__)

#: Bump when what an entry holds, or how it is read, changes.
ENTRY_FORMAT = 3
_MAGIC = b"SFXAOTG\0"
warn_once = WarnOnce(log)


def _input_signature(inputs: Sequence[Any]) -> list[Any]:
    roots: dict[int, int] = {}  # id of a tensor (a view's base) -> the first input over it
    out: list[Any] = []
    for k, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise Uncacheable(f"an input is a {type(x).__name__} (a symbolic size or scalar)")
        if is_traceable_wrapper_subclass(x):
            raise Uncacheable(f"input {k} is a tensor subclass ({type(x).__name__})")
        try:
            spec = fx_codec.tensor_spec(x)
        except fx_codec.Unencodable as e:
            raise Uncacheable(str(e)) from None
        root = id(x._base) if x._is_view() and x._base is not None else id(x)
        spec.update(storage_offset=int(x.storage_offset()), leaf=bool(x.is_leaf),
                    parameter=isinstance(x, torch.nn.Parameter),
                    static=hasattr(x, "_dynamo_static_input_type"), view=x._is_view(),
                    # AOTAutograd treats inputs that alias each other apart
                    aliases=roots.setdefault(root, k))
        out.append(spec)
    return out


def _modes() -> dict[str, Any]:
    """The global state and configuration AOTAutograd traces under."""
    autocast = {}
    for device in ("cpu", "xla"):
        try:
            autocast[device] = [torch.is_autocast_enabled(device),
                                str(torch.get_autocast_dtype(device))]
        except RuntimeError:  # a device type without autocast support
            autocast[device] = None
    return {"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
            "autocast": autocast, "deterministic": torch.are_deterministic_algorithms_enabled(),
            "functorch": json.dumps(functorch_config.save_config_portable(), sort_keys=True,
                                    default=repr)}


def _lifted(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The tensors AOTAutograd passes ahead of the graph's inputs: parameters, then buffers.

    Every tensor attribute of a Dynamo graph is one of them (the optimizer's parameters
    and state, in an optimizer step's graph). AOTAutograd traces them as fake inputs
    and the compiled graph reads them live, so their values are not part of the key:
    a job resumed from a checkpoint finds the entries its first run wrote.
    """
    return [*dict(gm.named_parameters(remove_duplicate=False)).values(),
            *dict(gm.named_buffers(remove_duplicate=False)).values()]


def aot_key(gm: torch.fx.GraphModule, inputs: Sequence[Any],
            decompositions: dict[Any, Callable]) -> key_mod.CacheKey:
    """The key of AOTAutograd's result for ``gm`` on ``inputs``; Uncacheable if none."""
    lifted = _lifted(gm)
    position: dict[int, int] = {}
    for k, t in enumerate(lifted):
        position.setdefault(id(t), k)
    components = environment_components()
    components.update({
        key_mod.GRAPH: dumps(canonical_graph(
            gm, lambda t: {"lifted": position[id(t)]} if id(t) in position else None)),
        # one list, so that aliasing between attributes and inputs is seen
        key_mod.INPUT_SIGNATURE: dumps({"lifted": len(lifted),
                                        "inputs": _input_signature([*lifted, *inputs]),
                                        "modes": _modes()}),
        key_mod.PASSES_VERSION: f"{components[key_mod.PASSES_VERSION]};"
                                f"aot_entry={ENTRY_FORMAT};aot_meta={aot.META_FORMAT}",
        key_mod.XLA_FLAGS: "",  # AOTAutograd's graphs do not depend on XLA
        key_mod.SHARDING: "",
        key_mod.OPTIONS: dumps({"decompositions": sorted(str(op) for op in decompositions),
                                "composite_autograd": [str(op) for op in ungraded_ops()],
                                "decomposed_autograd": [str(op) for op in
                                                        DIFFERENTIATED_AS_DECOMPOSED],
                                "redefined_autograd": [str(op) for op in REDEFINED_AUTOGRAD],
                                "keep_inference_input_mutations": True}),
    })
    return key_mod.backend_key(components)


# ---------------------------------------------------------------------------
# The entry


def encode_entry(captured: aot.Captured) -> bytes:
    """Bytes for the store; Uncacheable where the capture has no exact stored form."""
    if captured.problem is not None:
        raise Uncacheable(captured.problem)
    blobs: list[bytes] = []
    try:
        header = {
            "byteorder": sys.byteorder,
            "meta": captured.meta,
            "forward": fx_codec.encode_graph(captured.forward, blobs),
            "backward": (None if captured.backward is None
                         else fx_codec.encode_graph(captured.backward, blobs)),
            "backward_inputs": [fx_codec.tensor_spec(t) for t in captured.backward_inputs],
            "forward_values": _values(captured.forward),
            "backward_values": None if captured.backward is None else _values(captured.backward),
            "detach": list(captured.detach),
        }
    except fx_codec.Unencodable as e:
        raise Uncacheable(str(e)) from None
    header["blob_lengths"] = [len(b) for b in blobs]
    raw = dumps(header).encode("utf-8")
    return b"".join([PREAMBLE.pack(_MAGIC, ENTRY_FORMAT, len(raw)), raw, *blobs])


def _values(gm: torch.fx.GraphModule) -> list[Any] | None:
    """The graph's node values as stored, or None (a restart propagates fakes instead)."""
    try:
        return fx_codec.encode_values(gm.graph)
    except fx_codec.Unencodable:
        return None


def _read_values(doc: Any) -> list[Any] | None:
    return None if doc is None else fx_codec.read_values(doc, aot.TensorMeta, aot.ABSENT)


def _split(payload: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """An entry's JSON header and its blobs; ValueError if they do not fit together."""
    if len(payload) < PREAMBLE.size:
        raise ValueError("truncated")
    magic, version, length = PREAMBLE.unpack_from(payload)
    if magic != _MAGIC or version != ENTRY_FORMAT:
        raise ValueError(f"not an AOTAutograd entry of format {ENTRY_FORMAT}")
    start = PREAMBLE.size + length
    header = json.loads(payload[PREAMBLE.size:start])
    if not isinstance(header, dict) or header.get("byteorder") != sys.byteorder:
        raise ValueError("bad header")
    lengths = header.get("blob_lengths")
    if not isinstance(lengths, list) or start + sum(lengths) != len(payload):
        raise ValueError("blobs do not fill the entry")
    blobs = []
    for n in lengths:
        blobs.append(payload[start:start + n])
        start += n
    return header, blobs


def decode_entry(payload: bytes) -> aot.Artifacts:
    """The stored result; ValueError (fx_codec.BadGraph among them) if inconsistent."""
    header, blobs = _split(payload)
    backward = header.get("backward")
    specs = header.get("backward_inputs")
    detach = header.get("detach")
    if not isinstance(specs, list) or not isinstance(detach, list) \
            or not isinstance(header.get("meta"), dict):
        raise ValueError("bad header")
    return aot.Artifacts(
        meta=header["meta"],
        forward=fx_codec.decode_graph(header.get("forward"), blobs),
        backward=None if backward is None else fx_codec.decode_graph(backward, blobs),
        backward_inputs=[fx_codec.read_tensor_spec(s)[:4] for s in specs],
        detach=[int(i) for i in detach],
        forward_values=_read_values(header.get("forward_values")),
        backward_values=_read_values(header.get("backward_values")),
    )


def _check_decodes_to(payload: bytes) -> None:
    """Uncacheable unless the entry's graphs read back as the very graphs they were
    written from (each decodes, and encodes to the same nodes and constants)."""
    header, blobs = _split(payload)
    for name in ("forward", "backward"):
        doc = header[name]
        if doc is not None and not fx_codec.round_trips(doc, blobs):
            raise Uncacheable(f"the {name} graph does not read back as it was written")


# ---------------------------------------------------------------------------
# The lookup the backend goes through


class AotLookup:
    """One Dynamo graph's trip through the tier: stored artifacts, or where a capture goes."""

    def __init__(self, store: Store | None, key: key_mod.CacheKey | None,
                 outcome: str = "a miss; its result is stored when complete") -> None:
        self.artifacts: aot.Artifacts | None = None
        self.outcome = outcome  # for explain: why AOTAutograd runs
        self._store = store
        self._key = key

    @property
    def cacheable(self) -> bool:
        return self._key is not None

    def store(self, captured: aot.Captured) -> None:
        """Stores a finished capture under this lookup's key; never raises."""
        if self._store is None or self._key is None:
            return
        try:
            payload = encode_entry(captured)
            _check_decodes_to(payload)
        except Uncacheable as e:
            counters.incr(counters.CACHE_AOT_UNCACHEABLE)
            log.info("syncfree-xla AOTAutograd result not cached: %s", e)
            return
        except Exception as e:
            warn_once("encode", "syncfree-xla AOTAutograd cache: cannot encode an entry (%s)", e)
            return
        try:
            self._store.put(self._key.digest, payload, self._key.component_hashes,
                            {"format": ENTRY_FORMAT, "tier": "aot",
                             "backward": captured.backward is not None})
        except Exception as e:
            warn_once("put", "syncfree-xla AOTAutograd cache: cannot store an entry (%s)", e)

    def hit(self) -> None:
        """The stored result rebuilt: AOTAutograd was skipped."""
        counters.incr(counters.CACHE_AOT_HITS)

    def reject(self, error: Exception) -> None:
        """A stored result that did not rebuild: say so once, and drop the entry."""
        counters.incr(counters.CACHE_AOT_REJECTED)
        counters.incr(counters.CACHE_AOT_MISSES)
        self.artifacts = None
        self.outcome = f"its cache entry was unusable ({type(error).__name__}); stored again"
        digest = self._key.digest if self._key is not None else "?"
        warn_once("load", "syncfree-xla AOTAutograd cache: entry %s is unusable (%s: %s); "
                  "running AOTAutograd", digest[:16], type(error).__name__, error)
        if self._store is not None and self._key is not None:
            try:
                self._store.discard(digest, f"unusable AOTAutograd entry: {error}")
            except Exception as e:
                log.debug("cannot discard entry %s: %s", digest[:16], e)


def lookup(gm: torch.fx.GraphModule, inputs: Sequence[Any], opts: options_mod.Options,
           decompositions: dict[Any, Callable]) -> AotLookup:
    """Looks the Dynamo graph ``gm`` up; ``.artifacts`` is set on a usable entry."""
    try:
        store = store_for(opts)
        key = aot_key(gm, inputs, decompositions)
    except Uncacheable as e:
        counters.incr(counters.CACHE_AOT_UNCACHEABLE)
        log.debug("Dynamo graph not cacheable: %s", e)
        return AotLookup(None, None, f"not cacheable: {e}")
    except Exception as e:
        warn_once("key", "syncfree-xla AOTAutograd cache: cannot build a key (%s)", e)
        return AotLookup(None, None, f"no cache key: {e}")
    found = AotLookup(store, key)
    try:
        payload = store.get(key.digest)
    except Exception as e:
        warn_once("get", "syncfree-xla AOTAutograd cache: lookup failed (%s)", e)
        payload = None
    if payload is not None:
        try:
            found.artifacts = decode_entry(payload)
        except Exception as e:
            found.reject(e)
            return found
    if found.artifacts is None:
        counters.incr(counters.CACHE_AOT_MISSES)
    return found
