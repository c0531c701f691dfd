"""FX rewrites of aten graphs around torch_xla lowerings that disagree with eager PyTorch.

Each rewrite is a :class:`passes.GraphPass` over the aten graph AOTAutograd hands the
backend, and replaces a pattern whose torch_xla lowering gives other dtypes or values
than eager, or that torch_xla sends to its CPU fallback, with an equivalent that lowers
correctly, read off ``node.meta["val"]``.
They import torch only; they live here, not in ``passes/``, because which patterns need
them is a fact about torch_xla. Each module documents the bug it steps around.
"""

from __future__ import annotations

from passes.base import GraphPass

from .batch_norm_stats import CENTERED_BATCH_NORM, UNBIASED_RUNNING_VAR
from .batched_svd import BATCHED_SVD
from .complex_abs import COMPLEX_ABS
from .low_precision_norms import LOW_PRECISION_NORMS
from .nan_semantics import NAN_SEMANTICS
from .scalar_doubles import SCALAR_DOUBLES
from .scaled_addmm import SCALED_ADDMM
from .small_conv import SMALL_CONV_AS_MATMUL
from .triangular_solvers import TRIANGULAR_SOLVERS
from .type_promotion import promote_dtypes
from .zero_dim import unsqueeze_0d_dims, zeros_for_empty_inputs

#: Rewrites run on every aten graph, in this order, before lowering; part of the
#: graph-cache key through their names and versions. Promotion runs before the NaN
#: rewrite, so that clamp's operands already share one dtype there; batch norm widens
#: to float32 before its running variance is recomputed, so that runs in float32 too.
ATEN_REWRITES: tuple[GraphPass, ...] = (
    SCALED_ADDMM,
    BATCHED_SVD,
    TRIANGULAR_SOLVERS,
    zeros_for_empty_inputs,
    unsqueeze_0d_dims,
    promote_dtypes,
    NAN_SEMANTICS,
    LOW_PRECISION_NORMS,
    CENTERED_BATCH_NORM,
    UNBIASED_RUNNING_VAR,
    SCALAR_DOUBLES,
)

#: Rewrites of Dynamo graphs (before AOTAutograd, so the backward follows them) around a
#: torch_xla op that fails for a whole dtype; on every client.
DYNAMO_REWRITES: tuple[GraphPass, ...] = (COMPLEX_ABS,)

#: Rewrites of Dynamo graphs (before AOTAutograd, so the backward follows them) that pay
#: on torch_xla's CPU client only: patterns XLA:CPU runs far slower than eager does.
#: TPU graphs keep torch_xla's lowering. The device kind is in the cache key.
CPU_DYNAMO_REWRITES: tuple[GraphPass, ...] = (SMALL_CONV_AS_MATMUL,)

__all__ = ["ATEN_REWRITES", "CPU_DYNAMO_REWRITES", "DYNAMO_REWRITES"]
