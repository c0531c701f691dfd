"""The AOTAutograd tier: a restarted process skips AOTAutograd for graphs it has seen.

The restart test trains in fresh interpreters ("skips AOTAutograd after a restart"
only holds if a process that never ran AOTAutograd can rebuild its result), with a
loop that has everything the tier must carry: two Adam param groups with a scheduler,
GradScaler (Dynamo runs the step as several frames), dropout, LayerNorm, and the
step's ``loss.detach()``, an output AOTAutograd regenerates as a view.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import xla_backend
from tests.xla_helpers import settle
from xla_backend import warn_once
from xla_backend.cache import aot_cache
from xla_backend.cache import graph_cache as compile_cache
from xla_backend.cache.store import PREAMBLE, Store
from xla_backend.tools.explain import ExplainSession

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    import torch_xla
    import xla_backend
    from xla_backend.tools import workloads

    dev = torch_xla.device()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32),
                                torch.nn.GELU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(32, 5)).to(dev)
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 3e-3},
                            {"params": list(model[1].parameters())
                                       + list(model[4].parameters()), "lr": 1e-3}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = workloads.make_grad_scaler(dev, init_scale=2.0 ** 8, growth_interval=2)
    step = torch.compile(workloads.train_step_amp, backend="syncfree_xla",
                         options={"cache_dir": sys.argv[1]})
    torch.manual_seed(1)
    batches = [(torch.randn(16, 12).to(dev), torch.randint(0, 5, (16,)).to(dev))
               for _ in range(4)]
    losses = []
    for x, y in batches:
        losses.append(step(model, opt, scaler, x, y))
        sched.step()
    torch_xla.sync()
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    stats = xla_backend.stats()
    print("RESULT " + json.dumps({
        "losses": [float(v.cpu()).hex() for v in losses],
        "params": digest.hexdigest(),
        "scale": float(scaler.get_scale()),
        "stats": {k: v for k, v in stats.items() if k.startswith("cache_")},
    }))
""")


def _run(cache_dir: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=400,
                          env=dict(os.environ, PJRT_DEVICE="CPU"))
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    cache_dir = tmp_path_factory.mktemp("aot") / "cache"
    return _run(cache_dir), _run(cache_dir)


def test_a_restarted_process_skips_aotautograd_for_every_graph(restarted):
    cold, warm = restarted
    misses = cold["stats"].get("cache_aot_misses", 0)
    assert misses >= 3  # forward (with its backward), unscale/clip, the optimizer step
    assert cold["stats"].get("cache_aot_uncacheable", 0) == 0
    # The scheduler's first lr change retraces the frame that unscales and clips (its
    # guards read the param groups) into the same graph: its second AOTAutograd call
    # hits the entry the first one wrote, in the same process.
    assert cold["stats"].get("cache_aot_hits", 0) <= 1
    graphs = misses + cold["stats"].get("cache_aot_hits", 0)
    assert warm["stats"].get("cache_aot_hits") == graphs
    assert warm["stats"].get("cache_aot_misses", 0) == 0
    assert warm["stats"].get("cache_aot_rejected", 0) == 0
    assert warm["stats"].get("cache_graph_misses", 0) == 0  # the rebuilt graphs are the same


def test_a_restarted_process_trains_bitwise_as_the_first(restarted):
    cold, warm = restarted
    assert warm["losses"] == cold["losses"]
    assert warm["params"] == cold["params"]
    assert warm["scale"] == cold["scale"]


# ---------------------------------------------------------------------------
# In this process


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of this test's own: no stores or executables from earlier tests."""
    import weakref

    monkeypatch.setattr(compile_cache, "_stores", {})
    monkeypatch.setattr(compile_cache, "_live", weakref.WeakValueDictionary())
    warn_once.reset_all()
    return {"cache_dir": str(tmp_path / "cache")}


def _train(options: dict[str, Any], device: torch.device, seed: int = 0) -> list[float]:
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    compiled = torch.compile(step, backend="syncfree_xla", options=options)
    losses = [compiled(torch.full((4, 6), 0.1 * i).to(device)) for i in range(3)]
    settle()
    return [float(v.cpu()) for v in losses]


def _aot_entries(options: dict[str, Any]) -> list[str]:
    store = Store(Path(options["cache_dir"]))
    return [e.digest for e in store.entries() if e.meta.get("tier") == "aot"]


def test_explain_says_when_aotautograd_was_skipped(xla, own_cache):
    _train(own_cache, xla)
    graphs = xla_backend.stats().get("cache_aot_misses")
    assert graphs >= 2  # the step's forward and its optimizer step at least
    xla_backend.reset_stats()
    with ExplainSession() as session:
        _train(own_cache, xla)
    text = str(session.report())
    assert text.count("AOTAutograd: skipped: its graphs and metadata came from the cache") \
        == graphs, text
    assert xla_backend.stats().get("cache_aot_hits") == graphs


def test_an_entry_naming_arbitrary_python_is_refused_and_aotautograd_runs(
        xla, own_cache, caplog):
    """An entry whose checksum is fine but whose graph names ``os.system``: nothing in
    it runs; the graph goes through AOTAutograd and trains as it would have."""
    first = _train(own_cache, xla)
    store = compile_cache.store_for(xla_backend.options.resolve(own_cache))
    entries = _aot_entries(own_cache)
    assert entries
    for digest in entries:
        payload = store.get(digest)
        magic, version, length = PREAMBLE.unpack_from(payload)
        header = json.loads(payload[PREAMBLE.size:PREAMBLE.size + length])
        call = next(n for n in header["forward"]["nodes"] if n["op"] == "call_function")
        call["target"] = ["fn", "os", "system"]
        raw = compile_cache.dumps(header).encode()
        tampered = PREAMBLE.pack(magic, version, len(raw)) + raw + payload[PREAMBLE.size + length:]
        store.discard(digest, "replaced by a test")
        store.put(digest, tampered, {}, {"tier": "aot"})
    xla_backend.reset_stats()
    with caplog.at_level("WARNING"):
        again = _train(own_cache, xla)
    assert again == first
    stats = xla_backend.stats()
    assert stats.get("cache_aot_rejected") == len(entries)
    assert stats.get("cache_aot_hits", 0) == 0
    assert "AOTAutograd cache: entry" in caplog.text and "unusable" in caplog.text


def test_the_key_tells_apart_what_aotautograd_tells_apart(xla):
    gm = torch.fx.symbolic_trace(lambda a, b: a * 2 + b)
    x, y = torch.ones(2, 3).to(xla), torch.ones(2, 3).to(xla)

    def key(*inputs: torch.Tensor) -> str:
        return aot_cache.aot_key(gm, inputs, {}).digest

    base = key(x, y)
    assert key(torch.zeros(2, 3).to(xla), torch.zeros(2, 3).to(xla)) == base  # values: no
    assert key(x.clone().requires_grad_(), y) != base
    assert key(x, x) != base  # one tensor twice: AOTAutograd dedupes it
    assert key(torch.ones(3, 2).to(xla).t(), y) != base  # a view
    with torch.no_grad():
        assert key(x, y) != base
    with torch.inference_mode():
        assert key(x, y) != base
    with pytest.raises(compile_cache.Uncacheable, match="scalar"):
        key(x, 3)


def test_both_tiers_keys_follow_the_backends_source(xla, tmp_path, monkeypatch):
    """An AOTAutograd entry holds graphs traced with this backend's decompositions and
    autograd kernels, a graph entry the HLO its rewrites and lowering made: a release
    that fixes one must not be served what its predecessor stored, though the graph,
    the ops decomposed and the pass versions are the same."""
    from xla_backend.options import resolve

    gm = torch.fx.symbolic_trace(lambda a: torch.logcumsumexp(a, 0))
    x = torch.ones(4).to(xla)
    source = tmp_path / "lowering_gaps.py"
    monkeypatch.setattr(compile_cache, "code_files", lambda: [source])

    def keys(text: str) -> tuple[str, str]:
        source.write_text(text)
        monkeypatch.setattr(compile_cache, "_environment", {})  # as a new process
        return (aot_cache.aot_key(gm, [x], {}).digest,
                compile_cache.graph_key(gm, [x], resolve(None)).digest)

    before = keys("def decomposition(x, dim):\n    return x.cumsum(dim)\n")
    assert keys("def decomposition(x, dim):\n    return x.cumsum(dim)\n") == before
    after = keys("def decomposition(x, dim):\n    return x.exp().cumsum(dim).log()\n")
    assert after[0] != before[0] and after[1] != before[1]


def test_the_key_reads_the_metadata_of_parameters_and_buffers_not_their_values(xla):
    """Dynamo puts an optimizer's parameters and state in its graph as attributes;
    AOTAutograd takes them as inputs, so only what it reads of an input may count."""
    class Affine(torch.nn.Module):
        def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(w)
            self.register_buffer("b", b)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w + self.b

    x = torch.ones(2, 3).to(xla)

    def key(w: torch.Tensor, b: torch.Tensor, grad: bool = True) -> str:
        gm = torch.fx.symbolic_trace(Affine(w.to(xla), b.to(xla)))
        gm.w.requires_grad_(grad)
        return aot_cache.aot_key(gm, [x], {}).digest

    base = key(torch.ones(3), torch.zeros(3))
    assert key(torch.full((3,), 2.0), torch.ones(3)) == base  # values: no
    assert key(torch.ones(4), torch.zeros(3)) != base  # shapes, dtypes, grads: yes
    assert key(torch.ones(3, dtype=torch.float64), torch.zeros(3)) != base
    assert key(torch.ones(3), torch.zeros(3), grad=False) != base


def test_a_job_resumed_with_other_weights_skips_aotautograd(xla, own_cache, monkeypatch,
                                                             tmp_path):
    """A restart resumes from a checkpoint, not from the first run's initial weights:
    the entries the first run wrote still serve, with the numbers AOTAutograd gives."""
    import weakref

    _train(own_cache, xla, seed=0)
    monkeypatch.setattr(compile_cache, "_stores", {})
    monkeypatch.setattr(compile_cache, "_live", weakref.WeakValueDictionary())
    xla_backend.reset_stats()
    resumed = _train(own_cache, xla, seed=1)
    stats = xla_backend.stats()
    assert stats.get("cache_aot_hits", 0) >= 2, stats
    assert stats.get("cache_aot_misses", 0) == 0, stats
    assert resumed == _train({"cache_dir": str(tmp_path / "fresh")}, xla, seed=1)


def test_a_result_aotautograd_specialized_on_a_float_is_not_served_for_another(
        xla, own_cache):
    """A float setting used both as a tensor operand (kept symbolic) and as a clamp bound
    (which AOTAutograd fixes to its value, with a guard): the graphs hold one value as a
    constant. Served from the cache to the next recompile, every later value was wrong."""
    def run(device: torch.device | str, compiled: bool) -> list[list[float]]:
        torch._dynamo.reset()
        p = torch.zeros(6, device=device)
        grad = torch.linspace(-3.0, 3.0, 6).to(device)
        cfg = {"clip": 0.5}

        def update() -> None:
            g = grad.clamp(-cfg["clip"], cfg["clip"])
            p.sub_(g * cfg["clip"])

        fn = torch.compile(update, backend="syncfree_xla", options=own_cache) if compiled \
            else update
        out = []
        for i in range(5):
            cfg["clip"] = 0.5 + 0.5 * i
            fn()
            out.append(p.cpu().tolist())
        return out

    xla_backend.reset_stats()
    torch.testing.assert_close(torch.tensor(run(xla, compiled=True)),
                               torch.tensor(run("cpu", compiled=False)), rtol=1e-6, atol=0)
    assert xla_backend.stats().get("cache_aot_hits", 0) == 0


def _two_backwards(options: dict[str, Any] | None, device: torch.device | str) -> list[float]:
    """Two losses through one graph, the first backward retaining it (as in a multi-task
    step): AOTAutograd allows that only where the first backward retained the graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        first, second = out[:, 0].square().mean(), out[:, 1].abs().mean()
        first.backward(retain_graph=True)
        second.backward()
        opt.step()
        opt.zero_grad()
        return (first + second).detach()

    run = step if options is None else torch.compile(step, backend="syncfree_xla",
                                                     options=options)
    out = [run(torch.full((4, 6), 0.1 * (i + 1)).to(device)) for i in range(3)]
    return [float(v.cpu()) for v in out]


def test_a_restarted_process_keeps_backward_with_retain_graph_working(xla, own_cache,
                                                                       monkeypatch):
    """The stored metadata listed the saved tensors the backward may donate; the first
    process emptied that list at its first backward(retain_graph=True), a restarted one
    refused that backward ("compiled with non-empty donated buffers")."""
    import weakref

    want = _two_backwards(None, "cpu")
    assert _two_backwards(own_cache, xla) == pytest.approx(want, rel=1e-5)
    monkeypatch.setattr(compile_cache, "_stores", {})
    monkeypatch.setattr(compile_cache, "_live", weakref.WeakValueDictionary())
    xla_backend.reset_stats()
    assert _two_backwards(own_cache, xla) == pytest.approx(want, rel=1e-5)
    assert xla_backend.stats().get("cache_aot_hits", 0) > 0


OPTIMIZERS = {
    "adam_amsgrad": lambda groups: torch.optim.Adam(groups, amsgrad=True, weight_decay=0.01),
    "rprop": lambda groups: torch.optim.Rprop(groups),
    "asgd": lambda groups: torch.optim.ASGD(groups, t0=1),
    "adafactor": lambda groups: torch.optim.Adafactor(groups),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_train_bitwise_the_same_after_a_restart(xla, own_cache, monkeypatch, name):
    """Two param groups with their own lr and a scheduler; the second run reads every
    entry back from disk, as a restarted process does."""
    import weakref

    def run() -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7),
                                    torch.nn.Linear(7, 3)).to(xla)
        opt = OPTIMIZERS[name]([{"params": model[0].parameters(), "lr": 0.02},
                                {"params": list(model[1].parameters())
                                 + list(model[2].parameters()), "lr": 0.01}])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        compiled = torch.compile(step, backend="syncfree_xla", options=own_cache)
        torch.manual_seed(1)
        losses = []
        for _ in range(4):
            losses.append(compiled(torch.randn(6, 5).to(xla), torch.randint(0, 3, (6,)).to(xla)))
            sched.step()
        settle()
        state = [t.cpu() for s in opt.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        return [float(v.cpu()) for v in losses], [p.detach().cpu() for p in model.parameters()], \
            state

    cold = run()
    monkeypatch.setattr(compile_cache, "_stores", {})
    monkeypatch.setattr(compile_cache, "_live", weakref.WeakValueDictionary())
    xla_backend.reset_stats()
    warm = run()
    stats = xla_backend.stats()
    assert stats.get("cache_aot_hits", 0) >= 2 and stats.get("cache_aot_misses", 0) == 0
    assert warm[0] == cold[0]
    for got, want in zip(warm[1] + warm[2], cold[1] + cold[2]):
        assert torch.equal(got, want)
