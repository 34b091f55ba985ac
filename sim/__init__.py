"""A simulator of the disaggregated cluster at GPU scale: the engine's own scheduler, KV cache
manager, data-parallel rank choice, replica choice, router service and rebalancing state machine,
priced by a cost model instead of run. Built from the pure parts of `engine` and `router` only
(no Ray, no torch.distributed; `lint-imports` holds it to that).

`simulate(SimConfig(...), make_workload(...))` runs a workload; `python -m sim run ...` does the
same from the command line; `python -m bench.sim_compare ...` checks the simulator against a
real CPU `ClusterEngine`. See docs/simulator.md.
"""
