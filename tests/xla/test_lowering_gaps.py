"""Ops whose torch_xla registration loses or bends a gradient, that have no lowering,
whose backward AOTAutograd could not trace, or whose torch decomposition is wrong
(``xla_backend.rewrites.lowering_gaps``), trained as a whole compiled step against eager
PyTorch on CPU.

Each op sits between a parameter and the loss, so a gradient that does not reach the
parameter leaves it untrained, and the comparison fails.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from tests.xla_helpers import assert_same_state, twin, warm_then_measure
from xla_backend.cache import aot_cache
from xla_backend.rewrites import lowering_gaps

STEPS = 8
WARMUP = 3


class _Between(torch.nn.Module):
    """Linear -> ``op`` -> Linear: the first layer's gradient passes through ``op``."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], width: int = 12) -> None:
        super().__init__()
        self.op = op
        self.inner = torch.nn.Linear(6, width)
        self.outer = torch.nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.op(self.inner(x)))


def _layer_norm_with_std(h: torch.Tensor) -> torch.Tensor:
    """A LayerNorm written by hand, as tutorials write it: ``x.std(-1)``."""
    return (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-6)


def _kl_to_uniform(h: torch.Tensor) -> torch.Tensor:
    target = torch.full_like(h, 1.0 / h.shape[-1])
    kl = F.kl_div(F.log_softmax(h, -1), target, reduction="none").sum(-1, keepdim=True)
    return h * kl


def _patch_mean(h: torch.Tensor) -> torch.Tensor:
    """Overlapping windows (size 4, step 2) averaged: ``Tensor.unfold`` and its backward."""
    return h.unfold(-1, 4, 2).mean(-1)


def _log_space_scan(h: torch.Tensor) -> torch.Tensor:
    """A log-space scan from an empty start (``log 0``), as minGRU's parallel mode
    writes one, over the batch: the ``-inf`` start meets the scan's own padding."""
    start = torch.full_like(h[:1], float("-inf"))
    return torch.logcumsumexp(torch.cat([start, h]), 0)[1:]


#: op name -> what the layer between the two Linears computes
OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # no gradient at all on main before the fix: the first layer never trained
    "std_dim": _layer_norm_with_std,
    "std_unbiased_false": lambda h: h * torch.std(h, 1, unbiased=False, keepdim=True),
    "kl_div": _kl_to_uniform,
    "diag": lambda h: h * torch.diag(h[:, :h.shape[0]]).sum(),
    "selu": F.selu,
    # a wrong gradient wherever the input is negative
    "elu": lambda h: F.elu(h, alpha=0.7),
    "celu": lambda h: F.celu(h, alpha=1.3),
    "norm_inf": lambda h: h / torch.norm(h, float("inf"), dim=-1, keepdim=True),
    "norm_minus_inf": lambda h: h * torch.norm(h, float("-inf")),
    # no lowering: one host round trip per step each
    "glu": lambda h: F.glu(h, dim=-1),
    "logaddexp": lambda h: torch.logaddexp(h, -2 * h),
    "unfold": _patch_mean,
    # no lowering, forward or backward (which calls it too): three round trips a step
    "logcumsumexp": lambda h: torch.logcumsumexp(h, -1),
    "logcumsumexp_from_minus_inf": _log_space_scan,
    # a backward AOTAutograd could not trace on XLA (the compile failed)
    "affine_grid": lambda h: F.affine_grid(h[:, :6].reshape(-1, 2, 3), [h.shape[0], 1, 3, 2],
                                           align_corners=False).flatten(1),
    "affine_grid_3d": lambda h: F.affine_grid(h.reshape(-1, 3, 4), [h.shape[0], 1, 2, 2, 2],
                                              align_corners=True).flatten(1),
    # no lowering, forward or backward: two host round trips per step
    "grid_sample": lambda h: F.grid_sample(h.reshape(-1, 1, 3, 4),
                                           torch.tanh(h[:, :8]).reshape(-1, 2, 2, 2),
                                           align_corners=False).flatten(1),
}


def _train(model: torch.nn.Module, loss_fn: Callable, device: torch.device | str,
           compiled: bool, measured: bool = False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    run = torch.compile(step, backend="syncfree_xla") if compiled else step
    losses = []

    def one(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        losses.append(run(x.to(device), y.to(device)))

    window = warm_then_measure(one, WARMUP, STEPS) if measured else None
    if not measured:
        for i in range(STEPS):
            one(i)
    return torch.stack([loss.cpu() for loss in losses]), window


def _check(xla, model: torch.nn.Module, loss_fn: Callable = F.mse_loss) -> None:
    torch.manual_seed(0)
    model(torch.zeros(1, 6))  # materializes the lazy layer before the copies
    model, reference = twin(model, xla)
    want, _ = _train(reference, loss_fn, "cpu", compiled=False)
    got, window = _train(model, loss_fn, xla, compiled=True, measured=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_same_state(model, reference, rtol=1e-4)
    assert (window.counts.transfers_to_host, window.counts.compiles) == (0, 0), window.counts
    assert window.counts.executions == STEPS - WARMUP, window.counts


@pytest.mark.parametrize("name", list(OPS))
def test_gradients_through_the_op_train_like_eager(xla, name):
    _check(xla, _Between(OPS[name]))


def test_huber_loss_trains_like_eager_without_host_round_trips(xla):
    _check(xla, _Between(torch.tanh), lambda out, y: F.huber_loss(out, y, delta=0.5))


def test_spectral_norm_trains_like_eager_without_host_round_trips(xla):
    """``spectral_norm``'s power iteration calls ``vdot``; its buffers ``u`` and ``v``
    are compared too."""
    model = _Between(torch.tanh)
    model.inner = torch.nn.utils.parametrizations.spectral_norm(model.inner)
    _check(xla, model)


class _MaxNormEmbedding(torch.nn.Module):
    """Rows picked by the input's magnitudes, some twice in a batch, renormalized to
    ``max_norm`` in place as they are looked up (``embedding_renorm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4, max_norm=1.0)
        self.outer = torch.nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = (x.abs() * 4).long().clamp(max=9)
        return self.outer(self.embed(index).flatten(1))


def test_an_embedding_with_max_norm_trains_like_eager_without_host_round_trips(xla):
    """``embedding_renorm`` has no lowering and torch no decomposition of it: the
    lookup table went to the host and back each step (two transfers)."""
    _check(xla, _MaxNormEmbedding())


def _batch(h: torch.Tensor, rows: int, cols: int, shift: float = 0.0) -> torch.Tensor:
    """``h``'s rows as a batch of ``rows x cols`` matrices, ``shift`` added on the diagonal
    (kept away from singular, where these ops' gradients blow up in eager too)."""
    a = h.reshape(h.shape[0], -1, rows, cols)[:, 0]
    return a + shift * torch.eye(rows, cols, device=h.device)


def _spd(h: torch.Tensor) -> torch.Tensor:
    a = _batch(h, 3, 4)
    return a @ a.mT + torch.eye(3, device=h.device)


def _svd_invariants(a: torch.Tensor, full_matrices: bool) -> torch.Tensor:
    """What does not depend on the singular vectors' signs: the projections onto the
    column and row spaces, the singular values and the reconstruction."""
    u, s, vh = torch.linalg.svd(a, full_matrices=full_matrices)
    k = s.shape[-1]
    rows = u[..., :k] @ u[..., :k].mT
    cols = vh[..., :k, :].mT @ vh[..., :k, :]
    rebuilt = (u[..., :k] * s.unsqueeze(-2)) @ vh[..., :k, :]
    return (rows.flatten(1).sum(1) + cols.flatten(1).sin().sum(1) + s.flatten(1).sum(1)
            + rebuilt.flatten(1).sum(1))


#: op name -> the layer's factor per sample, from a matrix (or a batch of them) made
#: from the first layer's output
LINEAR_ALGEBRA: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # torch_xla returns no LU factors, which torch's backward of slogdet solves with:
    # the compile stopped with a bare AssertionError in AOTAutograd
    "slogdet_of_one_matrix": lambda h: torch.linalg.slogdet(_batch(h, 4, 3, 3.0)[0, :3])[1]
    .expand(h.shape[0]),
    "slogdet_sign_times_log": lambda h: torch.mul(*torch.linalg.slogdet(_batch(h, 2, 2, 2.0))),
    "logdet_of_a_batch": lambda h: torch.logdet(_spd(h)),
    # torch_xla declares a batch's singular values without the batch dims, and swaps
    # the wrong dims of V: a wrong shape (so wrong elements) for every later op
    "svdvals_of_a_batch": lambda h: torch.linalg.svdvals(_batch(h, 3, 4)).sum(-1),
    "nuclear_norm_of_a_batch": lambda h: torch.linalg.matrix_norm(_batch(h, 4, 3), ord="nuc"),
    "svd_of_a_batch": lambda h: _svd_invariants(_batch(h, 3, 4), full_matrices=False),
    "full_svd_of_a_batch": lambda h: _svd_invariants(_batch(h, 4, 3), full_matrices=True),
    "svd_of_a_batch_of_batches": lambda h: _svd_invariants(h.reshape(-1, 2, 2, 3), False),
    # torch_xla's own pinv kernel failed to lower a batch
    "pinv_of_a_batch": lambda h: torch.linalg.pinv(_batch(h, 3, 4, 2.0)).flatten(1).sum(1),
    "pinv_of_one_matrix": lambda h: torch.linalg.pinv(_batch(h, 3, 4, 2.0)[0]).sum()
    .expand(h.shape[0]),
    "hermitian_pinv_of_a_batch": lambda h: torch.linalg.pinv(_spd(h), hermitian=True)
    .flatten(1).sum(1),
    # torch.linalg's Cholesky and triangular solves and cholesky_solve ran on the host
    "cholesky_solve": lambda h: torch.cholesky_solve(
        h[:, :3, None], torch.linalg.cholesky(_spd(h))).flatten(1).sum(1),
    "cholesky_solve_upper": lambda h: torch.cholesky_solve(
        h[:, :3, None], torch.linalg.cholesky(_spd(h), upper=True), upper=True).flatten(1).sum(1),
    "solve_triangular": lambda h: torch.linalg.solve_triangular(
        torch.linalg.cholesky(_spd(h)), h[:, :6].reshape(-1, 3, 2), upper=False).flatten(1).sum(1),
    "solve_triangular_right_unit": lambda h: torch.linalg.solve_triangular(
        torch.linalg.cholesky(_spd(h)).mT, h[:, :6].reshape(-1, 2, 3), upper=True, left=False,
        unitriangular=True).flatten(1).sum(1),
    # no lowering, forward or backward: two host round trips a step each
    "matrix_exp_of_a_batch": lambda h: torch.linalg.matrix_exp(h[:, :9].reshape(-1, 3, 3))
    .flatten(1).sum(1),
    "householder_product_of_a_batch": lambda h: torch.linalg.householder_product(
        _batch(h, 4, 3), torch.sigmoid(h[:, :2])).flatten(1).sum(1),
}


@pytest.mark.parametrize("name", list(LINEAR_ALGEBRA))
def test_linear_algebra_trains_like_eager(xla, name):
    """Each op scales the first layer's output per sample, so its gradient reaches the
    first layer through the op and through the scale."""
    op = LINEAR_ALGEBRA[name]
    _check(xla, _Between(lambda h: h * torch.tanh(op(h)).unsqueeze(1)))


class _Orthogonal(torch.nn.Module):
    """A Linear whose weight ``parametrizations.orthogonal`` keeps orthogonal, between
    two others: ``matrix_exp`` computes a square one, ``householder_product`` the rest."""

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(6, 8)
        self.middle = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(8, columns))
        self.outer = torch.nn.Linear(columns, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.middle(torch.tanh(self.inner(x)))))


@pytest.mark.parametrize("columns", [8, 5], ids=["square-matrix_exp", "householder"])
def test_an_orthogonal_parametrization_trains_like_eager_without_host_round_trips(
        xla, columns):
    """torch_xla has no lowering for ``linalg_matrix_exp`` nor
    ``linalg_householder_product``: 2 host transfers and 2-3 executions a step before
    ``rewrites.matrix_functions``."""
    _check(xla, _Orthogonal(columns))


_D = torch.distributions


def _beta_policy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A PPO-style Beta policy's loss: log-probability and entropy bonus."""
    c = F.softplus(out) + 1.0
    policy = _D.Beta(c[:, 0], c[:, 1])
    action = torch.sigmoid(y[:, 0]) * 0.9 + 0.05
    return -policy.log_prob(action).mean() - 0.01 * policy.entropy().mean()


def _dirichlet(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = _D.Dirichlet(F.softplus(out) + 0.5)
    return -d.log_prob(torch.softmax(y, -1)).mean() - 0.01 * d.entropy().mean()


def _counts_and_rates(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gamma, Poisson (with zero counts: ``lgamma(1)``) and Student-t log-probabilities."""
    c = F.softplus(out) + 0.1
    counts = (y.abs() * 3).floor()
    return -(_D.Gamma(c[:, 0], c[:, 1]).log_prob(y[:, 0].abs() + 0.1).mean()
             + _D.Poisson(c[:, 2] * 3).log_prob(counts[:, 2]).mean()
             + _D.StudentT(c[:, 0] + 1.0, y[:, 1], c[:, 2]).log_prob(y[:, 2]).mean())


def _multivariate_normal(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A full-covariance Gaussian's log-probability, from a Cholesky factor and from a
    covariance (``torch.linalg.cholesky``; ``solve_triangular`` in both)."""
    c = F.softplus(out) + 0.5
    tril = torch.diag_embed(c) + torch.tril(torch.tanh(out).unsqueeze(1) * 0.3, -1)
    by_factor = _D.MultivariateNormal(torch.tanh(out), scale_tril=tril)
    by_covariance = _D.MultivariateNormal(out.detach() * 0, covariance_matrix=tril @ tril.mT)
    return -(by_factor.log_prob(y).mean() + by_covariance.log_prob(y).mean())


@pytest.mark.parametrize("loss_fn", [_beta_policy, _dirichlet, _counts_and_rates,
                                     _multivariate_normal],
                         ids=["beta", "dirichlet", "gamma-poisson-student-t",
                              "multivariate-normal"])
def test_distribution_log_probs_train_like_eager_without_host_round_trips(xla, loss_fn):
    """``lgamma``, ``digamma`` and ``polygamma(1, x)`` (Beta's entropy, backward) have no
    lowering, nor ``linalg_cholesky_ex`` and ``linalg_solve_triangular``: 7-13 host
    transfers a step before ``rewrites.special_functions`` and
    ``rewrites.triangular_solvers``."""
    _check(xla, _Between(torch.tanh), loss_fn)


class _Bags(torch.nn.Module):
    """An ``EmbeddingBag`` over rows picked by the input's magnitudes, in five bags of
    uneven sizes (one empty), then a Linear; a sum weighted per sample by the input."""

    def __init__(self, mode: str, padding_idx: int | None) -> None:
        super().__init__()
        self.mode = mode
        self.bag = torch.nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx)
        self.outer = torch.nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = (x.abs() * 4).long().clamp(max=9).flatten()
        n = index.numel()
        offsets = torch.tensor([0, n // 6, n // 6, n // 3, 3 * n // 4], device=x.device)
        weights = torch.sigmoid(x).flatten() if self.mode == "sum" else None
        pooled = self.bag(index, offsets, per_sample_weights=weights)
        return self.outer(torch.tanh(pooled).flatten()).expand(x.shape[0], 3)


@pytest.mark.parametrize(("mode", "padding_idx"), [("sum", None), ("mean", 0), ("max", None)])
def test_an_embedding_bag_trains_like_eager_without_host_round_trips(xla, mode, padding_idx):
    """torch_xla has no lowering for ``_embedding_bag`` nor its backward: 9-11 host
    transfers a step before."""
    _check(xla, _Bags(mode, padding_idx))


def _padded_labels(y: torch.Tensor) -> torch.Tensor:
    """Up to three class labels per sample, with -1 ending them where ``y > 0.6``."""
    return torch.where(y > 0.6, -1, (y.abs() * 2).long().clamp(max=2))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multilabel_margin_loss_with_padded_targets_trains_like_eager(xla, reduction):
    """torch 2.9's decomposition counts the slots after the first -1 as class 0: the loss
    and the gradient were wrong for every padded target (pytorch/pytorch#141017)."""
    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.multilabel_margin_loss(out, _padded_labels(y), reduction=reduction)
        return loss.mean() + F.multilabel_margin_loss(out[0], _padded_labels(y[0]))

    _check(xla, _Between(torch.tanh), loss_fn)


def _spectral_magnitude(magnitude: Callable[[torch.Tensor], torch.Tensor]
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A spectrum's magnitude, as spectral layers and losses take it; the rows of zeros
    give bins of magnitude 0, where the gradient must be 0 as in eager."""
    def op(h: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([h, torch.zeros_like(h)], dim=0)
        return magnitude(torch.fft.rfft(torch.tanh(rows), norm="ortho"))[: h.shape[0]]

    return op


@pytest.mark.parametrize("magnitude", [torch.Tensor.abs, torch.abs], ids=["method", "function"])
def test_the_magnitude_of_a_complex_tensor_trains_like_eager(xla, magnitude):
    """torch_xla's ``abs`` of a complex tensor is complex: the compile failed ("Invalid
    type for NanValue (C64)"). The FFT itself runs on the host (torch_xla's fallback),
    so host transfers are not counted here."""
    torch.manual_seed(0)
    model = _Between(_spectral_magnitude(magnitude))
    model(torch.zeros(1, 6))
    model, reference = twin(model, xla)
    want, _ = _train(reference, F.mse_loss, "cpu", compiled=False)
    got, window = _train(model, F.mse_loss, xla, compiled=True, measured=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_same_state(model, reference, rtol=1e-4)
    assert window.counts.compiles == 0, window.counts


def test_the_ops_that_lost_their_gradient_are_found_on_the_dispatcher():
    """torch_xla 2.9 registers XLA kernels with no autograd kernel for these composite
    ops; should a torch_xla release add one, the op leaves the list."""
    names = {str(op) for op in lowering_gaps.ungraded_ops()}
    assert {"aten.kl_div.default", "aten.std.dim", "aten.diag.default",
            "aten.selu.default"} <= names
    assert not any(".out" in n or n.startswith("aten._") for n in names), names


def test_ops_decomposed_for_want_of_a_lowering_have_no_xla_kernel():
    """Once torch_xla lowers one, its decomposition should go. (Huber loss's backward
    has a composite kernel, which calls its out= variant, which falls back.)"""
    for packet in lowering_gaps.DECOMPOSED_FOR_LOWERING:
        for name in packet.overloads():
            op = getattr(packet, name)
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "XLA"), op


@pytest.mark.parametrize("repair", ["ungraded_ops", "DIFFERENTIATED_AS_DECOMPOSED",
                                    "REDEFINED_AUTOGRAD"])
def test_the_aot_cache_key_names_the_ops_given_their_composite_autograd(xla, monkeypatch,
                                                                        repair):
    """A cache written before the repair holds graphs without those gradients."""
    gm = torch.fx.symbolic_trace(lambda x: torch.std(x, 0))
    inputs = [torch.randn(4, 3, device=xla)]
    key = aot_cache.aot_key(gm, inputs, {}).digest
    monkeypatch.setattr(aot_cache, repair, (lambda: ()) if repair == "ungraded_ops" else ())
    assert aot_cache.aot_key(gm, inputs, {}).digest != key


@pytest.mark.parametrize(("pool", "shape", "kwargs"), [
    (F.avg_pool2d, (2, 3, 9, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                      count_include_pad=False, divisor_override=2)),
    (F.avg_pool2d, (2, 3, 9, 7), dict(kernel_size=(4, 3), stride=(2, 3), padding=(2, 1),
                                      count_include_pad=False, divisor_override=5)),
    (F.avg_pool2d, (2, 3, 8, 8), dict(kernel_size=2)),  # stride and the rest by default
    (F.avg_pool3d, (1, 2, 5, 5, 5), dict(kernel_size=(2, 3, 4), stride=(1, 2, 2),
                                         padding=(0, 1, 2), ceil_mode=True, divisor_override=3)),
], ids=["2d-ceil", "2d", "2d-defaults", "3d-ceil"])
def test_avg_pool_with_a_divisor_override_matches_eager(xla, pool, shape, kwargs):
    """torch_xla's lowering ignores the override; its backward runs on the host."""
    x = torch.randn(shape)
    weight = torch.randn(shape[1], requires_grad=True)

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale = w.view(-1, *[1] * (x.dim() - 2))
        return pool(x * scale, **kwargs)

    want = forward(x, weight)
    want.square().sum().backward()
    w = weight.detach().to(xla).requires_grad_()
    got = torch.compile(forward, backend="syncfree_xla")(x.to(xla), w)
    got.square().sum().backward()
    torch.testing.assert_close(got.cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.cpu(), weight.grad, rtol=1e-4, atol=1e-5)
