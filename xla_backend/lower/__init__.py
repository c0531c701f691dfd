"""Stage 3: an aten graph to XLA HLO, no execution.

``split`` separates host work from device work (pure FX), ``executable`` is the data model
a trace and a cached entry share, ``trace`` runs a graph on stand-in buffers and exports
its HLO.
"""
