"""The masked twin a GradScaler step runs: updates undone where ``skip`` is set.

No XLA: the graphs are traced on meta tensors and run on CPU ones.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from xla_backend.lower.split import masked, split


def _step(p, q, g):
    """Two in-place updates; ``q``'s new value is also the graph's output."""
    new_p = p - g * 0.5
    new_q = q * 0.5 + g
    p.copy_(new_p)
    q.copy_(new_q)
    return (new_q,)


def _twin():
    gm = make_fx(_step, tracing_mode="fake")(*[torch.empty(3, device="meta") for _ in range(3)])
    plain = split(gm)
    return plain, masked(plain, 3)


def _outputs(gm: torch.fx.GraphModule) -> tuple:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def test_masked_values_take_the_update_slots_a_user_output_does_not_hold():
    plain, twin = _twin()
    # p's update was an output of its own: its masked value takes that slot; q's is
    # also the user's output, which stays unmasked, so its masked value is added
    assert len(_outputs(twin.device)) == len(_outputs(plain.device)) + 1
    assert twin.device_mutations[0] == plain.device_mutations[0]
    assert twin.device_mutations[1] == len(_outputs(plain.device))
    assert twin.outputs == plain.outputs


def test_masked_updates_keep_the_old_values_where_skip_is_set():
    _, twin = _twin()
    p, q, g = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]), torch.ones(3)
    for skip, want_p, want_q in ((True, p, q), (False, p - 0.5, q * 0.5 + 1)):
        out = twin.device(p.clone(), q.clone(), g, torch.tensor(skip))
        assert torch.equal(out[twin.device_mutations[0]], want_p)
        assert torch.equal(out[twin.device_mutations[1]], want_q)
        assert torch.equal(out[twin.outputs[0].index], q * 0.5 + 1)  # the user's, unmasked
