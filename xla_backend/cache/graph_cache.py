"""Keeps lowered graphs in the content-addressed store, so a restarted job skips tracing.

Why an entry holds HLO and not an executable: on the CPU PJRT client torch_xla 2.9
cannot deserialize a compiled executable (its own persistent cache fails to read
entries back), so a new process must still run the XLA compile. What it can skip is
running the FX graph on lazy tensors and lowering the IR to HLO. An entry therefore
keeps the HLO module proto of the traced graph plus what lowering needs to feed and
read the computation (which parameter is which input, the values of captured
constants, where each output comes from). On a hit the proto is wrapped back into a
lazy computation on stand-in buffers and compiled. On CPU that saves little (for the
DESIGN transformer LM about 0.1 s of an ~8 s first step, which is mostly Dynamo,
AOTAutograd and the XLA compile; ``benchmarks/restart_bench.py`` measures it); the
entry format is where a serialized executable goes once a PJRT client can load one.

The key is built from named components (``cache.key``): the device graph in a
canonical form (ops, structure, literal and constant values; never node names or
source locations, so renaming a user variable still hits), the input signature, the
pass pipeline and entry format, library versions, scrubbed XLA_FLAGS, the device kind
and count, the SPMD shardings of the inputs (``spmd.signature``), and the options
that change generated code.

Entries are a small binary container (JSON header + raw blobs, never pickle). Any
trouble building, storing or loading an entry is logged once and the graph is traced
as if there were no cache: the cache may cost a compile, never a crash or a wrong
result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch_xla
import torch_xla.runtime as xr

import passes
from passes.rng import functionalize_rng

from .. import counters, spmd, xla_internals
from .. import options as options_mod
from ..lower.executable import (
    Computed,
    Executable,
    Input,
    Value,
    constants_as_buffers,
    run_hlo,
    standins,
    trace_lock,
)
from ..lower.trace import Trace
from ..rewrites import ATEN_REWRITES, CPU_DYNAMO_REWRITES, DYNAMO_REWRITES
from ..warn_once import WarnOnce
from . import key as key_mod
from .store import PREAMBLE, Store, default_cache_dir

log = logging.getLogger(__name__)

# Bump when what an entry holds, or how lowering reads it, changes.
# 2: traces during which an op fell back to the CPU are never stored; 3: an output that
# is a copy of an input says so ("input_copy"), so the caller gets a tensor of its own
ENTRY_FORMAT = 3
# The FX passes that run before lowering, in order (Dynamo-level ones, the Dynamo-level
# rewrites, the CPU client's, then the aten-level ones and the RNG rewrite); each one's name
# and version is in the key. Their effect on a graph is in
# the GRAPH component already; the versions make a changed pass an explained miss.
PIPELINE = (*passes.DYNAMO_PASSES, *DYNAMO_REWRITES, *CPU_DYNAMO_REWRITES, *ATEN_REWRITES,
            functionalize_rng)
PIPELINE_VERSION = ";".join(
    [f"{p.name}={p.version}" for p in PIPELINE] + [f"graph_entry={ENTRY_FORMAT}"]
)
# Options fields that change generated code without changing the FX graph. None do
# today: the cache fields only say where entries live, fallback/async_dispatch/
# compile_threads change how graphs run, and syncfree_passes rewrites the FX graph,
# which the GRAPH component already covers. Listing a field here puts it in the key.
CODEGEN_OPTIONS: tuple[str, ...] = ()
# torch_xla environment variables that change the HLO that tracing produces.
CODEGEN_ENV = ("XLA_USE_32BIT_LONG", "XLA_NO_SPECIAL_SCALARS", "XLA_USE_BF16",
               "XLA_DOWNCAST_BF16", "XLA_USE_FP16", "XLA_DOWNCAST_FP16")

_MAGIC = b"SFXGRPH\0"

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
              torch.complex64, torch.complex128)
}


class Uncacheable(Exception):
    """The graph or its results cannot be described by an entry; it is traced each time."""


class BadPayload(ValueError):
    """An entry whose bytes passed the store's checksum but do not make sense."""


# ---------------------------------------------------------------------------
# The key


def _literal(value: Any, node_index: dict[torch.fx.Node, int]) -> Any:
    """A JSON-able, process-independent rendering of one FX argument."""
    if isinstance(value, torch.fx.Node):
        return {"node": node_index[value]}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, complex):
        return {"complex": [value.real.hex(), value.imag.hex()]}
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return {type(value).__name__: str(value)}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_literal(v, node_index) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_literal(k, node_index), _literal(v, node_index)]
                         for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_literal(v, node_index) for v in (value.start, value.stop,
                                                             value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise Uncacheable(f"argument of type {type(value).__name__} has no canonical form")


def _target(target: Any) -> str:
    """A name that identifies the callable in any process, or Uncacheable."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"op:{target}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"hop:{target.name()}"
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if module in ("_operator", "operator", "math", "builtins") or _is_torch_module(module):
        # torch's own functions (Dynamo graphs call torch.nn.functional.*, torch._C._nn.*):
        # stable names, as the torch version is a key component of its own
        if qualname and _resolve(str(module), qualname) is target:
            return f"fn:{module}.{qualname}"
    name = getattr(target, "__name__", None)
    if name and getattr(torch, name, None) is target:  # torch.arange and other C builtins
        return f"fn:torch.{name}"
    raise Uncacheable(f"call target {target!r} cannot be named across processes")


def _is_torch_module(module: Any) -> bool:
    return module == "torch" or str(module).startswith("torch.")


def _resolve(module: str, qualname: str) -> Any:
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def _tensor_fingerprint(t: torch.Tensor) -> dict[str, Any]:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"dtype": str(t.dtype), "shape": list(t.shape), "stride": list(t.stride()),
            "device": t.device.type, "sha256": hashlib.sha256(data).hexdigest()}


def canonical_graph(gm: torch.fx.GraphModule,
                    attribute: Callable[[torch.Tensor], Any] | None = None) -> list[Any]:
    """The graph as ops and structure: nodes by topological index, constants by content.

    Node names, ``stack_trace`` and other metadata are left out on purpose, so the
    same computation written with other variable names (or on other source lines)
    gets the same key. ``attribute`` renders a tensor attribute instead of its
    content where it returns something other than None (a key whose compiler reads
    only the tensor's metadata).
    """
    node_index: dict[torch.fx.Node, int] = {}
    rendered: list[Any] = []
    for k, node in enumerate(gm.graph.nodes):
        node_index[node] = k
        if node.op == "placeholder":
            rendered.append(["placeholder"])
        elif node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            shown = attribute(value) if attribute and isinstance(value, torch.Tensor) else None
            if shown is not None:
                rendered.append(["get_attr", shown])
            elif isinstance(value, torch.Tensor):
                rendered.append(["get_attr", {"tensor": _tensor_fingerprint(value)}])
            elif isinstance(value, torch.fx.GraphModule):
                rendered.append(["get_attr", {"graph": canonical_graph(value)}])
            else:
                raise Uncacheable(f"get_attr of a {type(value).__name__}")
        elif node.op == "call_function":
            kwargs = dict(sorted(node.kwargs.items()))
            rendered.append(["call_function", _target(node.target),
                             _literal(tuple(node.args), node_index),
                             _literal(kwargs, node_index)])
        elif node.op == "call_method":
            kwargs = dict(sorted(node.kwargs.items()))
            rendered.append(["call_method", str(node.target),
                             _literal(tuple(node.args), node_index),
                             _literal(kwargs, node_index)])
        elif node.op == "output":
            rendered.append(["output", _literal(node.args, node_index)])
        else:
            raise Uncacheable(f"graph has a {node.op} node")
    return rendered


def input_signature(inputs: Sequence[Any]) -> list[Any]:
    """What the trace depends on in each device input: its metadata, or a literal's value."""
    signature: list[Any] = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            signature.append({"shape": list(x.shape), "dtype": str(x.dtype),
                              "stride": list(x.stride()), "requires_grad": x.requires_grad,
                              "device": x.device.type})
        else:
            signature.append({"value": _literal(x, {})})
    return signature


def dumps(value: Any) -> str:
    """The one JSON form of key components: compact, sorted, no NaN."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


_environment_lock = threading.Lock()
_environment: dict[str, str] = {}


def code_files() -> list[Path]:
    """This backend's own source: the ``xla_backend`` and ``passes`` packages."""
    roots = [Path(__file__).resolve().parents[1], Path(passes.__file__).resolve().parent]
    return sorted(f for root in roots for f in root.rglob("*.py"))


def code_digest() -> str:
    """A digest of :func:`code_files`, read once per process.

    What a graph is traced, rewritten, decomposed and lowered to is in that code, and a
    release that fixes any of it must not be served what its predecessor stored: pass
    versions cover the FX passes only, and the package version is not bumped per fix.
    """
    digest = hashlib.sha256()
    for path in code_files():
        digest.update(path.name.encode())
        try:
            digest.update(path.read_bytes())
        except OSError:  # unreadable source (a zipped install): its name only
            continue
    return digest.hexdigest()[:16]


def environment_components() -> dict[str, str]:
    """The components that are the same for every graph in this process."""
    with _environment_lock:
        if not _environment:
            _environment.update({
                key_mod.PASSES_VERSION: f"{PIPELINE_VERSION};code={code_digest()}",
                key_mod.TORCH_VERSION: torch.__version__,
                key_mod.TORCH_XLA_VERSION: torch_xla.__version__,
                key_mod.DEVICE_KIND: str(xr.device_type()),
                key_mod.DEVICE_COUNT: str(xr.global_runtime_device_count()),
            })
        return dict(_environment)


def graph_key(gm: torch.fx.GraphModule, inputs: Sequence[Any],
              opts: options_mod.Options,
              pinned: dict[int, int] | None = None) -> key_mod.CacheKey:
    """The cache key of ``gm`` traced on ``inputs``; Uncacheable if it has none.

    ``pinned`` (device output -> the input it updates) decides output shardings under
    SPMD, so it is part of the sharding component.
    """
    codegen = {name: getattr(opts, name) for name in CODEGEN_OPTIONS}
    codegen["env"] = {name: os.environ[name] for name in CODEGEN_ENV if name in os.environ}
    components = environment_components()
    components.update({
        key_mod.GRAPH: dumps(canonical_graph(gm)),
        key_mod.INPUT_SIGNATURE: dumps(input_signature(inputs)),
        key_mod.XLA_FLAGS: key_mod.scrub_xla_flags(os.environ.get("XLA_FLAGS")),
        key_mod.SHARDING: dumps(spmd.signature(inputs, pinned)),
        key_mod.OPTIONS: dumps(codegen),
    })
    return key_mod.backend_key(components)


# ---------------------------------------------------------------------------
# The entry: a JSON header and raw blobs


@dataclass
class GraphEntry:
    """A decoded entry. Tensors are CPU tensors; ``hlo`` is None for graphs that compute
    nothing (all outputs are inputs or constants)."""

    hlo: bytes | None
    hlo_params: list[tuple[tuple[int, ...], torch.dtype]]
    params: list[tuple[str, Any]]  # ("input", position) or ("const", tensor), HLO order
    computed: list[tuple[tuple[int, ...], torch.dtype]]  # shape/dtype per HLO output
    # ("computed", k), ("input", p), ("input_copy", p): a clone of input p, ("value", v)
    outputs: list[tuple[str, Any]]


class _BlobWriter:
    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        """``tensors``: those :meth:`tensor` will be given; the device's are read back
        together."""
        self.blobs: list[bytes] = []
        on_device = [t for t in tensors if t.device.type == "xla"]
        self._host = dict(zip(map(id, on_device), xla_internals.to_host(on_device)))

    def add(self, data: bytes) -> int:
        self.blobs.append(data)
        return len(self.blobs) - 1

    def tensor(self, t: torch.Tensor) -> dict[str, Any]:
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise Uncacheable(f"tensor of dtype {t.dtype}")
        host = self._host.get(id(t), t).detach().cpu()
        data = host.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"blob": self.add(data), "dtype": dtype, "shape": list(t.shape),
                "device": t.device.type}


#: Output kinds that are an input passed through, as it is or as a copy.
_INPUT_OUTPUTS = ("input", "input_copy")
#: Output kinds that name a position: a result of the HLO, or an input passed through.
_INDEXED_OUTPUTS = ("computed", *_INPUT_OUTPUTS)


def _scalar_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return {"scalar": value}
    if isinstance(value, float):
        return {"float": value.hex()}
    raise Uncacheable(f"output of type {type(value).__name__}")


def encode_entry(entry: GraphEntry) -> bytes:
    """Bytes for the store; Uncacheable if some value has no faithful encoding."""
    blobs = _BlobWriter([v for kind, v in [*entry.params, *entry.outputs]
                         if kind != "input" and isinstance(v, torch.Tensor)])
    params = [{"kind": "input", "position": v} if kind == "input"
              else {"kind": "const", "tensor": blobs.tensor(v)} for kind, v in entry.params]
    outputs: list[dict[str, Any]] = []
    for kind, v in entry.outputs:
        if kind in _INDEXED_OUTPUTS:
            outputs.append({"kind": kind, "index": v})
        elif isinstance(v, torch.Tensor):
            outputs.append({"kind": "tensor", "tensor": blobs.tensor(v)})
        else:
            outputs.append({"kind": "value", "value": _scalar_json(v)})
    header = {
        "byteorder": sys.byteorder,
        "hlo": None if entry.hlo is None else blobs.add(entry.hlo),
        "hlo_params": [_shape_json(s, d) for s, d in entry.hlo_params],
        "params": params,
        "computed": [_shape_json(s, d) for s, d in entry.computed],
        "outputs": outputs,
        "blob_lengths": [len(b) for b in blobs.blobs],
    }
    raw = dumps(header).encode("utf-8")
    return b"".join([PREAMBLE.pack(_MAGIC, ENTRY_FORMAT, len(raw)), raw, *blobs.blobs])


def _shape_json(shape: Sequence[int], dtype: torch.dtype) -> dict[str, Any]:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise Uncacheable(f"parameter of dtype {dtype}")
    return {"shape": [int(s) for s in shape], "dtype": name}


def _expect(condition: bool, why: str) -> None:
    if not condition:
        raise BadPayload(why)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_shape(item: Any) -> tuple[tuple[int, ...], torch.dtype]:
    _expect(isinstance(item, dict), "a shape is not an object")
    shape, dtype = item.get("shape"), item.get("dtype")
    _expect(isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape),
            "bad shape")
    _expect(dtype in _DTYPES, f"unknown dtype {dtype!r}")
    return tuple(shape), _DTYPES[dtype]


def _read_tensor(item: Any, blobs: list[bytes]) -> torch.Tensor:
    shape, dtype = _read_shape(item)
    index = item.get("blob")
    _expect(_is_int(index) and 0 <= index < len(blobs), "tensor names no blob")
    _expect(item.get("device") in ("cpu", "xla"), "tensor on an unknown device")
    data = blobs[index]
    itemsize = torch.empty((), dtype=dtype).element_size()
    _expect(len(data) == math.prod(shape) * itemsize, "tensor blob has the wrong length")
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def decode_entry(payload: bytes) -> tuple[GraphEntry, list[str]]:
    """The entry, and each tensor output's device; BadPayload if anything is inconsistent."""
    _expect(len(payload) >= PREAMBLE.size, "truncated")
    magic, version, header_length = PREAMBLE.unpack_from(payload)
    _expect(magic == _MAGIC, "not a graph entry")
    _expect(version == ENTRY_FORMAT, f"entry format {version}, expected {ENTRY_FORMAT}")
    _expect(PREAMBLE.size + header_length <= len(payload), "truncated header")
    try:
        header = json.loads(payload[PREAMBLE.size:PREAMBLE.size + header_length])
    except (ValueError, RecursionError) as e:
        raise BadPayload(f"unreadable header: {e}") from None
    _expect(isinstance(header, dict), "header is not an object")
    _expect(header.get("byteorder") == sys.byteorder, "written on a machine of other byte order")
    lengths = header.get("blob_lengths")
    _expect(isinstance(lengths, list) and all(_is_int(n) and n >= 0 for n in lengths),
            "bad blob table")
    start = PREAMBLE.size + header_length
    _expect(start + sum(lengths) == len(payload), "blobs do not fill the entry")
    blobs = []
    for n in lengths:
        blobs.append(payload[start:start + n])
        start += n

    hlo_index = header.get("hlo")
    _expect(hlo_index is None or (_is_int(hlo_index) and 0 <= hlo_index < len(blobs)),
            "hlo names no blob")
    hlo = None if hlo_index is None else blobs[hlo_index]
    hlo_params = [_read_shape(p) for p in _list(header, "hlo_params")]
    computed = [_read_shape(c) for c in _list(header, "computed")]
    params: list[tuple[str, Any]] = []
    for p in _list(header, "params"):
        _expect(isinstance(p, dict), "a parameter is not an object")
        if p.get("kind") == "input":
            _expect(_is_int(p.get("position")) and p["position"] >= 0, "bad input position")
            params.append(("input", p["position"]))
        elif p.get("kind") == "const":
            params.append(("const", _read_tensor(p.get("tensor"), blobs)))
        else:
            raise BadPayload(f"unknown parameter kind {p.get('kind')!r}")
    _expect(len(params) == len(hlo_params), "parameters and HLO parameters differ in number")
    for (kind, value), (shape, dtype) in zip(params, hlo_params):
        if kind == "const":
            _expect(tuple(value.shape) == shape and value.dtype == dtype,
                    "a constant does not match its HLO parameter")
    _expect((hlo is None) == (not computed), "HLO and computed outputs disagree")
    outputs: list[tuple[str, Any]] = []
    devices: list[str] = []
    for o in _list(header, "outputs"):
        _expect(isinstance(o, dict), "an output is not an object")
        kind = o.get("kind")
        if kind in _INDEXED_OUTPUTS:
            index = o.get("index")
            _expect(_is_int(index) and index >= 0, "bad output index")
            _expect(kind != "computed" or index < len(computed), "output names no result")
            outputs.append((kind, index))
        elif kind == "tensor":
            outputs.append(("value", _read_tensor(o.get("tensor"), blobs)))
            devices.append(o["tensor"]["device"])
        elif kind == "value":
            outputs.append(("value", _read_scalar(o.get("value"))))
        else:
            raise BadPayload(f"unknown output kind {kind!r}")
    return GraphEntry(hlo, hlo_params, params, computed, outputs), devices


def _list(header: dict[str, Any], name: str) -> list[Any]:
    value = header.get(name)
    _expect(isinstance(value, list), f"{name} is not a list")
    return value


def _read_scalar(item: Any) -> Any:
    _expect(isinstance(item, dict) and len(item) == 1, "bad scalar")
    if "scalar" in item:
        _expect(item["scalar"] is None or isinstance(item["scalar"], (bool, int)), "bad scalar")
        return item["scalar"]
    _expect(isinstance(item.get("float"), str), "bad float")
    try:
        return float.fromhex(item["float"])
    except ValueError:
        raise BadPayload("bad float") from None


# ---------------------------------------------------------------------------
# Stores, and the lookup ``runtime.graph`` goes through

_stores_lock = threading.Lock()
_stores: dict[tuple[str, int, bool], Store] = {}
# Executables built in this process, by digest: a memory-tier hit reuses one while any
# LoweredGraph still holds it, instead of rebuilding.
_live: weakref.WeakValueDictionary[str, Executable] = weakref.WeakValueDictionary()
#: the cache's warn-once: trouble with the cache costs a compile, and says so once
warn_once = WarnOnce(log)


def reset() -> None:
    """Lets go of this process's executables; the stores (and their memory tier) stay.

    The stores are the cache itself, as a restarted process would find it on disk; an
    executable is rebuilt from its entry the next time a graph asks for it.
    """
    _live.clear()


def store_for(opts: options_mod.Options) -> Store:
    """The process-wide store for these options; ``cache=False`` keeps it in memory only."""
    directory = Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()
    where = (str(directory.absolute()), opts.cache_max_bytes, opts.cache)
    with _stores_lock:
        store = _stores.get(where)
        if store is None:
            store = Store(directory, max_bytes=opts.cache_max_bytes, disk=opts.cache)
            _stores[where] = store
        return store


class Lookup:
    """One graph's trip through the cache: the executable of a hit, or where a miss goes."""

    def __init__(self, store: Store | None, key: key_mod.CacheKey | None,
                 inputs: Sequence[Any]) -> None:
        self.executable: Executable | None = None
        self.to_compile: list[torch.Tensor] = []  # a rebuilt hit still needs its XLA compile
        self._store = store
        self._key = key
        self._inputs = list(inputs)

    def store(self, traced: Trace) -> None:
        """Puts a fresh trace in the cache under this lookup's key; never raises."""
        if self._key is None or self._store is None:
            return
        digest = self._key.digest
        exe = traced.executable
        try:
            payload = encode_entry(self._entry_of(traced))
        except Uncacheable as e:
            counters.incr(counters.CACHE_GRAPH_UNCACHEABLE)
            log.debug("graph %s not cached: %s", digest[:16], e)
            return
        except Exception as e:
            warn_once("encode", "syncfree-xla graph cache: cannot encode an entry (%s)", e)
            return
        try:
            self._store.put(digest, payload, self._key.component_hashes,
                            {"format": ENTRY_FORMAT, "hlo_bytes": len(traced.hlo or b""),
                             "params": len(exe.params)})
        except Exception as e:
            warn_once("put", "syncfree-xla graph cache: cannot store an entry (%s)", e)
            return
        _live[digest] = exe

    def _entry_of(self, traced: Trace) -> GraphEntry:
        exe = traced.executable
        if exe.graph_hash is not None and not exe.params:
            # a rebuild runs the HLO as a user computation, which needs an operand
            raise Uncacheable("the computation reads no buffer")
        hlo_params = []
        for kind, value in traced.hlo_params:
            t = self._inputs[value] if kind == "input" else value
            if not isinstance(t, torch.Tensor):
                raise Uncacheable("a parameter is not a tensor")
            hlo_params.append((tuple(t.shape), t.dtype))
        outputs: list[tuple[str, Any]] = []
        for v in exe.output_values:
            if isinstance(v, Computed):
                outputs.append(("computed", v.index))
            elif isinstance(v, Input):
                outputs.append(("input_copy" if v.copy else "input", v.position))
            else:
                outputs.append(("value", v.value))
        if exe.graph_hash is None:
            return GraphEntry(None, [], [], [], outputs)
        if traced.hlo is None:
            raise Uncacheable("the trace exported no HLO")
        return GraphEntry(traced.hlo, hlo_params, list(traced.hlo_params), traced.computed,
                          outputs)


def lookup(device_gm: torch.fx.GraphModule, inputs: Sequence[Any], device: torch.device,
           opts: options_mod.Options, pinned: dict[int, int] | None = None,
           share: bool = False) -> Lookup:
    """Looks ``device_gm`` up; on a usable entry, ``.executable`` is ready to run.

    ``share``: the rebuilt computation's stand-ins may share the inputs' buffers
    (``executable.standins``)."""
    try:
        store = store_for(opts)
        key = graph_key(device_gm, inputs, opts, pinned)
    except Uncacheable as e:
        counters.incr(counters.CACHE_GRAPH_UNCACHEABLE)
        log.debug("graph not cacheable: %s", e)
        return Lookup(None, None, inputs)
    except Exception as e:
        warn_once("key", "syncfree-xla graph cache: cannot build a key (%s); "
                   "compiling without the cache", e)
        return Lookup(None, None, inputs)
    found = Lookup(store, key, inputs)
    digest = key.digest
    try:
        payload = store.get(digest)
    except Exception as e:
        warn_once("get", "syncfree-xla graph cache: lookup failed (%s)", e)
        payload = None
    if payload is not None:
        exe = _live.get(digest)
        if exe is None:
            exe, found.to_compile = _load(store, digest, payload, inputs, device, share)
        if exe is not None:
            _live[digest] = exe
            counters.incr(counters.CACHE_GRAPH_HITS)
            found.executable = exe
            return found
    counters.incr(counters.CACHE_GRAPH_MISSES)
    if payload is None and log.isEnabledFor(logging.INFO):
        _explain_miss(store, key)
    return found


def _explain_miss(store: Store, key: key_mod.CacheKey) -> None:
    try:
        nearest = store.nearest(key.component_hashes)
    except Exception as e:
        log.debug("cannot explain a cache miss: %s", e)
        return
    if nearest is not None and nearest.differing:
        log.info("syncfree-xla graph cache miss %s: %s", key.digest[:16], nearest)


def _load(store: Store, digest: str, payload: bytes, inputs: Sequence[Any],
          device: torch.device, share: bool) -> tuple[Executable | None, list[torch.Tensor]]:
    """Rebuilds the executable of an entry and the tensors to compile for it.

    None (and the entry discarded) if it is unusable.
    """
    try:
        entry, devices = decode_entry(payload)
        _check_against_inputs(entry, inputs)
        return _rebuild(entry, devices, device, inputs, share)
    except Exception as e:  # a bad entry must only cost a compile
        counters.incr(counters.CACHE_GRAPH_REJECTED)
        warn_once("load", "syncfree-xla graph cache: entry %s is unusable (%s: %s); "
                   "tracing the graph again", digest[:16], type(e).__name__, e)
        try:
            store.discard(digest, f"unusable graph entry: {e}")
        except Exception as e2:
            log.debug("cannot discard entry %s: %s", digest[:16], e2)
        return None, []


def _check_against_inputs(entry: GraphEntry, inputs: Sequence[Any]) -> None:
    for (kind, value), (shape, dtype) in zip(entry.params, entry.hlo_params):
        if kind == "input":
            _expect(value < len(inputs) and isinstance(inputs[value], torch.Tensor),
                    "a parameter names no tensor input")
            t = inputs[value]
            _expect(tuple(t.shape) == shape and t.dtype == dtype,
                    "an input does not match its HLO parameter")
    for kind, value in entry.outputs:
        if kind in _INPUT_OUTPUTS:
            _expect(value < len(inputs), "an output names no input")


def _rebuild(entry: GraphEntry, devices: list[str], device: torch.device,
             inputs: Sequence[Any], share: bool) -> tuple[Executable, list[torch.Tensor]]:
    """Wraps the stored HLO into a lazy computation on stand-ins, ready to compile.

    Stand-ins take the shapes, dtypes and SPMD shardings of the inputs they stand for
    (``_check_against_inputs`` made sure those match the entry), or with ``share``
    their buffers (``executable.standins``).
    """
    # Constants must become device buffers, as they were when traced: no shared cached
    # scalars, and no 0-d 0/1 inlined as a literal (a "special scalar").
    with trace_lock, torch.no_grad(), constants_as_buffers(special_scalars=True):
        tensor_devices = iter(devices)
        outputs: list[Any] = []
        for kind, v in entry.outputs:
            if kind == "computed":
                outputs.append(Computed(v))
            elif kind in _INPUT_OUTPUTS:
                outputs.append(Input(v, copy=kind == "input_copy"))
            elif isinstance(v, torch.Tensor):
                on = next(tensor_devices)
                outputs.append(Value(v.to(device) if on == "xla" else v))
            else:
                outputs.append(Value(v))
        if entry.hlo is None:
            exe = Executable(None, [], outputs)
            counters.incr(counters.GRAPHS_LOWERED)
            return exe, []
        # operands in HLO parameter order: the constants themselves, stand-ins for inputs
        read = [value for kind, value in entry.params if kind == "input"]
        stand, _ = standins([inputs[v] for v in read], device, share)
        of_input = dict(zip(read, stand))
        operands = [value.to(device) if kind == "const" else of_input[value]
                    for kind, value in entry.params]
        _expect(not any(xla_internals.needs_materialization(operands)),
                "a parameter did not become a device buffer")
        results, order = run_hlo(entry.hlo, operands)
        _expect(len(results) == len(entry.computed), "computation has other outputs")
        for r, (shape, dtype) in zip(results, entry.computed):
            # the HLO may hold a narrower integer than the trace (cummax's indices);
            # replay casts it back (LoweredGraph.__call__, Executable.casts)
            same_kind = r.dtype == dtype or not (r.dtype.is_floating_point
                                                 or dtype.is_floating_point)
            _expect(tuple(r.shape) == shape and same_kind,
                    "an output does not have its recorded shape")
        params: list[tuple[str, Any]] = []
        for k in order:  # the order the compiled computation takes its buffers in
            kind, value = entry.params[k]
            params.append((kind, operands[k] if kind == "const" else value))
        graph_hash = xla_internals.graph_hash(results)
        counters.incr(counters.GRAPHS_LOWERED)
        hlo_params = [(kind, operands[k] if kind == "const" else value)
                      for k, (kind, value) in enumerate(entry.params)]
        return (Executable(graph_hash, params, outputs,
                           dtypes=tuple(d for _, d in entry.computed),
                           hlo=entry.hlo, hlo_params=hlo_params),
                list(results))


__all__ = [
    "CODEGEN_OPTIONS",
    "ENTRY_FORMAT",
    "PIPELINE_VERSION",
    "code_digest",
    "code_files",
    "BadPayload",
    "GraphEntry",
    "Lookup",
    "Uncacheable",
    "canonical_graph",
    "decode_entry",
    "dumps",
    "encode_entry",
    "environment_components",
    "graph_key",
    "input_signature",
    "lookup",
    "reset",
    "store_for",
    "warn_once",
]
