"""A corral fleet: one node replica per host on Ray Serve, routed by what each node reports."""
