"""A simulator of the disaggregated cluster at GPU scale: the engine's own scheduler, KV cache
manager, replica choice and router service, priced by a cost model instead of run.

`simulate(SimConfig(...), make_workload(...))` runs a workload; `python -m cluster.sim run ...`
does the same from the command line; `python -m cluster.sim compare ...` checks the simulator
against a real CPU `ClusterEngine`. See docs/simulator.md.
"""
