"""Stage 1: what Dynamo decides before the backend sees a graph, for our frames only.

``scope`` puts our Dynamo settings and the branch-free GradScaler step in force while a
``syncfree_xla`` frame runs; ``step_counters`` keeps optimizer step counters on the
device; ``interrupts`` keeps a Ctrl-C that lands in one of Dynamo's Python guards from
being lost.
"""
