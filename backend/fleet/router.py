"""The fleet's request router (Ray Serve's custom RequestRouter): nodes ranked by `rank()` over
what each replica last reported, the least busy first within a rank.

Reports refresh every `stats_period_s` (under a second), so between two reports a burst for a
cold model would see every node as free and load it everywhere. The router therefore also
remembers where it sent each model lately (`Routed`) and, until that node's report shows the
model, counts it as loading there: a burst lands on one node, as the manager there makes it
one load.

A request names its model in `multiplexed_model_id` (Ray's field for exactly that; the replicas
never use Ray's multiplexing) or a node in the `node` keyword (an operator's action on a chosen
node). One with neither, or a model no report knows yet, goes to the least busy replica, whose
backend then answers (a model no catalog has is its ModelNotFound)."""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .ranking import SERVING, NodeReport, Routed, rank


class CorralRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._routed = Routed()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # all ranks full: wait, do not spin
        now = time.monotonic()
        reports = [(self._routed.overlay(NodeReport.from_stats(replica.routing_stats or {}), now), replica)
                   for replica in candidate_replicas]
        node = pending_request.kwargs.get("node")
        if node:
            return [[replica for report, replica in reports if report.node == node]]
        model = pending_request.metadata.multiplexed_model_id
        groups = rank([report for report, _ in reports], model) if model else []
        if not groups:  # nowhere with room: those that have the model say why (their budget), else anyone
            having = [pair for pair in reports if model in pair[0].catalog] or reports
            return [[replica for _, replica in sorted(having, key=lambda pair: pair[0].ongoing)]]
        replica_of = {id(report): replica for report, replica in reports}
        if groups[0][0].loaded.get(model) in SERVING:  # Ray takes the least busy of those that have it
            return [[replica_of[id(report)] for report in group] for group in groups]
        # Nowhere ready: one node at a time, so the load goes where it is remembered to go.
        order = [report for group in groups for report in group]
        self._routed.sent(order[0].node, model, now)
        return [[replica_of[id(report)]] for report in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Where the request went, if not where `choose_replicas` expected (that node was full)."""
        model = pending_request.metadata.multiplexed_model_id
        replica = self.curr_replicas.get(replica_id)
        if model and replica is not None and replica.routing_stats:
            self._routed.sent(NodeReport.from_stats(replica.routing_stats).node, model, time.monotonic())
