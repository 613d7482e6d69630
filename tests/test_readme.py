"""The README's Quick start is the contract with a new user and with CI: keep them in step."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "the Quick start needs a code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_exactly_two_commands_install_run_and_install_test() -> None:
    install_run, install_test = quick_start()
    assert "pip install" in install_run and install_run.endswith("corral")
    assert "pip install" in install_test and "[test]" in install_test and install_test.endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert quick_start()[1] in ci


def test_readme_documents_every_console_key() -> None:
    from corral.console.commands import COMMANDS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in COMMANDS:
        key = "?" if command.key == "question_mark" else command.key
        assert f"| `{key}` |" in text, f"README lacks the key {key} ({command.id})"


def test_the_config_example_is_valid() -> None:
    import tomllib

    from corral.backend.config import settings_from_dict

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```toml\n(.*?)```", text, re.S)
    assert example, "README lacks the config example"
    settings = settings_from_dict(tomllib.loads(example.group(1)))
    assert settings.models[0].name == "qwen" and settings.server.port == 8377
