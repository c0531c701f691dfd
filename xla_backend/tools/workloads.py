"""Reference models, training steps and data shared by tests, the demo and benchmarks.

Every consumer (parity tests, benchmarks, ``python -m xla_backend.tools.demo``) must train
the *same* thing, otherwise numbers from one cannot be compared with another. So the
models, the step functions people actually write, and the data live here, once.

This module imports torch only; it never imports torch_xla, so it can be used by the
fast CPU tests and by the XLA backend alike. Step functions are plain module-level
functions so ``torch.compile(train_step, backend=...)`` can wrap them whole.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "BYTE_VOCAB",
    "MLP",
    "WORKLOADS",
    "BertEncoder",
    "GPTDecoder",
    "LibraryLogits",
    "ResNetish",
    "SmallCNN",
    "TransformerLM",
    "Workload",
    "corpus_batch",
    "corpus_batches",
    "cross_entropy",
    "get_workload",
    "load_stdlib_corpus",
    "make_adamw",
    "make_grad_scaler",
    "seeded",
    "train_step",
    "train_step_amp",
    "train_step_clip",
    "bert_workload",
    "cnn_workload",
    "gpt_workload",
    "hf_bert_workload",
    "hf_gpt2_workload",
    "mlp_workload",
    "resnet_workload",
    "transformer_lm_workload",
    "tv_resnet18_workload",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]

BYTE_VOCAB = 256
"""Vocabulary size of the byte-level corpus: every byte value is a token."""


# --------------------------------------------------------------------------- helpers


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build a module with a fixed init, without disturbing the caller's global RNG.

    Parity tests build the same model twice (eager reference and compiled copy), so
    the init must depend on ``seed`` alone, not on whatever ran before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _generator(seed: int, step: int) -> torch.Generator:
    # One independent, reproducible stream per (seed, step): batch ``step`` is the
    # same no matter which steps were drawn before it, or in which process.
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy for classifier logits ``(N, C)`` or LM logits ``(B, T, V)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _causal_mask(seq_len: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Additive mask: 0 on and below the diagonal, -inf above (position t sees <= t).
    return torch.full((seq_len, seq_len), float("-inf"), device=device, dtype=dtype).triu(1)


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """A plain MLP: the smallest model that still has an optimizer worth rewriting."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 128,
        out_features: int = 10,
        depth: int = 2,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        acts: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), acts[activation]()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv + BatchNorm + ReLU + MaxPool: exercises buffers mutated in training (BN stats)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetish(nn.Module):
    """A small CIFAR-style ResNet (3 stages of basic blocks) for vision benchmarks."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_ch = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                stages.append(_BasicBlock(in_ch, w, stride))
                in_ch = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class TransformerLM(nn.Module):
    """The DESIGN.md transformer LM, built from stock ``nn.TransformerEncoderLayer``.

    Uses the library layer on purpose: that is what users write, and it is the code
    path whose lowering the DESIGN.md anchors were measured on.
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 1024,
        max_seq_len: int = 256,
        dropout: float = 0.0,
        norm_first: bool = False,
        causal: bool = True,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.max_seq_len = max_seq_len
        self.causal = causal
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        # A ModuleList rather than nn.TransformerEncoder: same math, without the
        # nested-tensor fast path and its warnings, which are irrelevant to training.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                n_heads,
                dim_feedforward=d_ff,
                dropout=dropout,
                batch_first=True,
                norm_first=norm_first,
            )
            for _ in range(n_layers)
        )
        self.norm: nn.Module = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.lm_head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        seq_len = idx.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} > max_seq_len {self.max_seq_len}")
        pos = torch.arange(seq_len, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        mask = _causal_mask(seq_len, x.device, x.dtype) if self.causal else None
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=self.causal)
        return self.lm_head(self.norm(x))


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, attn_impl: str) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_impl = attn_impl
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                dropout_p=self.dropout if self.training else 0.0,
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
            att = att + _causal_mask(t, x.device, att.dtype)
            att = self.attn_drop(att.softmax(dim=-1))
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _GPTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_impl: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads, dropout, attn_impl)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff),
            nn.GELU(),
            nn.Linear(d_ff, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPTDecoder(nn.Module):
    """A hand-written GPT: pre-LN blocks, causal attention, tied input/output embeddings.

    Tied weights matter: one Parameter used twice means its gradient is a sum of two
    contributions, and a lowering that aliases or copies parameters must get that right.
    ``attn_impl`` picks explicit matmul+softmax ("matmul") or SDPA with is_causal ("sdpa").
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_seq_len: int = 256,
        dropout: float = 0.0,
        attn_impl: str = "matmul",
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if attn_impl not in ("matmul", "sdpa"):
            raise ValueError(f"attn_impl must be 'matmul' or 'sdpa', got {attn_impl!r}")
        self.max_seq_len = max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            _GPTBlock(d_model, n_heads, d_ff or 4 * d_model, dropout, attn_impl)
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        self.lm_head.weight = self.tok_emb.weight  # tie: the same Parameter object

    def _apply(self, fn: Callable, recurse: bool = True) -> GPTDecoder:
        # Moving to a device with another tensor type (CPU -> XLA) replaces each
        # module's Parameter with a new one, which silently unties the weights.
        super()._apply(fn, recurse)
        self.lm_head.weight = self.tok_emb.weight
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        seq_len = idx.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} > max_seq_len {self.max_seq_len}")
        pos = torch.arange(seq_len, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class BertEncoder(nn.Module):
    """A BERT-style sequence classifier: post-LN encoder, first token pooled -> classifier."""

    def __init__(
        self,
        vocab_size: int = 1000,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_seq_len: int = 256,
        num_classes: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.max_seq_len = max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        self.emb_norm = nn.LayerNorm(d_model)
        self.emb_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                n_heads,
                dim_feedforward=d_ff or 4 * d_model,
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=False,
            )
            for _ in range(n_layers)
        )
        self.pooler = nn.Linear(d_model, d_model)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, idx: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``padding_mask``: optional bool ``(B, T)``, True where a position is padding."""
        seq_len = idx.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} > max_seq_len {self.max_seq_len}")
        pos = torch.arange(seq_len, device=idx.device)
        x = self.emb_drop(self.emb_norm(self.tok_emb(idx) + self.pos_emb(pos)))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding_mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(pooled)


# --------------------------------------------------------------------------- step functions
#
# These are the loops people write. They are compiled whole, e.g.
#     step = torch.compile(train_step, backend="syncfree_xla")
#     loss = step(model, opt, x, y, cross_entropy)
# Each returns the loss detached and does not read it, so the step itself needs no host
# sync; reading it (``float(loss)``) is the caller's choice. The detached value is taken
# right after the forward, not at the end: a trailing ``return loss.detach()`` after
# ``zero_grad`` becomes a one-op graph of its own, which torch_xla 2.9's "openxla"
# backend fails to run ("Failed to get computation by hash ..."), and it would cost
# every backend an extra graph per step for nothing.


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = cross_entropy,
) -> Tensor:
    """Plain step: forward, loss, backward, optimizer step, zero grads."""
    loss = loss_fn(model(x), y)
    value = loss.detach()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return value


def train_step_clip(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = cross_entropy,
    max_norm: float = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> Tensor:
    """ "Loop A": gradient clipping before the step, optionally an LR scheduler after it.

    ``clip_grad_norm_`` computes a global norm, the classic source of a host sync in
    stock backends; with a scheduler the float lr changes every step (recompiles).
    """
    loss = loss_fn(model(x), y)
    value = loss.detach()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    if scheduler is not None:
        scheduler.step()
    opt.zero_grad(set_to_none=True)
    return value


def train_step_amp(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = cross_entropy,
    max_norm: float = 1.0,
) -> Tensor:
    """ "Loop B": GradScaler scale/backward/unscale_/clip/step/update.

    ``scaler.step`` skips the update when grads are non-finite, which stock backends
    implement with ``found_inf.item()``: a host sync and a graph break per step.
    """
    loss = loss_fn(model(x), y)
    value = loss.detach()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return value


def make_adamw(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    lr_as_tensor: bool = False,
) -> torch.optim.AdamW:
    """AdamW as the workloads use it; ``lr_as_tensor`` avoids recompiles when lr changes."""
    lr_value: float | Tensor = torch.tensor(lr) if lr_as_tensor else lr
    return torch.optim.AdamW(model.parameters(), lr=lr_value, weight_decay=weight_decay)


def make_grad_scaler(
    device: torch.device | str, init_scale: float = 2.0**16, growth_interval: int = 2000
) -> torch.amp.GradScaler:
    """A GradScaler for ``device``'s type ("cpu", "xla", ...), for ``train_step_amp``.

    ``growth_interval`` (good steps before the scale doubles) is torch's default; tests
    shorten it so that growth happens within a short run.
    """
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, init_scale=init_scale,
                                growth_interval=growth_interval)


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A model factory plus its deterministic data and loss, under one name.

    ``build_model(seed)`` gives the same init for the same seed; ``make_batch(step,
    device)`` gives the same batch for the same step, on any device.
    """

    name: str
    factory: Callable[[], nn.Module]
    batch_fn: Callable[[torch.Generator], Batch]
    loss_fn: LossFn = cross_entropy
    seed: int = 0

    def build_model(self, seed: int | None = None) -> nn.Module:
        return seeded(self.factory, self.seed if seed is None else seed)

    def make_batch(self, step: int, device: torch.device | str = "cpu") -> Batch:
        x, y = self.batch_fn(_generator(self.seed, step))
        return x.to(device), y.to(device)


def _teacher(in_dim: int, out_dim: int, seed: int = 1234) -> Tensor:
    # A fixed random projection labels the synthetic inputs, so the task is learnable
    # (loss falls across fresh batches, not only by memorising one batch).
    return torch.randn(in_dim, out_dim, generator=_generator(seed, 0))


def mlp_workload(
    batch: int = 32,
    in_features: int = 64,
    hidden: int = 128,
    num_classes: int = 10,
    seed: int = 0,
    depth: int = 2,
) -> Workload:
    """MLP on Gaussian inputs labelled by a fixed random linear teacher."""
    teacher = _teacher(in_features, num_classes)

    def batch_fn(g: torch.Generator) -> Batch:
        x = torch.randn(batch, in_features, generator=g)
        return x, (x @ teacher).argmax(dim=1)

    return Workload("mlp", lambda: MLP(in_features, hidden, num_classes, depth), batch_fn,
                    seed=seed)


def _image_batch_fn(batch: int, channels: int, size: int, num_classes: int) -> Callable:
    teacher = _teacher(channels * 16, num_classes)

    def batch_fn(g: torch.Generator) -> Batch:
        x = torch.randn(batch, channels, size, size, generator=g)
        feats = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return x, (feats @ teacher).argmax(dim=1)

    return batch_fn


def cnn_workload(
    batch: int = 16,
    image_size: int = 32,
    num_classes: int = 10,
    width: int = 16,
    seed: int = 0,
) -> Workload:
    """SmallCNN on random images labelled by a teacher on 4x4-pooled pixels."""
    return Workload(
        "cnn",
        lambda: SmallCNN(3, num_classes, width),
        _image_batch_fn(batch, 3, image_size, num_classes),
        seed=seed,
    )


def resnet_workload(
    batch: int = 16,
    image_size: int = 32,
    num_classes: int = 10,
    widths: tuple[int, ...] = (16, 32, 64),
    blocks_per_stage: int = 1,
    seed: int = 0,
) -> Workload:
    """ResNetish on the same synthetic image task, for vision benchmarks."""
    return Workload(
        "resnet",
        lambda: ResNetish(num_classes, 3, widths, blocks_per_stage),
        _image_batch_fn(batch, 3, image_size, num_classes),
        seed=seed,
    )


def _lm_batch_fn(batch: int, seq: int, vocab: int) -> Callable[[torch.Generator], Batch]:
    # Tokens follow a fixed bigram rule t -> (5t + 3) mod V from a random start, with
    # 10% random tokens mixed in: learnable by any causal model, yet not trivial.
    def batch_fn(g: torch.Generator) -> Batch:
        tokens = torch.empty(batch, seq + 1, dtype=torch.int64)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        noise = torch.rand(batch, seq + 1, generator=g) < 0.1
        rand = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        for t in range(1, seq + 1):
            tokens[:, t] = torch.where(noise[:, t], rand[:, t], (5 * tokens[:, t - 1] + 3) % vocab)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return batch_fn


def transformer_lm_workload(
    batch: int = 16,
    seq: int = 64,
    vocab_size: int = 1000,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    d_ff: int = 1024,
    dropout: float = 0.0,
    norm_first: bool = False,
    seed: int = 0,
) -> Workload:
    """The DESIGN.md transformer LM (defaults are the anchor configuration)."""
    return Workload(
        "transformer_lm",
        lambda: TransformerLM(
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            d_ff,
            max(seq, 64),
            dropout,
            norm_first,
        ),
        _lm_batch_fn(batch, seq, vocab_size),
        seed=seed,
    )


def gpt_workload(
    batch: int = 8,
    seq: int = 64,
    vocab_size: int = 1000,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    attn_impl: str = "matmul",
    seed: int = 0,
) -> Workload:
    """The hand-written GPT decoder on the synthetic bigram LM task."""
    return Workload(
        "gpt",
        lambda: GPTDecoder(
            vocab_size, d_model, n_layers, n_heads, None, max(seq, 64), 0.0, attn_impl
        ),
        _lm_batch_fn(batch, seq, vocab_size),
        seed=seed,
    )


def bert_workload(
    batch: int = 8,
    seq: int = 64,
    vocab_size: int = 1000,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    num_classes: int = 2,
    seed: int = 0,
) -> Workload:
    """BertEncoder classifying whether most tokens lie in the lower half of the vocab."""
    return Workload(
        "bert",
        lambda: BertEncoder(
            vocab_size, d_model, n_layers, n_heads, None, max(seq, 64), num_classes
        ),
        _majority_batch_fn(batch, seq, vocab_size, num_classes),
        seed=seed,
    )


def _majority_batch_fn(batch: int, seq: int, vocab: int, num_classes: int) -> Callable:
    def batch_fn(g: torch.Generator) -> Batch:
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        x[:, 0] = 0  # a [CLS]-like first token, the one that gets pooled
        low = (x[:, 1:] < vocab // 2).sum(dim=1)
        return x, (low * 2 > seq - 1).long() % num_classes

    return batch_fn


# --------------------------------------------------------------------------- library models
#
# Models written by other people for eager PyTorch and inductor, from small configs and
# randomly initialised (nothing is downloaded). torchvision and transformers are optional:
# they come with this package's ``dev`` extra.


def _library(module: str, workload: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"workload {workload!r} needs {module}, which is not installed; install it "
            f"with `pip install {module}` or this package's dev extra "
            f"(`pip install -e '.[dev]'`)") from err


class LibraryLogits(nn.Module):
    """A Hugging Face model called as ``model(input_ids)`` returning its logits.

    Moving it to a device re-ties tied weights (GPT-2's ``lm_head`` and ``wte``):
    ``.to()`` onto an XLA device makes new Parameters, which unties them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids,
                          attention_mask=torch.ones_like(input_ids)).logits

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LibraryLogits:
        out = super()._apply(fn, recurse)
        self.model.tie_weights()
        return out


def _transformers() -> ModuleType:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: never reach the Hub
    module = _library("transformers", "hf_gpt2 / hf_bert")
    module.logging.set_verbosity_error()
    return module


def tv_resnet18_workload(
    batch: int = 16,
    image_size: int = 64,
    num_classes: int = 10,
    seed: int = 0,
) -> Workload:
    """torchvision's ResNet-18 at 64x64 (stem pooling: its last stage runs on 2x2 maps)."""

    def factory() -> nn.Module:
        return _library("torchvision", "tv_resnet18").models.resnet18(num_classes=num_classes)

    return Workload("tv_resnet18", factory, _image_batch_fn(batch, 3, image_size, num_classes),
                    seed=seed)


def hf_gpt2_workload(
    batch: int = 8,
    seq: int = 64,
    vocab_size: int = 1000,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    seed: int = 0,
) -> Workload:
    """Hugging Face's GPT2LMHeadModel (tied embeddings, SDPA) on the bigram LM task."""

    def factory() -> nn.Module:
        transformers = _transformers()
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=max(seq, 64), n_embd=d_model,
            n_layer=n_layers, n_head=n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)
        return LibraryLogits(transformers.GPT2LMHeadModel(config))

    return Workload("hf_gpt2", factory, _lm_batch_fn(batch, seq, vocab_size), seed=seed)


def hf_bert_workload(
    batch: int = 8,
    seq: int = 64,
    vocab_size: int = 1000,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    num_classes: int = 2,
    seed: int = 0,
) -> Workload:
    """Hugging Face's BertForSequenceClassification on the ``bert`` workload's task."""

    def factory() -> nn.Module:
        transformers = _transformers()
        config = transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, intermediate_size=4 * d_model,
            max_position_embeddings=max(seq, 64), num_labels=num_classes,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return LibraryLogits(transformers.BertForSequenceClassification(config))

    return Workload("hf_bert", factory,
                    _majority_batch_fn(batch, seq, vocab_size, num_classes), seed=seed)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "mlp": mlp_workload,
    "cnn": cnn_workload,
    "resnet": resnet_workload,
    "transformer_lm": transformer_lm_workload,
    "gpt": gpt_workload,
    "bert": bert_workload,
    "tv_resnet18": tv_resnet18_workload,
    "hf_gpt2": hf_gpt2_workload,
    "hf_bert": hf_bert_workload,
}


def get_workload(name: str, **kwargs: object) -> Workload:
    """Look a workload up by name; keyword args override its sizes."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}") from None
    return factory(**kwargs)


# --------------------------------------------------------------------------- text corpus


_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@functools.lru_cache(maxsize=4)
def _read_stdlib(max_bytes: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (
            p
            for p in root.rglob("*.py")
            if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chunks: list[bytes] = []
    total = 0
    for path in files:
        if total >= max_bytes:
            break
        try:
            data = path.read_bytes()
        except OSError as exc:  # a broken symlink or permission problem: skip, stay going
            logger.debug("skipping %s: %s", path, exc)
            continue
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
    logger.debug("read %d bytes from %d stdlib files under %s", total, len(chunks), root)
    return b"".join(chunks)


def load_stdlib_corpus(max_bytes: int = 4 << 20) -> Tensor:
    """The Python standard library's ``*.py`` sources as one uint8 tensor (vocab 256).

    Every machine that runs this project has it, offline, so the demo and benchmarks
    train on real text without a download. Files are read in sorted order (site-packages
    excluded) so the corpus is the same on every run of the same Python.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    data = _read_stdlib(max_bytes)
    if not data:
        raise RuntimeError(f"no *.py files found under {sysconfig.get_paths()['stdlib']}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def corpus_batch(
    corpus: Tensor,
    batch: int,
    seq: int,
    *,
    seed: int = 0,
    step: int = 0,
    device: torch.device | str = "cpu",
) -> Batch:
    """Random windows of ``seq + 1`` bytes as int64 ``(input, target)``, shifted by one.

    Deterministic in ``(seed, step)``: batch ``step`` is the same whatever came before,
    so a compiled run and its eager reference see identical data.
    """
    if corpus.numel() < seq + 2:
        raise ValueError(f"corpus of {corpus.numel()} bytes is too short for seq={seq}")
    starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=_generator(seed, step))
    windows = corpus[starts[:, None] + torch.arange(seq + 1)].long()
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


def corpus_batches(
    corpus: Tensor,
    batch: int,
    seq: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[Batch]:
    """An endless stream of ``corpus_batch`` for steps ``start_step, start_step + 1, ...``."""
    step = start_step
    while True:
        yield corpus_batch(corpus, batch, seq, seed=seed, step=step, device=device)
        step += 1
