"""The optional PNG chart of a run (``--plot``): step time relative to eager, per cell.

Apart from the text report because it needs matplotlib, which is an optional extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .report import eager_times
from .spec import CellResult


def matplotlib_available() -> bool:
    """Whether ``--plot`` can work: matplotlib is installed (it is not imported here)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plot(results: Sequence[CellResult], path: str | os.PathLike[str]) -> None:
    """A PNG bar chart: steady step time relative to eager, per (model, loop), log scale.

    Cells without a figure (failed, skipped, or no eager to compare with) are marked
    with a label instead of a bar, so a missing bar never reads as "fast".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eager = eager_times(results)
    groups = list(dict.fromkeys((r.model, r.loop) for r in results))
    backends = list(dict.fromkeys(r.backend for r in results))
    by_cell = {(r.model, r.loop, r.backend): r for r in results}
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.5))
    for j, backend in enumerate(backends):
        xs, ys = [], []
        for i, (model, loop) in enumerate(groups):
            r = by_cell.get((model, loop, backend))
            x = i + (j - (len(backends) - 1) / 2) * width
            base = eager.get((model, loop))
            if r is not None and r.ok and base and r.steady_ms:
                xs.append(x)
                ys.append(r.steady_ms / base)
            elif r is not None:
                label = r.status if not r.ok else "no eager"
                ax.text(x, 1.0, label, rotation=90, ha="center", va="bottom", fontsize=7,
                        color="dimgray")
        bars = ax.bar(xs, ys, width, label=backend)
        for bar, y in zip(bars, ys):
            ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.2f}", ha="center",
                    va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\nloop {lp}" for m, lp in groups], fontsize=8)
    ax.set_ylabel("steady step time / eager (lower is faster)")
    ax.set_title("Steady step time relative to eager CPU")
    ax.legend(fontsize=8, ncol=min(len(backends), 5))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
