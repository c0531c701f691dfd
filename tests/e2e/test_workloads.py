"""Fast eager-CPU checks of the shared workloads and the demo (no XLA involved).

Parity and benchmark results are only meaningful if these references are right:
deterministic, learnable, and (for the LMs) genuinely causal.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xla_backend.tools import demo, workloads
from xla_backend.tools.workloads import (
    BertEncoder,
    GPTDecoder,
    TransformerLM,
    corpus_batch,
    get_workload,
    load_stdlib_corpus,
    train_step,
    train_step_amp,
    train_step_clip,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Small sizes: each workload's step must take milliseconds on CPU.
SMALL = {
    "mlp": dict(batch=16, in_features=16, hidden=32),
    "cnn": dict(batch=8, image_size=16, width=8),
    "resnet": dict(batch=8, image_size=16, widths=(8, 16)),
    "transformer_lm": dict(batch=4, seq=16, vocab_size=64, d_model=32, n_layers=1, d_ff=64),
    "gpt": dict(batch=4, seq=16, vocab_size=64, d_model=32, n_layers=1),
    "bert": dict(batch=4, seq=16, vocab_size=64, d_model=32, n_layers=1),
    "tv_resnet18": dict(batch=4, image_size=32),
    "hf_gpt2": dict(batch=4, seq=16, vocab_size=64, d_model=32, n_layers=1),
    "hf_bert": dict(batch=4, seq=16, vocab_size=64, d_model=32, n_layers=1),
}
EXPECTED_OUT = {
    "mlp": ((16, 16), (16,), (16, 10)),
    "cnn": ((8, 3, 16, 16), (8,), (8, 10)),
    "resnet": ((8, 3, 16, 16), (8,), (8, 10)),
    "transformer_lm": ((4, 16), (4, 16), (4, 16, 64)),
    "gpt": ((4, 16), (4, 16), (4, 16, 64)),
    "bert": ((4, 16), (4,), (4, 2)),
    "tv_resnet18": ((4, 3, 32, 32), (4,), (4, 10)),
    "hf_gpt2": ((4, 16), (4, 16), (4, 16, 64)),
    "hf_bert": ((4, 16), (4,), (4, 2)),
}


def test_small_table_covers_every_workload() -> None:
    assert set(SMALL) == set(workloads.WORKLOADS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_workload_shapes_and_training_reduces_loss(name: str) -> None:
    wl = get_workload(name, **SMALL[name])
    model = wl.build_model()
    opt = workloads.make_adamw(model, lr=3e-3)
    x, y = wl.make_batch(0)
    x_shape, y_shape, out_shape = EXPECTED_OUT[name]
    assert tuple(x.shape) == x_shape and tuple(y.shape) == y_shape
    assert y.dtype == torch.int64
    assert tuple(model(x).shape) == out_shape

    # A fixed batch: every model must be able to fit it, so loss must fall.
    losses = [float(train_step(model, opt, x, y, wl.loss_fn)) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for p in model.parameters()), "zero_grad(set_to_none=True)"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_workload_is_deterministic(name: str) -> None:
    wl = get_workload(name, **SMALL[name])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = wl.build_model(), wl.build_model()
    # Building models must not consume the caller's global RNG stream.
    assert torch.equal(torch.rand(3), expected_next)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    assert not torch.equal(
        next(iter(a.parameters())), next(iter(wl.build_model(seed=1).parameters()))
    )
    x0, y0 = wl.make_batch(5)
    x1, y1 = wl.make_batch(5)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(wl.make_batch(6)[0], x0)


def test_get_workload_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("nope")


def test_library_workloads_say_which_package_is_missing(monkeypatch) -> None:
    real = workloads.importlib.import_module

    def without_torchvision(name: str):
        if name == "torchvision":
            raise ModuleNotFoundError("No module named 'torchvision'")
        return real(name)

    monkeypatch.setattr(workloads.importlib, "import_module", without_torchvision)
    work = get_workload("tv_resnet18")  # building the workload needs nothing yet
    with pytest.raises(ImportError, match=r"workload 'tv_resnet18' needs torchvision.*"
                                          r"pip install torchvision"):
        work.build_model()


def test_hf_gpt2_keeps_its_embeddings_tied_when_moved(monkeypatch) -> None:
    # As .to() onto an XLA device does: new Parameters instead of new data in the old ones.
    monkeypatch.setattr(torch.__future__, "get_overwrite_module_params_on_conversion",
                        lambda: True)
    model = get_workload("hf_gpt2", **SMALL["hf_gpt2"]).build_model().double()
    gpt2 = model.model
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert gpt2.lm_head.weight.dtype == torch.float64


def test_clip_and_grad_scaler_loops_train() -> None:
    wl = get_workload("mlp", **SMALL["mlp"])
    x, y = wl.make_batch(0)

    model = wl.build_model()
    opt = workloads.make_adamw(model, lr=3e-3, lr_as_tensor=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
    losses = [float(train_step_clip(model, opt, x, y, scheduler=sched)) for _ in range(6)]
    assert losses[-1] < losses[0]

    model = wl.build_model()
    opt = workloads.make_adamw(model, lr=3e-3)
    scaler = workloads.make_grad_scaler("cpu", init_scale=2.0**8)
    losses = [float(train_step_amp(model, opt, scaler, x, y)) for _ in range(6)]
    assert losses[-1] < losses[0]
    assert scaler.get_scale() == 2.0**8  # finite grads: no skipped steps, no backoff


def test_gpt_ties_input_and_output_embeddings() -> None:
    model = GPTDecoder(vocab_size=64, d_model=32, n_layers=1, n_heads=4)
    assert model.lm_head.weight is model.tok_emb.weight
    params = list(model.parameters())
    assert sum(p is model.tok_emb.weight for p in params) == 1

    # Both uses contribute to the one gradient.
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(idx).sum().backward()
    assert model.tok_emb.weight.grad is not None
    assert model.lm_head.weight.grad is model.tok_emb.weight.grad


@pytest.mark.parametrize(
    "make",
    [
        lambda: TransformerLM(64, 32, 2, 4, 64, max_seq_len=16),
        lambda: TransformerLM(64, 32, 2, 4, 64, max_seq_len=16, norm_first=True),
        lambda: GPTDecoder(64, 32, 2, 4, max_seq_len=16, attn_impl="matmul"),
        lambda: GPTDecoder(64, 32, 2, 4, max_seq_len=16, attn_impl="sdpa"),
    ],
    ids=["lm-postln", "lm-preln", "gpt-matmul", "gpt-sdpa"],
)
def test_causal_mask_is_causal(make) -> None:
    model = workloads.seeded(make).eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    k = 9
    changed[:, k] = (changed[:, k] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    # Positions before k cannot see token k; position k itself does.
    torch.testing.assert_close(a[:, :k], b[:, :k])
    assert not torch.allclose(a[:, k], b[:, k])


def test_bert_attends_both_ways() -> None:
    model = workloads.seeded(lambda: BertEncoder(64, 32, 1, 4, max_seq_len=16)).eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 64
    with torch.no_grad():
        # The pooled first token must see the last token: not causal.
        assert not torch.allclose(model(idx), model(changed))


def test_models_reject_bad_sizes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TransformerLM(64, 30, 1, 4)
    with pytest.raises(ValueError, match="attn_impl"):
        GPTDecoder(64, 32, 1, 4, attn_impl="flash")
    with pytest.raises(ValueError, match="max_seq_len"):
        GPTDecoder(64, 32, 1, 4, max_seq_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_corpus_windows_are_deterministic_bytes() -> None:
    corpus = load_stdlib_corpus(1 << 20)
    assert corpus.dtype == torch.uint8
    assert corpus.numel() == 1 << 20  # the stdlib is much larger than 1 MiB
    assert torch.equal(corpus, load_stdlib_corpus(1 << 20))
    assert b"import " in corpus[:100_000].numpy().tobytes()  # it really is Python source

    x, y = corpus_batch(corpus, 8, 32, seed=3, step=7)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < workloads.BYTE_VOCAB
    assert torch.equal(x[:, 1:], y[:, :-1])  # target = input shifted by one byte

    x2, y2 = corpus_batch(corpus, 8, 32, seed=3, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, corpus_batch(corpus, 8, 32, seed=3, step=8)[0])
    assert not torch.equal(x, corpus_batch(corpus, 8, 32, seed=4, step=7)[0])

    stream = workloads.corpus_batches(corpus, 8, 32, seed=3, start_step=7)
    assert torch.equal(next(stream)[0], x)


def test_corpus_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        load_stdlib_corpus(0)
    with pytest.raises(ValueError, match="too short"):
        corpus_batch(torch.zeros(10, dtype=torch.uint8), 1, 16)


def test_demo_flags_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--d-model", "30", "--heads", "4"])
    assert exc.value.code == 2
    assert "divisible" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--batch", "-1"], ["--seq", "x"], ["--backend", "nope"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)
    args = demo.parse_args([])
    assert args.backend == "syncfree_xla" and args.d_model % args.heads == 0


def test_progress_bar_prints_plain_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    bar = demo.ProgressBar(20, stream=out)
    bar.update(5, 1.5, 2.0, log=False)
    bar.update(10, 1.25, 2.0, log=True)
    bar.close()
    assert out.getvalue() == "step 10/20  loss  1.2500    2.00 steps/s\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_a_tqdm_bar_on_a_terminal() -> None:
    out = _Terminal()
    bar = demo.ProgressBar(20, stream=out)
    bar.update(5, None, 2.0, log=False)
    bar.update(10, 1.25, 2.0, log=True)
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "10/20" in text and "loss=1.2500" in text, text
    assert "step 10/20  loss" not in text  # not the plain line form


def test_demo_runs_end_to_end_eager() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "xla_backend.tools.demo", "--backend", "eager", "--steps", "5"]
    cmd += ["--d-model", "32", "--layers", "1", "--heads", "2", "--batch", "2", "--seq", "16"]
    cmd += ["--no-baseline"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "first step" in proc.stdout and "steady step" in proc.stdout
    assert "host syncs/step" in proc.stdout
    assert any(line.startswith("eager ") for line in proc.stdout.splitlines())
    assert "step 5/5" in proc.stderr  # the progress bar's last line
