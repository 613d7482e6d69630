"""Settings: sizes and durations, the TOML file, CORRAL_* environment, overrides, validation messages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from corral.backend.config import (
    Budgets,
    ModelDefaults,
    Settings,
    load_settings,
    parse_bytes,
    parse_duration,
    settings_from_dict,
)
from corral.backend.errors import ConfigError, CorralError
from support import write_config

GiB = 2**30

# --- parse_bytes / parse_duration -----------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("8GiB", 8 * GiB),
    ("8gib", 8 * GiB),
    ("512 MB", 512 * 10**6),
    ("512MiB", 512 * 2**20),
    ("1.5GiB", int(1.5 * GiB)),
    ("0.5 KiB", 512),
    ("2TiB", 2 * 2**40),
    ("3g", 3 * 10**9),
    ("10k", 10_000),
    ("64kb", 64_000),
    ("100b", 100),
    ("1073741824", GiB),
    ("  7 GB  ", 7 * 10**9),
    (1073741824, GiB),
    (0, 0),
    (2.0, 2),
])
def test_parse_bytes_accepts_documented_forms(text: Any, expected: int) -> None:
    assert parse_bytes(text) == expected
    assert isinstance(parse_bytes(text), int)


@pytest.mark.parametrize("garbage", ["lots", "", "GiB", "8 XB", "8 GiB extra", "1,5GiB", "-8GiB", "8..5GB",
                                     None, True, False, [8], "8 gigabytes"])
def test_parse_bytes_rejects_garbage(garbage: Any) -> None:
    with pytest.raises(ValueError):
        parse_bytes(garbage)


def test_parse_bytes_message_shows_the_value_and_an_example() -> None:
    with pytest.raises(ValueError) as info:
        parse_bytes("lots")
    assert "'lots'" in str(info.value) and "8GiB" in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", 30.0),
    ("5m", 300.0),
    ("5M", 300.0),
    ("1h", 3600.0),
    ("2d", 172800.0),
    ("250ms", 0.25),
    ("1h30m", 5400.0),  # Go's form, as ollama's clients send keep_alive
    ("5m0s", 300.0),
    ("1.5h", 5400.0),
    (" 10 s ", 10.0),
    ("90", 90.0),
    ("-1", -1.0),
    (90, 90.0),
    (2.5, 2.5),
    (-1, -1.0),
    (0, 0.0),
])
def test_parse_duration_accepts_documented_forms(text: Any, expected: float) -> None:
    result = parse_duration(text)
    assert result == pytest.approx(expected)
    assert isinstance(result, float)


@pytest.mark.parametrize("garbage", ["soon", "", "m", "5 minutes", "5y", "1h 30", "five", "--1", "5m m",
                                     None, True, [5]])
def test_parse_duration_rejects_garbage(garbage: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(garbage)


# --- settings_from_dict ---------------------------------------------------------------------


def test_defaults_without_any_data() -> None:
    settings = settings_from_dict({})
    assert settings == Settings()
    assert settings.include_default_model is True
    assert settings.defaults == ModelDefaults()
    assert settings.budgets == Budgets()
    assert settings.models == [] and settings.model_dirs == [] and settings.preload == []


def test_config_error_is_a_corral_error_with_http_400() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"nope": 1})
    assert isinstance(info.value, CorralError)
    assert info.value.http_status == 400
    assert info.value.message == str(info.value)


@pytest.mark.parametrize(("data", "key"), [
    ({"modle_dirs": ["/m"]}, "modle_dirs"),
    ({"defaults": {"nctx": 2048}}, "defaults.nctx"),
    ({"budgets": {"ram": "8GiB"}}, "budgets.ram"),
    ({"models": [{"name": "a", "path": "/a.gguf", "colour": "red"}]}, "models.0.colour"),
    ({"console": {"colour": "red"}}, "console.colour"),
])
def test_unknown_key_is_named(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(data, source="my.toml")
    message = str(info.value)
    assert message.startswith("my.toml: ")
    assert key in message
    assert "unknown" in message


@pytest.mark.parametrize(("data", "key", "value", "rule"), [
    ({"defaults": {"n_parallel": 0}}, "defaults.n_parallel", "0", "greater than or equal to 1"),
    ({"defaults": {"n_ctx": 10}}, "defaults.n_ctx", "10", "greater than or equal to 64"),
    ({"defaults": {"n_gpu_layers": -2}}, "defaults.n_gpu_layers", "-2", "greater than or equal to -1"),
    ({"defaults": {"n_gpu_layers": "most"}}, "defaults.n_gpu_layers", "'most'", 'must be "auto" or a whole number'),
    ({"budgets": {"vram_fraction": 1.5}}, "budgets.vram_fraction", "1.5", "less than or equal to 1"),
    ({"budgets": {"vram_bytes": "lots"}}, "budgets.vram_bytes", "'lots'", "not a size"),
    ({"defaults": {"keep_alive": "soon"}}, "defaults.keep_alive", "'soon'", "not a duration"),
    ({"budgets": {"ram_bytes": "lots"}}, "budgets.ram_bytes", "'lots'", "not a size"),
    ({"budgets": {"max_loaded": "three"}}, "budgets.max_loaded", "'three'", "valid integer"),
    ({"budgets": {"ram_fraction": 1.5}}, "budgets.ram_fraction", "1.5", "less than or equal to 1"),
    ({"budgets": {"ram_fraction": 0}}, "budgets.ram_fraction", "0", "greater than 0"),
    ({"include_default_model": "maybe"}, "include_default_model", "'maybe'", "boolean"),
    ({"models": [{"name": "my model", "path": "/m.gguf"}]}, "models.0.name", "'my model'", "pattern"),
    ({"models": [{"name": "", "path": "/m.gguf"}]}, "models.0.name", "''", "at least 1 character"),
    ({"models": [{"name": "ok", "path": "/m.gguf"}, {"name": "x", "path": "/x", "n_parallel": 0}]},
     "models.1.n_parallel", "0", "greater than or equal to 1"),
    ({"console": {"theme": ""}}, "console.theme", "''", "at least 1 character"),
    ({"console": {"keymap": {"load": "L"}}}, "console.keymap", "{'load': 'L'}", "'load' is not a command id"),
    ({"console": {"keymap": {"corral.load": "a b"}}}, "console.keymap", "{'corral.load': 'a b'}",
     "corral.load = 'a b': give one or more key names"),
    ({"console": {"keymap": {"corral.load": 5}}}, "console.keymap.corral.load", "5", "valid string"),
])
def test_invalid_value_names_key_value_and_rule(data: dict[str, Any], key: str, value: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(data, source="conf.toml")
    message = str(info.value)
    assert message.startswith("conf.toml: ")
    assert f"{key} = {value}" in message
    assert rule in message


def test_missing_model_path_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"models": [{"name": "a"}]})
    assert "models.0.path" in str(info.value) and "required" in str(info.value)


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"defaults": {"n_parallel": 0}, "budgets": {"max_loaded": 0}})
    assert "defaults.n_parallel" in str(info.value) and "budgets.max_loaded" in str(info.value)


def test_duplicate_model_names_are_rejected() -> None:
    data = {"models": [{"name": "twin", "path": "/a.gguf"}, {"name": "twin", "path": "/b.gguf"}]}
    with pytest.raises(ConfigError) as info:
        settings_from_dict(data)
    assert "'twin'" in str(info.value)
    assert "twice" in str(info.value) and "unique" in str(info.value)


def test_valid_values_are_parsed() -> None:
    settings = settings_from_dict({
        "defaults": {"keep_alive": "10m", "n_parallel": 8},
        "budgets": {"ram_bytes": "8GiB", "drain_timeout": "1m", "max_loaded": 2},
        "models": [{"name": "qwen2.5:0.5b/instruct-Q4", "path": "/m/q.gguf", "keep_alive": -1}],
    })
    assert settings.defaults.keep_alive == 600.0
    assert settings.budgets.ram_bytes == 8 * GiB
    assert settings.budgets.drain_timeout == 60.0
    assert settings.models[0].keep_alive == -1.0
    assert settings.models[0].path == Path("/m/q.gguf")


def test_console_theme_and_keymap() -> None:
    console = settings_from_dict({"console": {"theme": "corral-light",
                                              "keymap": {"corral.load": "L", "corral.quit": "q, f10"}}}).console
    assert console.theme == "corral-light"
    assert console.keymap == {"corral.load": "L", "corral.quit": "q, f10"}
    assert settings_from_dict({}).console.keymap == {} and settings_from_dict({}).console.theme is None


def test_settings_are_frozen() -> None:
    settings = settings_from_dict({})
    with pytest.raises(Exception):
        settings.include_default_model = False  # type: ignore[misc]


# --- effective ------------------------------------------------------------------------------


def test_effective_merges_model_overrides_over_defaults() -> None:
    settings = settings_from_dict({
        "defaults": {"n_ctx": 2048, "n_parallel": 2, "keep_alive": "5m", "flash_attn": True, "chat_format": "chatml"},
        "models": [
            {"name": "big", "path": "/big.gguf", "n_ctx": 8192, "keep_alive": "1h", "flash_attn": False,
             "pinned": True, "chat_template": "{{ x }}"},
            {"name": "plain", "path": "/plain.gguf"},
        ],
    })
    big = settings.effective("big")
    assert isinstance(big, ModelDefaults)
    assert big.n_ctx == 8192
    assert big.keep_alive == 3600.0
    assert big.flash_attn is False  # an explicit false wins over the default's true
    assert big.n_parallel == 2  # not overridden: from defaults
    assert big.chat_format == "chatml"
    assert settings.effective("plain") == settings.defaults
    assert settings.effective("not-configured") == settings.defaults
    # the defaults themselves are untouched
    assert settings.defaults.n_ctx == 2048 and settings.defaults.flash_attn is True


def test_model_config_for() -> None:
    settings = settings_from_dict({"models": [{"name": "a", "path": "/a.gguf", "pinned": True}]})
    assert settings.model_config_for("a").pinned is True
    assert settings.model_config_for("b") is None


# --- paths ----------------------------------------------------------------------------------


def test_tilde_in_paths_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = settings_from_dict({
        "model_dirs": ["~/models", "/abs"],
        "models": [{"name": "a", "path": "~/weights/a.gguf"}],
    })
    assert settings.model_dirs == [tmp_path / "models", Path("/abs")]
    assert settings.models[0].path == tmp_path / "weights" / "a.gguf"


def test_tilde_in_config_path_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.toml").write_text("preload = ['x']\n")
    assert load_settings("~/c.toml", env={}).preload == ["x"]


# --- load_settings: files -------------------------------------------------------------------

VALID_TOML = """
model_dirs = ["{models}"]
include_default_model = false
preload = ["tiny"]

[defaults]
n_ctx = 2048
n_parallel = 2
keep_alive = "2m"

[budgets]
max_loaded = 2
ram_bytes = "4GiB"

[[models]]
name = "tiny"
path = "{models}/tiny.gguf"
n_parallel = 8
pinned = true

[[models]]
name = "other"
path = "/elsewhere/other.gguf"
chat_format = "chatml"
"""


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """An env for load_settings whose default config location is an empty folder, with the
    process environment pointed there too so no real ~/.config/corral/config.toml can leak in."""
    home = tmp_path / "home"
    xdg = tmp_path / "xdg"
    home.mkdir()
    xdg.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    for key in list(os.environ):
        if key.startswith("CORRAL_"):
            monkeypatch.delenv(key)
    return {"XDG_CONFIG_HOME": str(xdg)}


def test_valid_toml_file_loads(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    models = tmp_path / "models"
    path = write_config(tmp_path / "corral.toml", VALID_TOML.format(models=models))
    settings = load_settings(path, env=isolated_env)
    assert settings.model_dirs == [models]
    assert settings.include_default_model is False
    assert settings.preload == ["tiny"]
    assert settings.defaults.n_ctx == 2048 and settings.defaults.keep_alive == 120.0
    assert settings.budgets.max_loaded == 2 and settings.budgets.ram_bytes == 4 * GiB
    assert [m.name for m in settings.models] == ["tiny", "other"]
    assert settings.models[0].path == models / "tiny.gguf"
    assert settings.effective("tiny").n_parallel == 8
    assert settings.effective("other").chat_format == "chatml"
    assert settings.model_config_for("tiny").pinned is True


def test_str_path_works_too(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    path = write_config(tmp_path / "corral.toml", "include_default_model = false\n")
    assert load_settings(str(path), env=isolated_env).include_default_model is False


def test_file_errors_name_the_file(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    path = write_config(tmp_path / "mine.toml", "[defaults]\nn_parallel = 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=isolated_env)
    assert str(path) in str(info.value)
    assert "defaults.n_parallel = 0" in str(info.value)


def test_unknown_key_in_file(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    path = write_config(tmp_path / "corral.toml", "[budgets]\nmax_loded = 2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=isolated_env)
    assert "budgets.max_loded" in str(info.value) and "unknown" in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    path = write_config(tmp_path / "broken.toml", "[defaults\nn_ctx = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=isolated_env)
    assert "broken.toml" in str(info.value)
    assert "TOML" in str(info.value)


def test_explicit_missing_config_path_is_an_error(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    missing = tmp_path / "nowhere" / "corral.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing, env=isolated_env)
    assert str(missing) in str(info.value)
    assert "not found" in str(info.value)


def test_missing_file_named_by_corral_config_is_an_error(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    missing = tmp_path / "gone.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(env={**isolated_env, "CORRAL_CONFIG": str(missing)})
    assert str(missing) in str(info.value)


def test_corral_config_env_names_the_file(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    path = write_config(tmp_path / "corral.toml", "preload = ['a', 'b']\n")
    assert load_settings(env={**isolated_env, "CORRAL_CONFIG": str(path)}).preload == ["a", "b"]


def test_absent_default_config_is_fine(isolated_env: dict[str, str]) -> None:
    settings = load_settings(env=isolated_env)
    assert settings == Settings()


def test_default_config_location_follows_the_env_argument(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "corral").mkdir(parents=True)
    (elsewhere / "corral" / "config.toml").write_text("preload = ['from-env-xdg']\n")
    settings = load_settings(env={"XDG_CONFIG_HOME": str(elsewhere)})
    assert settings.preload == ["from-env-xdg"]


def test_default_config_location_is_read_when_present(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    xdg = Path(isolated_env["XDG_CONFIG_HOME"])
    (xdg / "corral").mkdir()
    (xdg / "corral" / "config.toml").write_text("preload = ['from-default']\n")
    assert load_settings(env=isolated_env).preload == ["from-default"]


# --- load_settings: environment and overrides -----------------------------------------------


def test_env_overrides(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    home = Path(os.environ["HOME"])
    env = {
        **isolated_env,
        "CORRAL_MODEL_DIRS": os.pathsep.join(["/models/a", "~/models/b", ""]),
        "CORRAL_MAX_LOADED": "5",
        "CORRAL_RAM_BUDGET": "12GiB",
        "CORRAL_KEEP_ALIVE": "90s",
        "CORRAL_PRELOAD": "alpha,beta,",
        "CORRAL_N_CTX": "1024",
        "CORRAL_N_PARALLEL": "3",
        "CORRAL_N_THREADS": "1",
    }
    settings = load_settings(env=env)
    assert settings.model_dirs == [Path("/models/a"), home / "models" / "b"]
    assert settings.budgets.max_loaded == 5
    assert settings.budgets.ram_bytes == 12 * GiB
    assert settings.defaults.keep_alive == 90.0
    assert settings.preload == ["alpha", "beta"]
    assert (settings.defaults.n_ctx, settings.defaults.n_parallel, settings.defaults.n_threads) == (1024, 3, 1)


def test_env_wins_over_file_and_overrides_win_over_env(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    path = write_config(tmp_path / "corral.toml",
                        "[budgets]\nmax_loaded = 2\nram_bytes = '1GiB'\n[defaults]\nn_ctx = 512\n")
    settings = load_settings(path, env={**isolated_env, "CORRAL_MAX_LOADED": "4"},
                             overrides={"budgets.ram_bytes": "3GiB"})
    assert settings.budgets.max_loaded == 4  # env over file
    assert settings.budgets.ram_bytes == 3 * GiB  # override over file
    assert settings.defaults.n_ctx == 512  # file kept where nothing else says
    settings = load_settings(path, env={**isolated_env, "CORRAL_MAX_LOADED": "4"},
                             overrides={"budgets.max_loaded": 7})
    assert settings.budgets.max_loaded == 7  # override over env


def test_env_does_not_touch_unrelated_keys_from_the_file(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    path = write_config(tmp_path / "corral.toml", "[budgets]\nram_fraction = 0.5\n")
    settings = load_settings(path, env={**isolated_env, "CORRAL_MAX_LOADED": "9"})
    assert settings.budgets.ram_fraction == 0.5 and settings.budgets.max_loaded == 9


def test_invalid_override_is_a_config_error(isolated_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=isolated_env, overrides={"defaults.n_parallel": 0})
    assert "defaults.n_parallel = 0" in str(info.value)


def test_os_environ_is_used_when_env_is_not_given(monkeypatch: pytest.MonkeyPatch,
                                                  isolated_env: dict[str, str]) -> None:
    monkeypatch.setenv("CORRAL_MAX_LOADED", "6")
    assert load_settings().budgets.max_loaded == 6


@pytest.mark.parametrize(("variable", "value"), [
    ("CORRAL_MAX_LOADED", "three"),
    ("CORRAL_N_CTX", "big"),
    ("CORRAL_N_PARALLEL", "1.5"),
])
def test_bad_env_value_names_the_variable(variable: str, value: str, isolated_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={**isolated_env, variable: value})
    assert variable in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(("variable", "value"), [
    ("CORRAL_RAM_BUDGET", "lots"),
    ("CORRAL_KEEP_ALIVE", "soon"),
    ("CORRAL_MAX_LOADED", "0"),
])
def test_bad_env_value_checked_at_validation_names_the_variable(variable: str, value: str,
                                                                isolated_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={**isolated_env, variable: value})
    assert variable in str(info.value)


def test_n_batch_smaller_than_n_parallel_is_refused_before_llama_cpp_aborts() -> None:
    with pytest.raises(ConfigError, match="n_batch = 4 is smaller than n_parallel = 8"):
        settings_from_dict({"defaults": {"n_batch": 4, "n_parallel": 8}})
    with pytest.raises(ConfigError, match=r"models\[0\] \(m\): n_batch = 2"):
        settings_from_dict({"models": [{"name": "m", "path": "/x.gguf", "n_batch": 2}]})


def test_n_ubatch_above_n_batch_is_refused() -> None:
    with pytest.raises(ConfigError, match="n_ubatch = 1024 is larger than n_batch = 512"):
        settings_from_dict({"defaults": {"n_ubatch": 1024}})
    assert settings_from_dict({"defaults": {"n_ubatch": 128}}).defaults.n_ubatch == 128


def test_a_quantized_v_cache_without_flash_attention_is_refused() -> None:
    with pytest.raises(ConfigError, match="type_v = 'q8_0' needs flash_attn = true"):
        settings_from_dict({"defaults": {"type_v": "q8_0", "flash_attn": False}})
    with pytest.raises(ConfigError, match=r"models\[0\] \(m\): type_v = 'q4_0' needs flash_attn"):
        settings_from_dict({"defaults": {"flash_attn": False},
                            "models": [{"name": "m", "path": "/x.gguf", "type_v": "q4_0"}]})
    with pytest.raises(ConfigError, match="type_k"):
        settings_from_dict({"defaults": {"type_k": "q5_1"}})
    quantized = settings_from_dict({"defaults": {"type_k": "q8_0", "flash_attn": False}}).defaults  # K alone may
    assert (quantized.type_k, quantized.type_v) == ("q8_0", "f16")


def test_server_section_and_api_key_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\nport = 9000\napi_key = "from-the-file"\n')
    settings = load_settings(config, env={})
    assert (settings.server.host, settings.server.port, settings.server.api_key) == ("0.0.0.0", 9000,
                                                                                     "from-the-file")
    assert load_settings(config, env={"CORRAL_API_KEY": "from-the-env-1"}).server.api_key == "from-the-env-1"
    with pytest.raises(ConfigError, match="server.api_key"):
        load_settings(config, env={"CORRAL_API_KEY": "short"})


def test_cache_section_defaults_and_values() -> None:
    cache = settings_from_dict({}).cache
    assert cache.enabled and (cache.ttl, cache.max_entries, cache.max_bytes) == (600.0, 1024, 64 * 2**20)
    assert (cache.hard_seconds, cache.soft_seconds) == (600.0, 480.0)  # soft: four fifths of ttl
    cache = settings_from_dict({"cache": {"ttl": "1h", "soft_ttl": "50m", "max_bytes": "1MiB"}}).cache
    assert (cache.hard_seconds, cache.soft_seconds, cache.max_bytes) == (3600.0, 3000.0, 2**20)
    forever = settings_from_dict({"cache": {"ttl": -1, "soft_ttl": -1}}).cache
    assert forever.hard_seconds is None and forever.soft_seconds is None


@pytest.mark.parametrize(("data", "key", "rule"), [
    ({"ttl": 0}, "cache.ttl = 0", "set enabled = false to turn the cache off"),
    ({"ttl": "soon"}, "cache.ttl = 'soon'", "not a duration"),
    ({"soft_ttl": "20m"}, "cache.soft_ttl = '20m'", "must be shorter than ttl (600 s)"),
    ({"soft_ttl": 0}, "cache.soft_ttl = 0", "-1 for no soft expiry"),
    ({"max_entries": 0}, "cache.max_entries = 0", "greater than or equal to 1"),
    ({"max_bytes": "lots"}, "cache.max_bytes = 'lots'", "not a size"),
    ({"enabled": "yes please"}, "cache.enabled = 'yes please'", "boolean"),
])
def test_cache_section_errors_name_the_key(data: dict[str, Any], key: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"cache": data}, source="conf.toml")
    assert f"conf.toml: {key}: " in str(info.value) and rule in str(info.value)


def test_gpu_keys_auto_forced_and_vram_budget() -> None:
    settings = settings_from_dict({"defaults": {"n_gpu_layers": "AUTO"}, "budgets": {"vram_bytes": "10GiB"},
                                   "models": [{"name": "m", "path": "/m.gguf", "n_gpu_layers": "12"}]})
    assert settings.defaults.n_gpu_layers == "auto" and settings.effective("m").n_gpu_layers == 12
    assert settings.budgets.vram_budget(80 * 2**30) == 10 * 2**30 and settings.budgets.gpu_oom_retry
    default = settings_from_dict({})
    assert default.defaults.n_gpu_layers == "auto"
    assert default.budgets.vram_budget(80 * 2**30) == int(80 * 2**30 * 0.9)
    assert load_settings(None, env={"CORRAL_N_GPU_LAYERS": "0", "HOME": "/nonexistent"}).defaults.n_gpu_layers == 0
