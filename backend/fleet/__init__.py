"""A corral fleet on Ray Serve: corral owns loading and eviction on each node, Ray owns the
processes, placement, routing hooks and transport.

ranking.py (which node should take a request for a model) is pure Python and imports without
Ray, so routing is tested on fake node reports and the fleet simulation
(tests/benchmarks/fleet_sim.py) drives the very code the router runs.
"""
