"""Stage 5: compiling and running lowered graphs.

``compile_pool`` compiles off the calling thread, ``graph`` replays a compiled graph (the
hot path), ``partition`` runs a graph with ops torch_xla cannot lower as XLA segments and
eager ops, ``rng_state`` carries the device RNG, ``device_loader`` feeds input batches,
``host_memory`` sets glibc up for the CPU client's buffers.
"""
