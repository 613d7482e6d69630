"""The fleet as a Ray Serve application: the node deployment (one replica per host, routed by
`CorralRouter`) behind an ingress that serves corral's HTTP app over a `FleetBackend`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from .client import Fleet, FleetBackend
from .node import NodeReplica
from .registry import registry_actor
from .router import CorralRouter
from .settings import FleetSettings

STATS_TIMEOUT_S = 5.0


@serve.ingress()
class Ingress:
    """corral's HTTP app (every dialect, the admin API, the key check) on the fleet."""

    def __init__(self, nodes: Any, fleet: dict[str, Any]) -> None:
        self.settings = FleetSettings.model_validate(fleet)
        self.backend = FleetBackend(Fleet(self.settings.app, handle=nodes, registry=self.settings.registry))

    def __serve_build_asgi_app__(self) -> Any:
        from ..server.app import create_app

        return create_app(self.backend, api_key=self.settings.api_key)


def application(fleet: FleetSettings) -> Any:
    """The bound application: `serve.run` it on a cluster whose hosts offer the node resources."""
    data = fleet.model_dump(mode="json")
    nodes = serve.deployment(NodeReplica, name="node").options(
        num_replicas=len(fleet.nodes),
        max_ongoing_requests=fleet.node_limit(),
        ray_actor_options={"num_cpus": fleet.num_cpus, "num_gpus": fleet.num_gpus,
                           "resources": {fleet.node_resource: 1}},
        request_router_config=RequestRouterConfig(request_router_class=CorralRouter,
                                                  request_routing_stats_period_s=fleet.stats_period_s,
                                                  request_routing_stats_timeout_s=STATS_TIMEOUT_S),
        graceful_shutdown_timeout_s=30,
    )
    ingress = serve.deployment(Ingress, name="ingress").options(num_replicas=1, max_ongoing_requests=10_000)
    return ingress.bind(nodes.bind(data), data)


def up(fleet: FleetSettings, *, blocking: bool = False) -> None:
    """Start (or update) the fleet on the Ray cluster this process is connected to."""
    from ray.serve.config import HTTPOptions

    registry_actor(fleet.registry, create=True)
    serve.start(http_options=HTTPOptions(host=fleet.host, port=fleet.port))
    serve.run(application(fleet), name=fleet.app, route_prefix=fleet.route_prefix, blocking=blocking)
