"""The graph cache across restarts: hits, misses, bad entries, unusable directories.

The restart tests run real training in fresh interpreters, because "survives a
restart" is only true if a process that has never traced a graph can use the entry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx

import xla_backend
from tests.xla_helpers import MetricWindow, settle
from xla_backend import warn_once, xla_internals
from xla_backend.cache import graph_cache as compile_cache
from xla_backend.cache.store import ENTRY_SUFFIX, Store

ROOT = Path(__file__).resolve().parents[2]

# One training run: a small MLP, AdamW, a few steps. ``{loss}`` is the name of the
# step's local variable and ``{pad}`` shifts the source lines: variants must still hit.
SCRIPT = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("xla_backend.cache.graph_cache").setLevel(logging.INFO)
    import torch
    import torch_xla
    import xla_backend
    from xla_backend.tools import workloads

    cache_dir = sys.argv[1]
    dev = torch_xla.device()
    result = {{}}
    {pad}
    def step(model, opt, x, y):
        {loss} = workloads.cross_entropy(model(x), y)
        value = {loss}.detach()
        {loss}.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    for batch in [int(b) for b in sys.argv[2:]]:
        torch._dynamo.reset()
        xla_backend.reset_stats()
        work = workloads.get_workload("mlp", batch=batch, in_features=16, hidden=32)
        model = work.build_model().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        compiled = torch.compile(step, backend="syncfree_xla",
                                 options={{"cache_dir": cache_dir}})
        losses = [compiled(model, opt, *work.make_batch(i, dev)) for i in range(3)]
        stats = xla_backend.stats()
        result[batch] = {{
            "losses": [float(loss.cpu()).hex() for loss in losses],
            "stats": {{k: v for k, v in stats.items() if k.startswith("cache_")}},
            "graphs": stats.get("graphs_lowered", 0),
        }}
    print("RESULT " + json.dumps(result))
""")
BATCH = 8


def _start(cache_dir: Path, *batches: int, loss: str = "loss", pad: str = "",
           ) -> subprocess.Popen[str]:
    env = dict(os.environ, PJRT_DEVICE="CPU")
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(loss=loss, pad=pad), str(cache_dir),
         *map(str, batches)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def _finish(process: subprocess.Popen[str]) -> tuple[dict[int, Any], str]:
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, stderr[-3000:]
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    result = {int(k): v for k, v in json.loads(line[len("RESULT "):]).items()}
    return result, stderr


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + ENTRY_SUFFIX))


def _graph_entries(directory: Path) -> list[str]:
    """Digests of the graph tier's entries (the AOTAutograd tier's are marked "aot")."""
    return sorted(e.digest for e in Store(directory).entries() if e.meta.get("tier") != "aot")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One first process fills a cache; then three restarted ones use copies of it at once.

    "warm": the same script; "renamed": the step's variable renamed and its lines moved,
    then a second model with another batch size; "corrupted": every entry file damaged.
    """
    base = tmp_path_factory.mktemp("restart")
    cold = base / "cold"
    cold_result, _ = _finish(_start(cold, BATCH))
    copies = {}
    for name in ("warm", "renamed", "corrupted"):
        copies[name] = base / name
        shutil.copytree(cold, copies[name])
    for entry in _entries(copies["corrupted"]):
        data = bytearray(entry.read_bytes())
        data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16
        entry.write_bytes(bytes(data))
    started = {
        "warm": _start(copies["warm"], BATCH),
        "renamed": _start(copies["renamed"], BATCH, BATCH * 2, loss="objective",
                          pad="# moved\n# down\n"),
        "corrupted": _start(copies["corrupted"], BATCH),
    }
    results: dict[str, Any] = {"cold": (cold, cold_result[BATCH])}
    for name, process in started.items():
        results[name] = (copies[name], *_finish(process))
    return results


def _aot_graphs(result: dict[str, Any]) -> int:
    """Dynamo graphs whose AOTAutograd result has an entry of its own (cache.aot_cache)."""
    return int(result["stats"].get("cache_aot_misses", 0))


def test_first_process_misses_and_writes_every_graph(runs):
    directory, first = runs["cold"]
    graphs, aot_graphs = first["graphs"], _aot_graphs(first)
    assert graphs >= 3  # forward, backward, optimizer
    assert aot_graphs >= 2  # the forward (with its backward), the optimizer step
    assert first["stats"].get("cache_graph_misses") == graphs
    assert first["stats"].get("cache_disk_writes") == graphs + aot_graphs
    assert len(_entries(directory)) == graphs + aot_graphs
    assert len(_graph_entries(directory)) == graphs


def test_second_process_hits_disk_for_every_graph_and_matches_bitwise(runs):
    first = runs["cold"][1]
    second = runs["warm"][1][BATCH]
    assert second["stats"].get("cache_disk_hits") == first["graphs"] + _aot_graphs(first)
    assert second["stats"].get("cache_aot_hits") == _aot_graphs(first)
    assert second["stats"].get("cache_graph_hits") == first["graphs"]
    assert second["stats"].get("cache_graph_misses", 0) == 0
    assert second["stats"].get("cache_disk_writes", 0) == 0
    assert second["losses"] == first["losses"]


def test_renamed_variable_hits_and_another_shape_misses_with_a_reason(runs):
    first = runs["cold"][1]
    _, result, stderr = runs["renamed"]
    renamed, reshaped = result[BATCH], result[BATCH * 2]
    assert renamed["stats"].get("cache_aot_hits") == _aot_graphs(first)
    assert renamed["stats"].get("cache_graph_hits") == first["graphs"]
    assert renamed["stats"].get("cache_graph_misses", 0) == 0
    assert renamed["losses"] == first["losses"]
    # forward and backward depend on the batch; AdamW's graph does not
    assert reshaped["stats"].get("cache_graph_misses", 0) >= 2
    assert "differs in: input_signature" in stderr


def test_corrupted_entries_are_warned_about_rebuilt_and_train_correctly(runs):
    first = runs["cold"][1]
    directory, result, stderr = runs["corrupted"]
    again = result[BATCH]
    assert "discarding bad cache entry" in stderr
    entries = first["graphs"] + _aot_graphs(first)
    assert again["stats"].get("cache_bad_entries") == entries
    assert again["stats"].get("cache_graph_misses") == first["graphs"]
    assert again["stats"].get("cache_aot_misses") == _aot_graphs(first)
    assert again["stats"].get("cache_disk_writes") == entries
    assert again["losses"] == first["losses"]
    assert Store(directory).verify().ok


# ---------------------------------------------------------------------------
# In this process


@pytest.fixture
def fresh_cache_state(monkeypatch):
    """No stores or live executables from earlier tests: the next lookup goes to disk."""
    import weakref

    monkeypatch.setattr(compile_cache, "_stores", {})
    monkeypatch.setattr(compile_cache, "_live", weakref.WeakValueDictionary())
    warn_once.reset_all()  # warnings are said once per process


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to float32 matmul rounding: XLA:CPU's dot sums in another order than eager's
    gemm, and the inputs are random, so allclose's default 1e-5 failed now and then."""
    return torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def _matmul_relu(options: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    torch._dynamo.reset()
    f = torch.compile(lambda a: (a @ a).relu() * 3.5, backend="syncfree_xla", options=options)
    out = f(x)
    settle()
    return out.cpu()


def test_stats_report_hits_and_misses_per_tier(xla, tmp_path, fresh_cache_state, monkeypatch):
    options = {"cache_dir": str(tmp_path / "c")}
    x = torch.randn(4, 4)
    want = (x @ x).relu() * 3.5
    # the memory and disk tiers count every entry: one of each cache (AOTAutograd, graph)
    assert _same(_matmul_relu(options, x.to(xla)), want)
    s = xla_backend.stats()
    assert (s["cache_memory_misses"], s["cache_disk_misses"], s["cache_disk_writes"]) == (2, 2, 2)
    assert (s["cache_aot_misses"], s["cache_graph_misses"]) == (1, 1)
    _matmul_relu(options, x.to(xla))  # the same process: the memory tier answers
    assert xla_backend.stats()["cache_memory_hits"] == 2
    import weakref

    monkeypatch.setattr(compile_cache, "_stores", {})  # as if restarted
    monkeypatch.setattr(compile_cache, "_live", weakref.WeakValueDictionary())
    assert _same(_matmul_relu(options, x.to(xla)), want)
    s = xla_backend.stats()
    assert s["cache_disk_hits"] == 2
    assert s["cache_graph_hits"] == 2 and s["cache_aot_hits"] == 2
    assert s["cache_graph_misses"] == 1 and s["cache_aot_misses"] == 1


def _sgd_momentum_keeping_grads(device: torch.device | str, options: dict[str, Any] | None
                                ) -> tuple[list[float], torch.Tensor, bool]:
    """SGD with momentum and ``zero_grad(set_to_none=False)``: the first step's momentum
    buffer is a clone of the gradient, which the next ``zero_grad`` zeroes in place."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.detach()

    run = step if options is None else torch.compile(step, backend="syncfree_xla",
                                                     options=options)
    losses = [float(run(torch.full((4, 6), 0.1 * (i + 1)).to(device)).cpu()) for i in range(4)]
    aliased = any(opt.state[p]["momentum_buffer"] is p.grad for p in model.parameters())
    return losses, model.weight.detach().cpu(), aliased


def test_a_restarted_process_gives_a_cloned_input_a_tensor_of_its_own(xla, tmp_path,
                                                                       monkeypatch):
    """An output that is a copy of an input (SGD's first momentum buffer, ``grad.clone()``)
    came back from a stored entry as the input itself: the buffer was the gradient, and
    ``zero_grad(set_to_none=False)`` zeroed it at every step."""
    import weakref

    options = {"cache_dir": str(tmp_path / "c")}
    want_losses, want_weight, _ = _sgd_momentum_keeping_grads("cpu", None)
    for _ in ("first process", "restarted"):
        monkeypatch.setattr(compile_cache, "_stores", {})
        monkeypatch.setattr(compile_cache, "_live", weakref.WeakValueDictionary())
        losses, weight, aliased = _sgd_momentum_keeping_grads(xla, options)
        assert not aliased
        assert losses == pytest.approx(want_losses, rel=1e-5)
        torch.testing.assert_close(weight, want_weight, rtol=1e-5, atol=1e-6)
    assert xla_backend.stats().get("cache_graph_hits", 0) > 0


def test_cache_false_writes_nothing_to_disk(xla, tmp_path, fresh_cache_state):
    directory = tmp_path / "never"
    options = {"cache": False, "cache_dir": str(directory)}
    x = torch.randn(4, 4)
    for _ in range(2):
        assert _same(_matmul_relu(options, x.to(xla)), (x @ x).relu() * 3.5)
    assert not directory.exists()
    s = xla_backend.stats()
    assert s["cache_memory_hits"] == 2  # the AOTAutograd entry and the graph entry
    assert s.get("cache_disk_writes", 0) == s.get("cache_disk_misses", 0) == 0


def test_unusable_cache_directory_trains_correctly_with_a_warning(xla, tmp_path, caplog,
                                                                  fresh_cache_state):
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)  # writable by anyone: the store refuses to trust it
    x = torch.randn(4, 4)
    got = _matmul_relu({"cache_dir": str(directory)}, x.to(xla))
    assert _same(got, (x @ x).relu() * 3.5)
    assert "using the in-memory cache only" in caplog.text
    assert not _entries(directory)


def test_structurally_bad_entry_is_rejected_and_rebuilt(xla, tmp_path, caplog,
                                                        fresh_cache_state, monkeypatch):
    directory = tmp_path / "c"
    options = {"cache_dir": str(directory)}
    x = torch.randn(4, 4)
    _matmul_relu(options, x.to(xla))
    (digest,) = _graph_entries(directory)
    entry = directory / (digest + ENTRY_SUFFIX)
    info = next(e for e in Store(directory).entries() if e.digest == digest)
    entry.unlink()  # replace it with a well-checksummed entry that makes no sense
    Store(directory).put(digest, b"checksummed nonsense", info.components, info.meta)
    import weakref

    monkeypatch.setattr(compile_cache, "_stores", {})
    monkeypatch.setattr(compile_cache, "_live", weakref.WeakValueDictionary())
    assert _same(_matmul_relu(options, x.to(xla)), (x @ x).relu() * 3.5)
    assert "is unusable" in caplog.text
    s = xla_backend.stats()
    assert s["cache_graph_rejected"] == 1
    assert s["cache_graph_misses"] == 2
    assert Store(directory).get(digest).startswith(b"SFXGRPH")  # rebuilt and rewritten


@pytest.fixture
def special_scalars(monkeypatch):
    """torch_xla's 0/1 literals, as with ``XLA_NO_SPECIAL_SCALARS=0`` (the backend's
    default turns them off, so that a 0-d 0 or 1 is a buffer)."""
    monkeypatch.setenv("XLA_NO_SPECIAL_SCALARS", "0")
    with xla_internals.special_scalars(True):
        yield


def test_a_computation_that_reads_no_buffer_is_not_stored(xla, tmp_path, caplog,
                                                          fresh_cache_state, special_scalars):
    # gather from an empty tensor becomes new_zeros, and with the literal 1 the HLO has
    # no parameter: torch_xla cannot run such a module as a user computation when
    # rebuilding it
    options = {"cache_dir": str(tmp_path / "c")}
    index = torch.zeros(0, 4, dtype=torch.long)

    def run() -> torch.Tensor:
        torch._dynamo.reset()
        fn = torch.compile(lambda t, i: torch.gather(t, 1, i) + 1, backend="syncfree_xla",
                           options=options)
        return fn(torch.zeros(0, 4, device=xla), index.to(xla)).cpu()

    first = run()
    assert xla_backend.stats().get("cache_graph_uncacheable", 0) >= 1
    assert _graph_entries(tmp_path / "c") == []
    assert torch.equal(run(), first)
    assert "is unusable" not in caplog.text


# ---------------------------------------------------------------------------
# Pieces, without XLA


def _graph(name: str, constant: float) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder(name)
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, constant))
    z = graph.call_function(torch.ops.aten.sum.dim_IntList, (y, [0]), {"keepdim": True})
    z.meta["stack_trace"] = f"File 'train.py', line {len(name)}"
    graph.output((z,))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_canonical_graph_ignores_names_and_source_but_not_values():
    same = compile_cache.canonical_graph(_graph("loss", 0.5))
    assert compile_cache.canonical_graph(_graph("objective_value", 0.5)) == same
    assert compile_cache.canonical_graph(_graph("loss", 0.25)) != same


def test_canonical_graph_hashes_constant_tensors_by_content():
    def with_constant(value: torch.Tensor) -> list[Any]:
        gm = _graph("x", 1.5)
        gm.register_buffer("_tensor_constant0", value)
        node = next(iter(gm.graph.nodes))
        with gm.graph.inserting_after(node):
            gm.graph.get_attr("_tensor_constant0")
        return compile_cache.canonical_graph(gm)

    assert with_constant(torch.ones(3)) == with_constant(torch.ones(3))
    assert with_constant(torch.ones(3)) != with_constant(torch.zeros(3))


def _entry() -> compile_cache.GraphEntry:
    return compile_cache.GraphEntry(
        hlo=b"\x08\x01 not really hlo",
        hlo_params=[((2, 3), torch.float32), ((), torch.bfloat16)],
        params=[("input", 0), ("const", torch.tensor(1.5, dtype=torch.bfloat16))],
        computed=[((3,), torch.float32)],
        outputs=[("computed", 0), ("input", 1), ("value", 2.5), ("value", None),
                 ("input_copy", 0), ("value", torch.arange(4, dtype=torch.int64))],
    )


def test_entry_round_trips_without_pickle():
    decoded, devices = compile_cache.decode_entry(compile_cache.encode_entry(_entry()))
    want = _entry()
    assert decoded.hlo == want.hlo
    assert decoded.hlo_params == want.hlo_params
    assert decoded.params[0] == ("input", 0)
    assert decoded.params[1][1].dtype == torch.bfloat16
    assert torch.equal(decoded.params[1][1], want.params[1][1])
    assert decoded.outputs[:5] == want.outputs[:5]
    assert torch.equal(decoded.outputs[5][1], torch.arange(4))
    assert devices == ["cpu"]


def test_an_entrys_device_constants_are_read_back_in_one_transfer(xla):
    """A graph's constants (Python scalars torch_xla makes device data, a buffer each)
    were read back one transfer apiece as its entry was stored: 258 transfers in the
    first steps of a small CNN with AdamW and mixup. One transfer reads them all."""
    values = [0.5 * k - 3.0 for k in range(24)]
    consts = [torch.tensor(v, device=xla) for v in values]
    entry = compile_cache.GraphEntry(
        hlo=b"\x08\x01 not really hlo", hlo_params=[((), torch.float32)] * len(values),
        params=[("const", c) for c in consts], computed=[((), torch.float32)],
        outputs=[("computed", 0), ("value", torch.tensor([2.0, 4.0], device=xla))])
    with MetricWindow() as window:
        payload = compile_cache.encode_entry(entry)
    assert window.counts.transfers_to_host == 1
    decoded, devices = compile_cache.decode_entry(payload)
    assert [float(t) for _, t in decoded.params] == values
    assert decoded.outputs[1][1].tolist() == [2.0, 4.0] and devices == ["xla"]


@pytest.mark.parametrize("spoil", ["params", "computed", "truncate", "output"])
def test_inconsistent_entries_are_rejected(spoil):
    entry = _entry()
    if spoil == "params":
        entry.params.append(("input", 1))
    elif spoil == "computed":
        entry.outputs.append(("computed", 5))
    elif spoil == "output":
        entry.params[1] = ("const", torch.ones(2))  # does not match its HLO parameter
    payload = compile_cache.encode_entry(entry)
    if spoil == "truncate":
        payload = payload[:-3]
    with pytest.raises(compile_cache.BadPayload):
        compile_cache.decode_entry(payload)


def test_unencodable_outputs_make_a_graph_uncacheable():
    entry = _entry()
    entry.outputs.append(("value", object()))
    with pytest.raises(compile_cache.Uncacheable):
        compile_cache.encode_entry(entry)


def test_four_processes_compiling_the_same_graphs_into_one_directory(tmp_path, runs):
    shared = tmp_path / "shared"
    processes = [_start(shared, BATCH) for _ in range(4)]
    results = [_finish(p)[0][BATCH] for p in processes]
    cold_losses = runs["cold"][1]["losses"]
    for result in results:
        assert result["losses"] == cold_losses, "every process trains exactly as a lone one"
    report = Store(shared).verify()
    assert report.ok and report.checked == len(_entries(shared)) > 0
