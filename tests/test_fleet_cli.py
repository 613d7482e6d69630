"""The fleet's commands and files without a cluster: what Ray's absence says, fleet.toml's
errors, and the fleet view's imports (neither Ray nor llama_cpp)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from corral.backend.errors import ConfigError
from corral.backend.fleet.settings import FleetSettings, fleet_from_dict, read_fleet
from corral.console.cli import main
from support import write_config

NODES = [{"name": "a", "config": "/etc/corral/a.toml", "resource": "corral_node_a"},
         {"name": "b", "config": "/etc/corral/b.toml", "resource": "corral_node_b"}]


@pytest.mark.parametrize("argv", [["fleet"], ["fleet", "up", "--config", "fleet.toml"], ["attach", "ray://h:10001"]])
def test_without_ray_the_fleet_commands_say_how_to_install_it(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(argv) == 1
    assert "pip install 'corral[ray]'" in capsys.readouterr().err


def test_fleet_file_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resource must differ between nodes: corral_node_a"):
        fleet_from_dict({"nodes": [NODES[0], {**NODES[1], "resource": "corral_node_a"}]})
    with pytest.raises(ConfigError, match="fleet.toml: port"):
        fleet_from_dict({"fleet": {"port": 0}, "nodes": NODES})
    with pytest.raises(ConfigError, match="unknown table 'node'"):
        fleet_from_dict({"node": NODES})
    with pytest.raises(ConfigError, match="no such fleet file"):
        read_fleet(tmp_path / "missing.toml")


def test_max_ongoing_requests_follows_the_nodes_slots_and_queues(tmp_path: Path) -> None:
    small = write_config(tmp_path / "small.toml", {"defaults": {"n_parallel": 2, "max_queue": 6},
                                                   "budgets": {"max_loaded": 2}})
    big = write_config(tmp_path / "big.toml", {"defaults": {"n_parallel": 4, "max_queue": 8},
                                               "models": [{"name": "x", "path": "/m/x.gguf", "n_parallel": 8}],
                                               "budgets": {"max_loaded": 3}})
    fleet = FleetSettings.model_validate({"nodes": [{**NODES[0], "config": str(small)},
                                                    {**NODES[1], "config": str(big)}]})
    assert fleet.node_limit() == 3 * (8 + 8)  # the larger node: 3 models of 8 slots and a queue of 8
    assert FleetSettings.model_validate({"max_ongoing_requests": 7, "nodes": NODES}).node_limit() == 7


def test_the_fleet_view_imports_neither_ray_nor_llama_cpp() -> None:
    code = ("import sys, corral.console.screens.fleet, corral.console.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'llama_cpp'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_readme_fleet_file_is_valid() -> None:
    import re
    import tomllib

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    example = next(block for block in re.findall(r"```toml\n(.*?)```", text, re.S) if "[[nodes]]" in block)
    fleet = fleet_from_dict(tomllib.loads(example))
    assert [n.name for n in fleet.nodes] == ["gpu1", "gpu2"] and fleet.registry == "corral-registry"
