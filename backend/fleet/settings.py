"""fleet.toml: which hosts are corral nodes, each one's own corral config, and how the fleet
listens. Read by `corral fleet up` and shipped to every replica, so a node needs no file of the
fleet's, only its own config."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import Settings, load_settings
from ..errors import ConfigError

REGISTRY_SUFFIX = "-registry"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Strict):
    """One host of the fleet."""

    name: str = Field(min_length=1, max_length=64)
    config: str = Field(description="the corral config file on that host (its models, budgets, slots)")
    resource: str = Field(min_length=1, description="a custom resource only this host offers "
                                                     "(`ray start --resources`): how a replica knows its host")


class FleetSettings(_Strict):
    """The `[fleet]` table and its `[[nodes]]`."""

    app: str = Field("corral", min_length=1, description="the Serve application's name")
    host: str = Field("127.0.0.1", description="where Ray Serve's HTTP proxy listens")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    api_key: str | None = Field(None, min_length=8, description="Bearer key the ingress checks "
                                                                "(default: $CORRAL_API_KEY)")
    node_resource: str = Field("corral_node", min_length=1, description="a custom resource every corral host "
                                                                         "offers one of: one node replica per host")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each node replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each node replica")
    max_ongoing_requests: int | None = Field(None, ge=1, description="per node (default: from the node "
                                                                     "configs' slots and queues)")
    stats_period_s: float = Field(0.5, gt=0, le=1.0, description="how often routing stats refresh")
    nodes: tuple[NodeSettings, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> FleetSettings:
        for what in ("name", "resource"):
            values = [getattr(n, what) for n in self.nodes]
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"[[nodes]] {what} must differ between nodes: {', '.join(twice)} is used twice")
        return self

    @property
    def registry(self) -> str:
        """The named actor that keeps every node's snapshot."""
        return self.app + REGISTRY_SUFFIX

    def node_limit(self) -> int:
        """max_ongoing_requests of a node replica: as given, else what the largest node config
        admits at once (every loaded model's slots and queue); a config this host cannot read
        counts with corral's defaults."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return max(_admits(_node_config(node)) for node in self.nodes)


def _node_config(node: NodeSettings) -> Settings:
    path = Path(node.config).expanduser()
    return load_settings(path) if path.is_file() else Settings()


def _admits(settings: Settings) -> int:
    """Requests one node takes before it refuses: per loaded model its slots plus its queue."""
    per_model = [settings.defaults.n_parallel + settings.defaults.max_queue]
    per_model += [(m.n_parallel or settings.defaults.n_parallel) + (m.max_queue if m.max_queue is not None
                                                                    else settings.defaults.max_queue)
                  for m in settings.models]
    return settings.budgets.max_loaded * max(per_model)


def fleet_from_dict(data: dict[str, Any], source: str = "fleet.toml") -> FleetSettings:
    values = {**data.get("fleet", {}), "nodes": data.get("nodes", [])}
    unknown = sorted(set(data) - {"fleet", "nodes"})
    if unknown:
        raise ConfigError(f"{source}: unknown table {unknown[0]!r}; a fleet file has [fleet] and [[nodes]]")
    if not values.get("api_key") and os.environ.get("CORRAL_API_KEY"):
        values["api_key"] = os.environ["CORRAL_API_KEY"]
    try:
        return FleetSettings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError("; ".join(f"{source}: {'.'.join(str(p) for p in e['loc']) or 'fleet'}: "
                                    f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None


def read_fleet(path: str | os.PathLike[str]) -> FleetSettings:
    file = Path(path).expanduser()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such fleet file; see README, 'Fleet (Ray Serve)', for its format") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return fleet_from_dict(data, str(file))
