"""The fleet's request router (Ray Serve's custom RequestRouter): nodes ranked by `rank()` over
what each replica last reported, the least busy first within a rank.

Reports refresh every `stats_period_s` (under a second), so between two reports a burst for a
cold model would see every node as free and load it everywhere. The router therefore also
remembers where it sent each model lately and, until that node's report shows the model, counts
it as loading there: a burst lands on one node, as the manager there makes it one load.

A request names its model in `multiplexed_model_id` (Ray's field for exactly that; the replicas
never use Ray's multiplexing) or a node in the `node` keyword (an operator's action on a chosen
node). One with neither, or a model no report knows yet, goes to the least busy replica, whose
backend then answers (a model no catalog has is its ModelNotFound)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .ranking import SERVING, NodeReport, rank

ROUTED_MEMORY_S = 5.0  # a report older than this has seen the request arrive


class CorralRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._routed: dict[tuple[ReplicaID, str], float] = {}  # (replica, model) -> when sent, monotonic

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # all ranks full: wait, do not spin
        reports = [(self._report(replica), replica) for replica in candidate_replicas]
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
        order = [replica_of[id(report)] for group in groups for report in group]
        self._routed[(order[0].replica_id, model)] = time.monotonic()
        return [[replica] for replica in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        model = pending_request.metadata.multiplexed_model_id
        if model:
            self._routed[(replica_id, model)] = time.monotonic()

    def _report(self, replica: RunningReplica) -> NodeReport:
        """The replica's last report, with the models sent there since as loading."""
        report = NodeReport.from_stats(replica.routing_stats or {})
        now = time.monotonic()
        for (replica_id, model), sent in list(self._routed.items()):
            if replica_id != replica.replica_id:
                continue
            if model in report.loaded or now - sent > ROUTED_MEMORY_S:
                del self._routed[(replica_id, model)]
            elif model in report.catalog:
                report = dataclasses.replace(report, loaded={**report.loaded, model: "loading"},
                                             used_bytes=report.used_bytes + report.catalog[model])
        return report
