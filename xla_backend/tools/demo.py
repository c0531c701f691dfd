"""Train a byte-level transformer LM on the Python stdlib sources under torch.compile.

This is the project's "main job" (``make demo`` runs ``python -m xla_backend.tools.demo``):
a real training loop whose loss visibly falls, followed by a small table measured in
the same run, for the chosen backend and for eager CPU, so a regression in step time,
compile count or host syncs shows up where people look first.

    python -m xla_backend.tools.demo                       # syncfree_xla, default sizes
    python -m xla_backend.tools.demo --backend openxla     # torch_xla's stock backend
    python -m xla_backend.tools.demo --backend eager --steps 20 --no-baseline
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from xla_backend import xla_metrics
from xla_backend.device import configure_pjrt
from xla_backend.tools import backends, workloads
from xla_backend.tools.argtypes import positive_float, positive_int

# the demo compiles its step: "lazy" (bench's uncompiled baseline) is not one of its modes
BACKENDS = tuple(b for b in backends.BACKENDS if b != "lazy")
XLA_BACKENDS = backends.XLA_BACKENDS
WARMUP_STEPS = 3  # steps 0..2 compile; everything after is "steady"
DEFAULT_LOG_EVERY = 10


# --------------------------------------------------------------------------- arguments




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags; errors exit with argparse's usage message."""
    p = argparse.ArgumentParser(
        prog="python -m xla_backend.tools.demo",
        description="Train a byte-level TransformerLM on the Python stdlib under torch.compile "
        "and report first-step time, steady step time, XLA compiles and host syncs.",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="syncfree_xla",
        help="torch.compile backend, or 'eager' for no compile (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=200,
        help="training steps (default: %(default)s)",
    )
    p.add_argument(
        "--d-model",
        type=positive_int,
        default=256,
        help="model width (default: %(default)s)",
    )
    p.add_argument(
        "--layers",
        type=positive_int,
        default=4,
        help="encoder layers (default: %(default)s)",
    )
    p.add_argument(
        "--heads",
        type=positive_int,
        default=4,
        help="attention heads; must divide --d-model (default: %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=16,
        help="sequences per batch (default: %(default)s)",
    )
    p.add_argument(
        "--seq",
        type=positive_int,
        default=64,
        help="bytes per sequence (default: %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=1e-3,
        help="AdamW learning rate (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="init and data seed (default: %(default)s)")
    p.add_argument(
        "--log-every",
        type=positive_int,
        default=DEFAULT_LOG_EVERY,
        help="read the loss (one host sync) every N steps (default: %(default)s)",
    )
    p.add_argument(
        "--baseline-steps",
        type=positive_int,
        default=20,
        help="eager CPU steps timed for the comparison row (default: %(default)s)",
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the eager CPU baseline measurement",
    )
    args = p.parse_args(argv)
    if args.d_model % args.heads:
        p.error(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    if args.seq + 2 > _CORPUS_BYTES:
        p.error(f"--seq ({args.seq}) is longer than the corpus")
    return args


_CORPUS_BYTES = 4 << 20


# --------------------------------------------------------------------------- progress bar


class ProgressBar:
    """Progress on stderr: a tqdm bar on a terminal, plain periodic lines otherwise.

    The loss shown is the last one *read*; reading it costs a host sync, so the caller
    decides when (see ``Trainer``), and redraws in between show the stale value. Off a
    terminal (CI logs, pipes), or without tqdm (it comes with the dev extra's
    transformers), each point the caller marks ``log`` is one line.
    """

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        if self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, file=self.stream, unit="step",
                                 dynamic_ncols=True, leave=True)

    @property
    def live(self) -> bool:
        """Whether every step redraws it (a terminal bar), not only the logged ones."""
        return self._bar is not None

    def update(self, step: int, loss: float | None, rate: float | None, log: bool) -> None:
        """Show progress after ``step`` steps; ``log`` marks a point worth a plain line."""
        if self._bar is not None:
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if log:
            loss_s = f"{loss:7.4f}" if loss is not None else "      ?"
            rate_s = f"{rate:6.2f}" if rate is not None else "     ?"
            self.stream.write(f"step {step:>{len(str(self.total))}}/{self.total}  "
                              f"loss {loss_s}  {rate_s} steps/s\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------- measurement


class _Probe:
    """Barriers and counters; torch_xla executes asynchronously, eager does not.

    Counts come from torch_xla's own metrics, which read zero when torch_xla was
    never imported (eager and inductor runs).
    """

    def __init__(self, xla: bool) -> None:
        self._xla = xla

    def barrier(self) -> None:
        # Flush pending lazy work and wait until the device is idle, so wall time
        # between two barriers covers exactly the work issued between them.
        if self._xla:
            import torch_xla
            import torch_xla.core.xla_model as xm

            torch_xla.sync()
            xm.wait_device_ops()

    def compiles(self) -> int:
        return xla_metrics.compiles()

    def transfers(self) -> int:
        """Device-to-host transfers: each one is a host sync."""
        return xla_metrics.device_to_host_transfers()


@dataclass
class RunResult:
    """What one training run measured; ``None`` where a figure does not apply."""

    label: str
    first_step_s: float
    steady_step_s: float | None
    compiles: int | None = None
    steady_compiles: int | None = None
    syncs_per_step: float | None = None
    loss_reads: int = 0
    loss_read_syncs: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)


def _make_step(backend: str) -> Callable:
    if backend == "eager":
        return workloads.train_step
    from torch._dynamo.exc import InvalidBackend

    if backend == "openxla":
        import torch_xla  # noqa: F401  (registers the "openxla" Dynamo backend)
    try:
        return torch.compile(workloads.train_step, backend=backend)
    except InvalidBackend:
        raise SystemExit(
            f"error: torch.compile backend {backend!r} is not registered. For syncfree_xla, "
            "install this package (pip install -e .) so its entry point is found, or run "
            "with --backend openxla / eager."
        ) from None


def _build(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = workloads.seeded(
        lambda: workloads.TransformerLM(
            vocab_size=workloads.BYTE_VOCAB,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=args.heads,
            d_ff=4 * args.d_model,
            max_seq_len=args.seq,
            norm_first=True,
        ),
        args.seed,
    ).to(device)
    return model, workloads.make_adamw(model, lr=args.lr)


def train(
    args: argparse.Namespace,
    backend: str,
    steps: int,
    corpus: torch.Tensor,
    progress: ProgressBar | None,
) -> RunResult:
    """Run ``steps`` steps; time the first, warm-up, and steady chunks separately.

    Steady time: the steps after warm-up are split into chunks that end where the loss
    is read. Each chunk is bracketed by device barriers (no per-step sync), its wall
    time divided by its steps, and the median over chunks reported.
    """
    if backend in XLA_BACKENDS:
        configure_pjrt()
        import torch_xla

        device = torch_xla.device()
    else:
        device = torch.device("cpu")
    probe = _Probe(xla=backend in XLA_BACKENDS)

    model, opt = _build(args, device)
    step_fn = _make_step(backend)
    result = RunResult(label=backend, first_step_s=0.0, steady_step_s=None)

    # Reading the loss (float(loss)) copies it to the host: one sync, which would be
    # the dominant sync in an otherwise sync-free loop if done every step. So it is
    # read only every --log-every steps and at the end, and the transfers it causes
    # are counted apart and excluded from "host syncs/step", which is meant to show
    # what the *step itself* costs.
    loss_read_transfers = 0

    def read_loss(step: int, loss: torch.Tensor) -> float:
        nonlocal loss_read_transfers
        before = probe.transfers()
        value = float(loss)
        loss_read_transfers += probe.transfers() - before
        result.loss_reads += 1
        result.losses.append((step, value))
        return value

    def run(step: int) -> torch.Tensor:
        x, y = workloads.corpus_batch(
            corpus, args.batch, args.seq, seed=args.seed, step=step, device=device
        )
        return step_fn(model, opt, x, y, workloads.cross_entropy)

    warmup = min(WARMUP_STEPS, steps)
    last_loss: float | None = None
    probe.barrier()
    compiles0 = probe.compiles()
    t_start = time.perf_counter()

    # First step: Dynamo tracing, AOTAutograd, XLA compile, then execution.
    loss = run(0)
    probe.barrier()
    result.first_step_s = time.perf_counter() - t_start
    last_loss = read_loss(0, loss)
    if progress:
        progress.update(1, last_loss, None, log=True)

    for step in range(1, warmup):
        loss = run(step)
        if progress:
            progress.update(step + 1, last_loss, None, log=False)
    probe.barrier()

    chunk_rates: list[float] = []  # seconds per step, one per chunk
    steady_steps = 0
    steady_transfers = 0
    steady_compiles0 = probe.compiles()
    chunk_start, chunk_steps = time.perf_counter(), 0
    transfers_start = probe.transfers()
    for step in range(warmup, steps):
        loss = run(step)
        chunk_steps += 1
        is_log = (step + 1) % args.log_every == 0 or step == steps - 1
        if not is_log:
            if progress and progress.live:
                rate = 1.0 / chunk_rates[-1] if chunk_rates else None
                progress.update(step + 1, last_loss, rate, log=False)
            continue
        probe.barrier()
        elapsed = time.perf_counter() - chunk_start
        steady_transfers += probe.transfers() - transfers_start
        chunk_rates.append(elapsed / chunk_steps)
        steady_steps += chunk_steps
        last_loss = read_loss(step, loss)  # outside the timed chunk and its transfer count
        if progress:
            progress.update(step + 1, last_loss, 1.0 / chunk_rates[-1], log=True)
        chunk_start, chunk_steps = time.perf_counter(), 0
        transfers_start = probe.transfers()

    if result.losses[-1][0] != steps - 1:  # runs too short to have a steady part
        read_loss(steps - 1, loss)
    if progress:
        progress.close()

    if chunk_rates:
        result.steady_step_s = statistics.median(chunk_rates)
    if backend in XLA_BACKENDS:
        result.compiles = probe.compiles() - compiles0
        if steady_steps:
            result.steady_compiles = probe.compiles() - steady_compiles0
            result.syncs_per_step = steady_transfers / steady_steps
    else:
        result.syncs_per_step = 0.0
    result.loss_read_syncs = loss_read_transfers
    return result


def eager_baseline(args: argparse.Namespace, corpus: torch.Tensor) -> RunResult:
    """Eager CPU on the same model and data: synchronous, so each step is timed alone."""
    model, opt = _build(args, torch.device("cpu"))
    times: list[float] = []
    loss = torch.zeros(())
    for step in range(args.baseline_steps):
        x, y = workloads.corpus_batch(corpus, args.batch, args.seq, seed=args.seed, step=step)
        t0 = time.perf_counter()
        loss = workloads.train_step(model, opt, x, y, workloads.cross_entropy)
        times.append(time.perf_counter() - t0)
    steady = times[WARMUP_STEPS:] or times[1:]
    return RunResult(
        label="eager (CPU baseline)",
        first_step_s=times[0],
        steady_step_s=statistics.median(steady) if steady else None,
        syncs_per_step=0.0,
        losses=[(args.baseline_steps - 1, float(loss))],
    )


# --------------------------------------------------------------------------- report


def format_table(rows: list[RunResult]) -> str:
    """A plain-text table; figures that do not apply print as n/a."""
    header = ("backend", "first step", "steady step", "XLA compiles", "host syncs/step")

    def fmt(r: RunResult) -> tuple[str, ...]:
        compiles = "n/a" if r.compiles is None else str(r.compiles)
        if r.steady_compiles is not None:
            compiles += f" ({r.steady_compiles} steady)"
        return (
            r.label,
            f"{r.first_step_s:.2f} s",
            "n/a" if r.steady_step_s is None else f"{r.steady_step_s * 1e3:.1f} ms",
            compiles,
            "n/a" if r.syncs_per_step is None else f"{r.syncs_per_step:.2f}",
        )

    body = [header] + [fmt(r) for r in rows]
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    corpus = workloads.load_stdlib_corpus(_CORPUS_BYTES)
    n_params = sum(
        p.numel()
        for p in workloads.TransformerLM(
            workloads.BYTE_VOCAB,
            args.d_model,
            args.layers,
            args.heads,
            4 * args.d_model,
            args.seq,
        ).parameters()
    )
    print(
        f"TransformerLM d={args.d_model} layers={args.layers} heads={args.heads} "
        f"({n_params / 1e6:.2f}M params), batch {args.batch}x{args.seq} bytes, "
        f"{corpus.numel() / 1e6:.1f} MB stdlib corpus, AdamW lr={args.lr}, "
        f"backend={args.backend}, {args.steps} steps",
        flush=True,
    )
    progress = ProgressBar(args.steps)
    try:
        result = train(args, args.backend, args.steps, corpus, progress)
    finally:
        progress.close()  # leave the terminal on a fresh line even on Ctrl-C
    (first_step, first_loss), (last_step, last_loss) = (
        result.losses[0],
        result.losses[-1],
    )
    print(
        f"loss {first_loss:.4f} (step {first_step + 1}) -> {last_loss:.4f} (step {last_step + 1})"
    )

    rows = [result]
    if args.backend != "eager" and not args.no_baseline:
        print(
            f"timing {args.baseline_steps} eager CPU steps for comparison...",
            flush=True,
        )
        rows.append(eager_baseline(args, corpus))
    print()
    print(format_table(rows))
    notes = []
    if result.steady_step_s is not None:
        notes.append(
            f"steady = median per-step time over chunks of steps "
            f"{min(WARMUP_STEPS, args.steps) + 1}..{args.steps}"
        )
    else:
        notes.append(f"no steady steps: the first {WARMUP_STEPS} steps are warm-up")
    if args.backend in XLA_BACKENDS:
        notes.append(
            f"host syncs/step excludes the {result.loss_reads} loss reads for the progress "
            f"bar ({result.loss_read_syncs} syncs, one read every {args.log_every} steps)"
        )
    baseline = rows[-1] if len(rows) > 1 else None
    if baseline and baseline.steady_step_s and result.steady_step_s:
        ratio = result.steady_step_s / baseline.steady_step_s
        notes.append(f"{args.backend} steady step = {ratio:.2f}x eager CPU's (lower is better)")
    notes.append(f"total wall time {time.perf_counter() - wall0:.1f} s")
    print("\n" + "\n".join(f"* {n}" for n in notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
