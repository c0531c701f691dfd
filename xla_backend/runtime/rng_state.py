"""Feeds each compiled graph a fresh random seed without a host round trip.

``passes.rng`` turns a graph's random ops into functions of a trailing int64 seed
input and appends ``seed + 1`` to its outputs. This module owns that seed: one
device tensor per device, handed to every seeded call and replaced by the call's
own output, so consecutive steps draw different numbers and nothing is read back.
A new ``torch.manual_seed`` value re-derives it, so seeded runs repeat.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
import torch.fx

from passes.rng import functionalize_rng

_lock = threading.Lock()
_seeds: dict[str, torch.Tensor] = {}
_derived_from: dict[str, int] = {}


def functionalize(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, bool]:
    result = functionalize_rng(gm)
    return result.graph_module, result.modified


def example_seed(gm: torch.fx.GraphModule) -> torch.Tensor:
    """An example value for the seed input the pass added (its fake value when traced)."""
    seed = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    value = seed.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value
    return torch.empty((), dtype=torch.int64, device="xla")


def _current_seed(device: torch.device) -> torch.Tensor:
    key = str(device)
    initial = torch.initial_seed()
    seed = _seeds.get(key)
    if seed is None or _derived_from.get(key) != initial:
        generator = torch.Generator().manual_seed(initial)
        value = torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64)
        seed = value.to(device)
        _seeds[key] = seed
        _derived_from[key] = initial
    return seed


class SeededCall:
    """Wraps a compiled graph whose last input is the seed and last output the next seed."""

    def __init__(self, compiled: Callable[[list[Any]], Any], device: torch.device) -> None:
        self._compiled = compiled
        self._device = device

    def __call__(self, args: list[Any]) -> Any:
        with _lock:
            seed = _current_seed(self._device)
            outs = self._compiled([*args, seed])
            _seeds[str(self._device)] = outs[-1]
        return outs[:-1] if isinstance(outs, list) else type(outs)(outs[:-1])
