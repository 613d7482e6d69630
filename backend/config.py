"""Typed settings: a TOML file, then CORRAL_* environment variables, then explicit overrides.

Validation errors name the key, the value and the rule (a `ConfigError`), because a person
editing a file over SSH needs to know exactly which line to fix.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from .errors import ConfigError
from .generation import SamplingFields

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}
_DURATIONS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)\s*(ms|us|µs|ns|[smhd]?)")


def parse_bytes(value: Any) -> int:
    """'8GiB', '512 MB', 1073741824 → bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '8GiB' or a number of bytes")
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size; use e.g. '8GiB', '512MB' or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_duration(value: Any) -> float:
    """'5m', '30s', '1h', 90, -1 (forever) → seconds; negative means never expire. Go's compound
    form ('1h30m', '5m0s'), which ollama's clients send, reads as the sum of its parts."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '5m' or seconds")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    parts = _DURATION_PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body.replace(" ", "") or (
            len(parts) > 1 and any(u == "" for _, u in parts)):
        raise ValueError(f"{value!r} is not a duration; use e.g. '30s', '5m', '1h30m' or -1 for forever")
    return sign * sum(float(number) * _DURATIONS[unit] for number, unit in parts)


def parse_gpu_layers(value: Any) -> int | str:
    """n_gpu_layers: "auto" (planned from free VRAM), 0 (CPU), -1 (all) or a layer count."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= -1:
        return value
    raise ValueError('must be "auto" or a whole number greater than or equal to -1 '
                     "(0 = CPU, -1 = every layer)")


_SWITCHES: dict[str, bool | str] = {"auto": "auto", "on": True, "true": True, "yes": True, "1": True,
                                    "off": False, "false": False, "no": False, "0": False}


def parse_store_switch(value: Any) -> bool | str | Path:
    """A `[stores]` value: true/"on", false/"off", "auto", or the absolute path of the store's
    folder (`~` allowed). A relative path is refused: it would depend on where corral starts,
    and it is more often a misspelt switch ("of") than a folder."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, Path)):
        text = str(value).strip()
        switch = _SWITCHES.get(text.lower())
        if switch is not None:
            return switch
        path = Path(text).expanduser()
        if text and path.is_absolute():
            return path
    raise ValueError('must be true (on), false (off), "auto" (on where its folder exists) or the absolute '
                     'path of its folder, e.g. "~/.ollama/models"')


# KV cache element types llama.cpp takes for type_k / type_v (q8_0 about halves the cache, q4_0
# about quarters it); a quantized V cache needs flash attention.
KVType = Literal["f16", "q8_0", "q4_0"]
Bytes = Annotated[int, BeforeValidator(parse_bytes)]
Seconds = Annotated[float, BeforeValidator(parse_duration)]
GPULayers = Annotated[int | str, BeforeValidator(parse_gpu_layers)]
StoreSwitch = Annotated[bool | Literal["auto"] | Path, BeforeValidator(parse_store_switch)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelDefaults(_Strict):
    """Settings every model gets unless its own entry says otherwise."""

    n_ctx: int = Field(4096, ge=64, le=1 << 20)
    n_parallel: int = Field(4, ge=1, le=256)
    n_batch: int = Field(512, ge=1, le=1 << 16)
    n_ubatch: int | None = Field(None, ge=1, le=1 << 16, description="tokens llama.cpp computes at once (its "
                                 "compute buffers scale with it); None = n_batch")
    n_threads: int = Field(0, ge=0, le=1024, description="0 = physical cores")
    n_gpu_layers: GPULayers = Field("auto", description='"auto" = as many as fit in free VRAM; an int forces')
    keep_alive: Seconds = 300.0
    flash_attn: bool = Field(True, description="attention that skips masked cells: other sequences' and, on "
                                               "sliding-window layers, those outside the window (long prompts)")
    type_k: KVType = Field("f16", description="the K cache's element type")
    type_v: KVType = Field("f16", description="the V cache's element type (quantized: needs flash_attn)")
    chat_format: str | None = None
    max_queue: int = Field(64, ge=0, le=100_000)


def check_model_values(where: str, values: ModelDefaults) -> None:
    """The rules between a model's settings (each field's own are on ModelDefaults); ValueError
    names the rule and the fix. Shared by the config file and `corral plan`'s overrides."""
    if values.n_batch < values.n_parallel:
        # every running sequence adds a token to each batch: a smaller batch cannot hold them
        raise ValueError(f"{where}: n_batch = {values.n_batch} is smaller than n_parallel = "
                         f"{values.n_parallel}; raise n_batch or lower n_parallel")
    if values.n_ubatch is not None and values.n_ubatch > values.n_batch:
        raise ValueError(f"{where}: n_ubatch = {values.n_ubatch} is larger than n_batch = {values.n_batch}; "
                         "llama.cpp computes at most a batch at once: lower n_ubatch or raise n_batch")
    if values.type_v != "f16" and not values.flash_attn:
        raise ValueError(f"{where}: type_v = {values.type_v!r} needs flash_attn = true (llama.cpp "
                         "quantizes the V cache only with flash attention); turn flash_attn on or "
                         "set type_v = \"f16\"")


MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"


class SamplingDefaults(_Strict, SamplingFields):
    """Default sampling parameters of a model or alias; a request's own values win."""

    def options(self) -> dict[str, Any]:
        """The parameters that are set, as request options."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ModelConfig(_Strict):
    """An explicit `[[models]]` entry: a name for a file, and per-model overrides."""

    name: str = Field(min_length=1, max_length=128, pattern=MODEL_NAME)
    path: Path
    n_ctx: int | None = Field(None, ge=64, le=1 << 20)
    n_parallel: int | None = Field(None, ge=1, le=256)
    n_batch: int | None = Field(None, ge=1, le=1 << 16)
    n_ubatch: int | None = Field(None, ge=1, le=1 << 16)
    n_threads: int | None = Field(None, ge=0, le=1024)
    n_gpu_layers: GPULayers | None = None
    keep_alive: Seconds | None = None
    flash_attn: bool | None = None
    type_k: KVType | None = None
    type_v: KVType | None = None
    pinned: bool = False
    chat_format: str | None = None
    chat_template: str | None = None
    max_queue: int | None = Field(None, ge=0, le=100_000)
    preload: bool = False
    priority: int = Field(0, ge=-1000, le=1000, description="waiting loads start highest first")
    params: SamplingDefaults = SamplingDefaults()


class AliasConfig(_Strict):
    """A virtual model (`[[alias]]`): its own name, system prompt and defaults over a base
    model whose loaded weights and slots it shares."""

    name: str = Field(min_length=1, max_length=128, pattern=MODEL_NAME)
    model: str = Field(min_length=1, description="the base model's name")
    system: str | None = Field(None, description="system prompt put before a chat's messages")
    params: SamplingDefaults = SamplingDefaults()


class Budgets(_Strict):
    max_loaded: int = Field(3, ge=1, le=1000)
    ram_bytes: Bytes | None = Field(None, ge=0, description="absolute RAM budget; wins over ram_fraction")
    ram_fraction: float = Field(0.8, gt=0, le=1.0, description="of RAM available at start")
    drain_timeout: Seconds = Field(30.0, ge=0)
    vram_bytes: Bytes | None = Field(None, ge=0, description="absolute VRAM budget per GPU; wins over "
                                                             "vram_fraction")
    vram_fraction: float = Field(0.9, gt=0, le=1.0, description="of each GPU's total memory")
    gpu_oom_retry: bool = Field(True, description="a planned load that runs out of GPU memory is retried "
                                                  "once with fewer layers")
    saved_kv_ram: Bytes = Field(512 * 2**20, ge=0, description="KV of recent conversations kept in memory when "
                                                              "their model is evicted, restored when it loads")
    saved_kv_disk: Bytes = Field(2 * 2**30, ge=0, description="and on disk beside the state file, for the next "
                                                             "start; 0 keeps none")

    def vram_budget(self, total: int) -> int:
        """corral's budget on a GPU of `total` bytes."""
        return self.vram_bytes if self.vram_bytes is not None else int(total * self.vram_fraction)


class ServerSettings(_Strict):
    """`corral serve` defaults; command-line flags and CORRAL_API_KEY win over these."""

    host: str = "127.0.0.1"
    port: int = Field(8377, ge=0, le=65535)
    api_key: str | None = Field(None, min_length=8, description="Bearer key every route but /health needs")
    ollama_port: int | None = Field(None, ge=0, le=65535, description="also listen here with ollama's API at its "
                                                                    "own paths (11434: ollama's clients' default)")
    responses_max: int = Field(1000, ge=0, le=1_000_000, description="stored Responses kept (store: true); the "
                                                                     "oldest goes first, 0 keeps none")
    responses_ttl: Seconds = Field(3600.0, gt=0, description="how long a stored Response is kept")


class CacheSettings(_Strict):
    """The response cache: exact-match answers to deterministic requests (temperature 0 or a
    fixed seed), kept `ttl` and served once more after `soft_ttl` while it is recomputed."""

    enabled: bool = True
    ttl: Seconds = Field(600.0, description="age after which an answer is never served; -1 = never expires")
    soft_ttl: Seconds | None = Field(None, description="age after which an answer is served once more while a "
                                                       "background request recomputes it; default 4/5 of ttl, "
                                                       "-1 = never")
    max_entries: int = Field(1024, ge=1, le=10_000_000)
    max_bytes: Bytes = Field(64 * 2**20, ge=1, description="answer text kept, in UTF-8 bytes")

    @field_validator("ttl")
    @classmethod
    def _ttl_keeps_something(cls, ttl: float) -> float:
        if ttl == 0:
            raise ValueError("an answer that expires at once is never served; set enabled = false to turn "
                             "the cache off, or -1 to keep answers until they are evicted")
        return ttl

    @field_validator("soft_ttl")
    @classmethod
    def _soft_before_hard(cls, soft: float | None, info: ValidationInfo) -> float | None:
        ttl = info.data.get("ttl")
        if soft is None or soft < 0 or ttl is None:
            return soft
        if soft == 0:
            raise ValueError("every answer would be stale at once; give a duration such as '8m', or -1 for "
                             "no soft expiry")
        if 0 < ttl <= soft:
            raise ValueError(f"must be shorter than ttl ({ttl:g} s): an answer past ttl is never served")
        return soft

    @property
    def hard_seconds(self) -> float | None:
        """Age after which an answer is gone; None when answers never expire."""
        return self.ttl if self.ttl > 0 else None

    @property
    def soft_seconds(self) -> float | None:
        """Age after which an answer is stale (served once more, then refreshed); None: never."""
        if self.soft_ttl is None:
            return None if self.hard_seconds is None else self.ttl * 0.8
        return self.soft_ttl if self.soft_ttl > 0 else None


class StoresSettings(_Strict):
    """Other tools' model stores, read where they are (stores.py); each is on, off, "auto" (on
    where its folder exists) or the path of its folder."""

    ollama: StoreSwitch = Field("auto", description="$OLLAMA_MODELS, else ~/.ollama/models, else "
                                                    "/usr/share/ollama/.ollama/models")
    huggingface: StoreSwitch = Field("auto", description="$HF_HUB_CACHE, else $HF_HOME/hub, else "
                                                         "$XDG_CACHE_HOME/huggingface/hub, else "
                                                         "~/.cache/huggingface/hub")
    lmstudio: StoreSwitch = Field("auto", description="models/ in the folder ~/.lmstudio-home-pointer names, "
                                                      "else ~/.lmstudio/models, else ~/.cache/lm-studio/models")


KEY_SPEC = re.compile(r"[^\s,]+(\s*,\s*[^\s,]+)*")


def _check_keymap(keymap: dict[str, str]) -> dict[str, str]:
    """The form of a keymap (command id → key names); which ids exist only the console knows,
    and it checks that when it opens."""
    for command_id, keys in keymap.items():
        if not re.fullmatch(r"corral(\.[a-z0-9_]+)+", command_id):
            raise ValueError(f"{command_id!r} is not a command id; ids look like 'corral.load' "
                             "(the help screen, ?, lists them)")
        if not KEY_SPEC.fullmatch(keys.strip()):
            raise ValueError(f"{command_id} = {keys!r}: give one or more key names separated by "
                             "commas, e.g. 'L' or 'ctrl+l,f5'")
    return keymap


class SamplingSettings(_Strict):
    """How requests that leave sampling options unset are sampled."""

    loop_guard: bool = Field(False, description="give requests that set no repeat_penalty / dry_* options the "
                                                "console's loop guard (a repetition penalty and DRY); off, they "
                                                "sample with none, so API answers stay what clients expect")


class ConsoleSettings(_Strict):
    """The console's look and keys (`corral` and `corral attach`)."""

    theme: str | None = Field(None, min_length=1, description="corral-dark, corral-light, corral-contrast, "
                                                              "a theme file's name, or any Textual theme")
    keymap: Annotated[dict[str, str], AfterValidator(_check_keymap)] = Field(default_factory=dict)


class Settings(_Strict):
    """The whole configuration."""

    model_dirs: list[Path] = Field(default_factory=list)
    include_default_model: bool = True
    preload: list[str] = Field(default_factory=list)
    defaults: ModelDefaults = ModelDefaults()
    budgets: Budgets = Budgets()
    server: ServerSettings = ServerSettings()
    cache: CacheSettings = CacheSettings()
    sampling: SamplingSettings = SamplingSettings()
    console: ConsoleSettings = ConsoleSettings()
    stores: StoresSettings = StoresSettings()
    models: list[ModelConfig] = Field(default_factory=list)
    aliases: list[AliasConfig] = Field(default_factory=list, alias="alias")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        seen: set[str] = set()
        for kind, entry in [("models", m) for m in self.models] + [("alias", a) for a in self.aliases]:
            if entry.name in seen:
                raise ValueError(f"{kind}: name {entry.name!r} appears twice; model and alias names "
                                 "must be unique")
            seen.add(entry.name)
        aliases = {a.name for a in self.aliases}
        for alias in self.aliases:
            if alias.model in aliases:
                raise ValueError(f"alias {alias.name!r}: its model {alias.model!r} is itself an alias; "
                                 "name a real model")
        for where, values in [("defaults", self.defaults)] + [
                (f"models[{i}] ({m.name})", self.effective(m.name)) for i, m in enumerate(self.models)]:
            check_model_values(where, values)
        return self

    def alias_for(self, name: str) -> AliasConfig | None:
        return next((a for a in self.aliases if a.name == name), None)

    def model_config_for(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def effective(self, name: str, store: Mapping[str, Any] | None = None) -> ModelDefaults:
        """Defaults, then what the model's store gives (`store`: an ollama manifest's num_ctx as
        n_ctx), then the model's own [[models]] overrides."""
        entry = self.model_config_for(name)
        overrides = {k: v for k, v in (store or {}).items() if k in ModelDefaults.model_fields}
        if entry is not None:
            overrides.update({k: v for k, v in entry.model_dump().items()
                              if k in ModelDefaults.model_fields and v is not None})
        return self.defaults.model_copy(update=overrides) if overrides else self.defaults


ENV_PREFIX = "CORRAL_"
_ENV_KEYS = {
    "MODEL_DIRS": ("model_dirs", lambda v: [p for p in v.split(os.pathsep) if p]),
    "MAX_LOADED": ("budgets.max_loaded", int),
    "RAM_BUDGET": ("budgets.ram_bytes", str),
    "N_CTX": ("defaults.n_ctx", int),
    "N_PARALLEL": ("defaults.n_parallel", int),
    "N_THREADS": ("defaults.n_threads", int),
    "N_GPU_LAYERS": ("defaults.n_gpu_layers", str),
    "KEEP_ALIVE": ("defaults.keep_alive", str),
    "PRELOAD": ("preload", lambda v: [p for p in v.split(",") if p]),
    "API_KEY": ("server.api_key", str),
    "STORES_OLLAMA": ("stores.ollama", str),
    "STORES_HUGGINGFACE": ("stores.huggingface", str),
    "STORES_LMSTUDIO": ("stores.lmstudio", str),
}


def default_state_path(env: Mapping[str, str] | None = None) -> Path:
    """Where `corral` and `corral serve` keep the loaded and pinned set for a warm restart:
    $CORRAL_STATE_FILE, else $XDG_STATE_HOME/corral/state.json (~/.local/state/...)."""
    env = os.environ if env is None else env
    if env.get(f"{ENV_PREFIX}STATE_FILE"):
        return Path(env[f"{ENV_PREFIX}STATE_FILE"]).expanduser()
    home = env.get("HOME") or str(Path.home())
    return Path(env.get("XDG_STATE_HOME") or Path(home) / ".local" / "state") / "corral" / "state.json"


def default_pull_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where `corral pull` puts models when no model directory is configured:
    $XDG_DATA_HOME/corral/models (~/.local/share/corral/models). The catalog always scans it,
    so what was pulled there stays listed after model_dirs are configured."""
    env = os.environ if env is None else env
    home = env.get("HOME") or str(Path.home())
    return Path(env.get("XDG_DATA_HOME") or Path(home) / ".local" / "share") / "corral" / "models"


def catalog_dirs(settings: Settings) -> list[Path]:
    """The folders the catalog scans: the configured model directories, then the pull folder."""
    dirs = [Path(d).expanduser() for d in settings.model_dirs]
    pulled = default_pull_dir()
    return dirs if pulled in dirs else [*dirs, pulled]


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("HOME") or str(Path.home())
    return Path(env.get("XDG_CONFIG_HOME") or Path(home) / ".config") / "corral" / "config.toml"


@dataclass(frozen=True)
class ConfigSource:
    """Where the settings come from: a TOML file, then CORRAL_* environment, then overrides.

    Kept for the process's life so that a reload or a rollback builds settings exactly as the
    start did (same environment, same command-line overrides) from new file text.
    """

    file: Path
    explicit: bool  # named by --config or CORRAL_CONFIG: it must exist
    env: Mapping[str, str]
    overrides: Mapping[str, Any]

    def read_text(self) -> str | None:
        """The file's text; None when there is no file and none was asked for."""
        try:
            return self.file.read_text(encoding="utf-8")
        except FileNotFoundError:
            if self.explicit:
                raise ConfigError(f"{self.file}: config file not found; create it or drop --config") from None
            return None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{self.file}: cannot read: {reason}") from None

    def read(self) -> tuple[Settings, str | None]:
        text = self.read_text()
        return self.parse(text), text

    def parse(self, text: str | None) -> Settings:
        """Settings from `text` as the file's content (None: no file), with env and overrides."""
        data: dict[str, Any] = {}
        if text is not None:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{self.file}: not valid TOML: {exc}") from None
        from_env: dict[str, str] = {}
        for key, (dotted, convert) in _ENV_KEYS.items():
            name = f"{ENV_PREFIX}{key}"
            if name in self.env:
                try:
                    _set_dotted(data, dotted, convert(self.env[name]))
                except ValueError:
                    raise ConfigError(f"environment {name}={self.env[name]!r}: not a valid value for "
                                      f"{dotted}") from None
                from_env[dotted] = f"environment {name}={self.env[name]!r}"
        for dotted, value in self.overrides.items():
            _set_dotted(data, dotted, value)
        return settings_from_dict(data, source=str(self.file), origins=from_env)


def config_source(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> ConfigSource:
    env = dict(os.environ) if env is None else dict(env)
    explicit = path is not None or f"{ENV_PREFIX}CONFIG" in env
    file = Path(path or env.get(f"{ENV_PREFIX}CONFIG") or default_config_path(env)).expanduser()
    return ConfigSource(file, explicit, env, dict(overrides or {}))


def load_settings(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read the TOML file (if it exists), then environment, then overrides; validate once."""
    return config_source(path, env=env, overrides=overrides).read()[0]


def settings_from_dict(data: dict[str, Any], source: str = "config",
                       origins: Mapping[str, str] | None = None) -> Settings:
    """Validate `data`; `origins` names where a key came from when not from `source`."""
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(err, source, origins or {}) for err in exc.errors())) from None
    return _with_paths_expanded(settings)


def _with_paths_expanded(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "model_dirs": [p.expanduser() for p in settings.model_dirs],
        "models": [m.model_copy(update={"path": m.path.expanduser()}) for m in settings.models],
    })


def _describe(err: Any, source: str, origins: Mapping[str, str]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    where = origins.get(key, source)
    message = err["msg"].removeprefix("Value error, ")
    if not key:  # a rule across keys: its message names them
        return f"{where}: {message}"
    if err["type"] == "extra_forbidden":
        return f"{where}: {key}: unknown key{_suggestion(err['loc'])}"
    if err["type"] == "missing":
        return f"{where}: {key}: required"
    return f"{where}: {key} = {err.get('input')!r}: {message}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _suggestion(loc: tuple[Any, ...]) -> str:
    """' (did you mean 'keep_alive'?)' for a misspelt key, from the keys allowed where it sits."""
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        annotation = getattr(field, "annotation", None)
        inner = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type)] or [annotation]
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return " (check its spelling)"
    known = [f.alias or name for name, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(known))})"
