"""The `corral` command.

Textual is imported only when the console opens, so headless commands never load the UI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description="Operations console and model manager for local GGUF LLMs.")
    parser.add_argument("--config", help="TOML config file (default: ~/.config/corral/config.toml)")
    parser.add_argument("--log-file", help="write the backend's log (llama.cpp lines included) here")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    sub = parser.add_subparsers(dest="command")

    sub.add_parser("console", help="open the console on the embedded backend (the default)")

    models = sub.add_parser("models", help="list the models corral knows and whether they can be used")
    models.add_argument("--json", action="store_true", help="machine-readable output")

    run = sub.add_parser("run", help="stream a completion from a model to stdout")
    run.add_argument("model")
    run.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    run.add_argument("--chat", action="store_true", help="send the prompt as a chat message (uses the chat template)")
    run.add_argument("--max-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--top-p", type=float, default=0.95)
    run.add_argument("--top-k", type=int, default=40)
    run.add_argument("--seed", type=int)
    run.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    run.add_argument("--stats", action="store_true", help="print TTFT and tokens/s to stderr at the end")

    pull = sub.add_parser("pull", help="download a GGUF model into a model folder (resumable, sha256-checked)")
    pull.add_argument("source", help="an https:// URL of a .gguf file, hf://owner/repo/file.gguf, or "
                                     "hf://owner/repo:QUANT (e.g. :Q4_K_M)")
    pull.add_argument("--name", help="the model's name (default: from its file name)")
    pull.add_argument("--sha256", help="the file's expected sha256 (default: the hash its host publishes, if any)")
    pull.add_argument("--dir", help="the folder to put it in: a model folder or a subfolder of one (default: the "
                                    "first of model_dirs, else ~/.local/share/corral/models)")
    _remote_arguments(pull, "pull on this running `corral serve` (its folders, its HF_TOKEN) instead of here")
    rm = sub.add_parser("rm", help="delete a model that `corral pull` downloaded (never anyone else's file)")
    rm.add_argument("name")
    _remote_arguments(rm, "remove it on this running `corral serve` instead of here")

    plan = sub.add_parser("plan", help="a dry run of loading a model: the estimate, the budget, what would be "
                                       "evicted, or why it cannot fit and what would")
    plan.add_argument("model")
    for flag, kind, what in (("--n-ctx", int, "context length"), ("--n-parallel", int, "sequences"),
                             ("--n-batch", int, "batch"), ("--n-ubatch", int, "micro-batch"),
                             ("--type-k", str, "K cache type: f16, q8_0, q4_0"),
                             ("--type-v", str, "V cache type: f16, q8_0, q4_0"),
                             ("--n-gpu-layers", str, 'layers on the GPU: "auto" or a number'),
                             ("--flash-attn", str, "true or false")):
        plan.add_argument(flag, type=kind, help=f"plan with this {what} instead of the model's own")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    _remote_arguments(plan, "plan on this running `corral serve` (its loaded models and budget) instead of here")

    serve = sub.add_parser("serve", help="run headless: OpenAI-compatible HTTP API, admin API, /metrics")
    serve.add_argument("--host", help="address to listen on (default: [server] host, else 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to listen on; 0 picks a free one (default: [server] port, "
                                                "else 8377)")
    serve.add_argument("--config", dest="serve_config", metavar="FILE", help="TOML config file (as corral --config)")
    serve.add_argument("--ollama-port", type=_port, help="also listen on this port with ollama's API at ollama's "
                                                          "paths, e.g. 11434 (default: [server] ollama_port, else off)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                                         "(default: $CORRAL_API_KEY, else [server] api_key; prefer those: "
                                         "arguments show in ps)")
    serve.add_argument("--no-watch", action="store_true",
                       help="do not reload when the config file changes (reload with `corral reload` or SIGHUP)")
    serve.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, how long running requests may finish before they are ended (default: 10)")

    web = sub.add_parser("web", help="serve the console to web browsers (textual-serve): one console per browser tab")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only: "
                                                       "there is no login)")
    web.add_argument("--port", type=_port, default=8000, help="port to listen on (default: %(default)s)")
    web.add_argument("--config", dest="web_config", metavar="FILE", help="TOML config file (as corral --config)")
    web.add_argument("--attach", metavar="URL", help="each tab attaches to this `corral serve` (key: $CORRAL_API_KEY) "
                                                     "instead of running models itself")
    web.add_argument("--public-url", help="the address browsers reach this at, where not http://HOST:PORT (a proxy)")

    attach = sub.add_parser("attach", help="open the console on a running `corral serve`, or a fleet's view")
    attach.add_argument("url", help="the server, e.g. http://127.0.0.1:8377; or ray://HOST:PORT for the fleet "
                                    "view of a corral fleet on that Ray cluster")
    attach.add_argument("--app", default="corral", help="with ray://: the fleet's name ([fleet] app)")
    attach.add_argument("--api-key", help="the server's key (default: $CORRAL_API_KEY)")

    fleet = sub.add_parser("fleet", help="a corral fleet on Ray Serve: `fleet up` starts it, `fleet` shows it "
                                         "(needs corral[ray])")
    fleet.add_argument("action", nargs="?", choices=["up"], help="up: deploy the fleet on a running Ray cluster")
    fleet.add_argument("--config", dest="fleet_config", metavar="FILE", help="fleet.toml (for `up`)")
    fleet.add_argument("--address", default="auto", help="the Ray cluster (default: %(default)s, the one this host "
                                                         "joined; ray://HOST:10001 from elsewhere)")
    fleet.add_argument("--app", default="corral", help="the fleet's name, [fleet] app (default: %(default)s)")

    reload = sub.add_parser("reload", help="make a running `corral serve` read its config file again")
    _server_arguments(reload)
    config = sub.add_parser("config", help="a running server's config versions: history, show, rollback")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _server_arguments(config_sub.add_parser("history", help="list the applied versions with their changes"))
    show = config_sub.add_parser("show", help="print the TOML text of one version")
    show.add_argument("number", type=int)
    _server_arguments(show)
    rollback = config_sub.add_parser("rollback", help="apply an earlier version again (and write it to the file)")
    rollback.add_argument("number", type=int)
    _server_arguments(rollback)

    from corral.console.bench import add_arguments as bench_arguments  # light: httpx, no llama_cpp/textual

    bench_arguments(sub.add_parser("bench", help="load-test a running server: concurrency steps, a scenario "
                                                 "mix, host monitoring; --duration for a soak"))
    return parser


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8377", help="the server (default: %(default)s)")
    parser.add_argument("--api-key", help="the server's key (default: $CORRAL_API_KEY)")


def _remote_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--url", help=f"{what}, e.g. http://127.0.0.1:8377 (default: in this process)")
    parser.add_argument("--api-key", help="the server's key (default: $CORRAL_API_KEY)")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 1-65535, or 0 for a free one")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args)
    from corral.backend.errors import CorralError

    try:
        if args.command == "models":
            return _models(args)
        if args.command == "run":
            return _run(args)
        if args.command == "pull":
            return _pull(args)
        if args.command == "rm":
            return _rm(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "attach":
            return _fleet_view(args, args.url) if args.url.startswith("ray://") else _attach(args)
        if args.command == "fleet":
            return _fleet_up(args) if args.action == "up" else _fleet_view(args, args.address)
        if args.command == "web":
            return _web(args)
        if args.command in ("reload", "config"):
            return _config_command(args)
        if args.command == "bench":
            from corral.console.bench import run as bench

            return bench(args)
        return _console(args)
    except CorralError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _configure_logging(args: argparse.Namespace) -> None:
    """Logs go to a file when asked, else to stderr for headless commands; never to a TUI screen."""
    level = logging.DEBUG if args.verbose else logging.INFO
    root = logging.getLogger("corral")
    root.setLevel(level)
    if args.log_file:
        handler: logging.Handler = logging.FileHandler(Path(args.log_file).expanduser())
    elif args.command == "serve" or (args.command in ("models", "run") and args.verbose):
        handler = logging.StreamHandler(sys.stderr)
    else:
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if args.command == "serve":  # uvicorn's own warnings and errors belong in the same log
        uvicorn_log = logging.getLogger("uvicorn")
        uvicorn_log.setLevel(logging.WARNING)
        uvicorn_log.addHandler(handler)
        uvicorn_log.propagate = False


def _backend(args: argparse.Namespace, *, lasting: bool = False, path: str | None = None) -> Any:
    """A LocalBackend on the config file. A `lasting` one (the console, the server) watches the
    file for changes and restores the models of its last run; a one-shot command does neither."""
    from corral.backend import LocalBackend
    from corral.backend.config import config_source, default_state_path

    watch = lasting and not getattr(args, "no_watch", False)
    return LocalBackend(config=config_source(path or args.config), watch_config=watch,
                        state_file=default_state_path() if lasting else None,
                        pulled_file=default_state_path().with_name("pulled.json"))


def _pull_backend(args: argparse.Namespace) -> Any:
    """`pull`, `rm` and `plan` work in this process, or on the server `--url` names."""
    import os

    if args.url is None:
        return _backend(args)
    from corral.backend.remote import RemoteBackend

    return RemoteBackend(args.url, api_key=args.api_key or os.environ.get("CORRAL_API_KEY") or None)


def _pull(args: argparse.Namespace) -> int:
    """Follow a pull with a progress bar on a terminal (plain lines otherwise). Ctrl+C cancels
    it; its partial file stays, and the same command resumes it."""
    import asyncio

    from corral.backend.memory import format_bytes

    shown = _PullProgress(sys.stderr)

    async def follow() -> Any:
        last = None
        async for status in backend.pull(args.source, name=args.name, sha256=args.sha256, directory=args.dir):
            shown.update(status)
            last = status
        return last

    with _pull_backend(args) as backend:
        try:
            last = asyncio.run(follow())
        except KeyboardInterrupt:
            shown.end()
            print("corral pull: cancelled; the partial file is kept: run the same command again to resume",
                  file=sys.stderr)
            return 130
        finally:
            shown.end()
    files = ", ".join(last.paths)
    if last.already:
        print(f"{last.model} is already pulled: {files} (nothing downloaded)")
    else:
        print(f"pulled {last.model}: {files} ({format_bytes(last.total)})")
    return 0


class _PullProgress:
    """A pull's progress on `out`: one redrawn bar on a terminal; a line per stage and per 10 %
    otherwise (logs, pipes)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.tty = out.isatty()
        self._stage: str | None = None
        self._tenth = -1
        self._drawn = False

    def update(self, status: Any) -> None:
        from corral.backend.memory import format_bytes

        if status.status != self._stage:
            self._stage = status.status
            if status.status == "downloading":
                resumed = f", resuming at {format_bytes(status.resumed)}" if status.resumed else ""
                size = format_bytes(status.total) if status.total is not None else "size not told"
                self._line(f"pulling {status.source} as {status.model} into {status.directory} ({status.files} "
                           f"file{'s' if status.files != 1 else ''}, {size}{resumed})")
            elif status.status != "done":
                self._line(f"{status.status} {status.source}")
        if status.status != "downloading":
            return
        speed = f"{format_bytes(status.rate)}/s" if status.rate else "-"
        eta = f"ETA {int(status.eta_s) // 60}:{int(status.eta_s) % 60:02d}" if status.eta_s is not None else ""
        sizes = f"{format_bytes(status.completed)} / {format_bytes(status.total)}"
        percent = status.percent
        if self.tty:
            width = 30
            filled = width * (percent or 0) // 100
            bar = "#" * filled + "-" * (width - filled)
            shown = f"{percent:3d}%" if percent is not None else "  ?%"
            self.out.write(f"\r{shown} [{bar}] {sizes}  {speed}  {eta}\x1b[K")
            self.out.flush()
            self._drawn = True
        elif percent is not None and percent // 10 > self._tenth:
            self._tenth = percent // 10
            self._line(f"{percent:3d}% {sizes}, {speed} {eta}".rstrip())

    def _line(self, text: str) -> None:
        self.end()
        print(text, file=self.out, flush=True)

    def end(self) -> None:
        """Leave the bar's line, so what follows starts on a line of its own."""
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False


def _rm(args: argparse.Namespace) -> int:
    with _pull_backend(args) as backend:
        removed = backend.sync.remove(args.name)
    print(f"removed {args.name}: {', '.join(removed) or 'its files were already gone'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Exit status 0 when the model fits (evicting or not), 2 when it cannot."""
    import json

    from corral.backend.snapshot import PLANNABLE

    overrides = {name: getattr(args, name) for name in PLANNABLE if getattr(args, name) is not None}
    with _pull_backend(args) as backend:
        plan = backend.sync.plan(args.model, **overrides)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render())
    return 0 if plan.fits else 2


def _models(args: argparse.Namespace) -> int:
    import json

    from corral.backend.memory import format_bytes

    with _backend(args) as backend:
        models = backend.sync.models()
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return 0
    rows = [("NAME", "SOURCE", "ARCH", "QUANT", "PARAMS", "SIZE", "CTX", "EST. MEM", "PATH", "STATUS")]
    for m in models:
        rows.append((m.name, m.source, m.architecture or "-", m.quantization or "-",
                     f"{m.parameters / 1e6:.0f}M" if m.parameters else "-", format_bytes(m.file_size), str(m.n_ctx),
                     format_bytes(m.estimate_bytes), m.path or "-", m.state if m.usable else f"unusable: {m.error}"))
        # a file that lost the clash for this name is listed under it, with the reason
        rows += [(m.name, c.source, "-", "-", "-", "-", "-", "-", c.path or "-", f"unusable: {c.reason}")
                 for c in m.clashes]
    # names from stores run long (owner/repo/file): every column but the last fits its longest
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    right = {4, 5, 6, 7}  # the numbers
    for row in rows:
        cells = [f"{cell:>{width}}" if i in right else f"{cell:<{width}}"
                 for i, (cell, width) in enumerate(zip(row, widths))]
        print("  ".join([*cells, row[-1]]))
    return 0


def _run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop)
    with _backend(args) as backend:
        if args.chat:
            stream = backend.sync.chat(args.model, [{"role": "user", "content": prompt}], **options)
        else:
            stream = backend.sync.complete(args.model, prompt, **options)
        last = None
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
        sys.stdout.write("\n")
    if args.stats and last is not None and last.stats is not None:
        s = last.stats
        speed = f"{s.tokens_per_s:.1f} tok/s" if s.tokens_per_s else "n/a"
        ttft = f"{s.ttft_s * 1000:.0f} ms" if s.ttft_s is not None else "n/a"
        print(f"[{s.prompt_tokens} prompt + {s.completion_tokens} generated tokens, TTFT {ttft}, {speed}, "
              f"finish: {last.finish_reason}]", file=sys.stderr)
    return 0 if last is None or last.finish_reason != "error" else 1


def _serve(args: argparse.Namespace) -> int:
    """Run the HTTP server until SIGTERM/SIGINT, then drain and exit 0 (never 143)."""
    import asyncio

    from corral.backend.errors import ConfigError
    from corral.backend.server import serve
    from corral.backend.server.stored import Store

    if args.api_key is not None and len(args.api_key) < 8:
        raise ConfigError("--api-key: use at least 8 characters (a short key is easy to guess)")
    backend = _backend(args, lasting=True, path=args.serve_config)
    settings = backend.settings  # CORRAL_API_KEY lands in server.api_key
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    api_key = args.api_key or settings.server.api_key
    ollama_port = settings.server.ollama_port if args.ollama_port is None else args.ollama_port
    warning = exposure_warning(host, api_key)
    if warning:
        print(f"corral serve: warning: {warning}", file=sys.stderr, flush=True)

    def listening(host: str, port: int, models: int, ollama_port: int | None) -> None:
        shown = f"[{host}]" if ":" in host else host
        also = f"; ollama API on http://{shown}:{ollama_port}" if ollama_port is not None else ""
        print(f"corral serve: listening on http://{shown}:{port} ({models} models){also}", flush=True)

    try:
        asyncio.run(serve(backend, host=host, port=port, api_key=api_key, grace_s=args.grace,
                          ollama_port=ollama_port, stored=Store(settings.server.responses_max, settings.server.responses_ttl),
                          on_listening=listening))
    finally:
        backend.close()
    return 0


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """Why listening on `host` without a key is risky, or None when it is not."""
    import ipaddress

    if api_key:
        return None
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: assume it is reachable from elsewhere
    return (f"listening on {host} without an API key: anyone who can reach this port can run, load and "
            "unload models; set CORRAL_API_KEY (or --api-key) or listen on 127.0.0.1")


def _web(args: argparse.Namespace) -> int:
    """Serve the console to browsers: textual-serve starts `corral console` (or `corral attach
    URL`) per tab and relays it over a websocket, so this process loads neither Textual nor
    llama.cpp."""
    import shlex

    from textual_serve.server import Server

    from corral.backend.errors import ConfigError

    if args.port == 0:
        raise ConfigError("web --port 0: the page must tell browsers the port, so choose one")
    config = args.web_config or args.config
    command = [sys.executable, "-m", "corral.console.cli", *(["--config", config] if config else [])]
    command += ["attach", args.attach] if args.attach else ["console"]
    if exposure_warning(args.host, None):
        print(f"corral web: warning: listening on {args.host}: there is no login, so anyone who can reach this "
              "port gets the console and controls the models; listen on 127.0.0.1 and reach it through an SSH "
              "tunnel or an authenticating proxy", file=sys.stderr, flush=True)
    Server(shlex.join(command), host=args.host, port=args.port, title="corral", public_url=args.public_url).serve()
    return 0


def _attach(args: argparse.Namespace) -> int:
    """The same console over HTTP: nothing here loads llama.cpp."""
    import asyncio
    import os

    from corral.backend import load_settings
    from corral.backend.remote import RemoteBackend
    from corral.console.app import create_app

    console = load_settings(args.config).console  # the look and keys are this machine's
    backend = RemoteBackend(args.url, api_key=args.api_key or os.environ.get("CORRAL_API_KEY") or None)
    try:
        create_app(backend, theme=console.theme, keymap=console.keymap, themes_dir=_themes_dir(args)).run()
    finally:
        asyncio.run(backend.aclose())
    return 0


def _ray() -> Any:
    """Ray, or a clear word on how to install it: the fleet is an optional extra."""
    from corral.backend.errors import CorralError

    try:
        import ray
        import ray.serve  # noqa: F401
    except ImportError:
        raise CorralError("the fleet runs on Ray Serve, which is not installed: pip install 'corral[ray]'") from None
    return ray


def _fleet_up(args: argparse.Namespace) -> int:
    """Deploy the fleet on the Ray cluster at --address and return; Ray keeps it running."""
    from corral.backend.errors import ConfigError

    if not args.fleet_config:
        raise ConfigError("corral fleet up: name the fleet file with --config fleet.toml")
    ray = _ray()
    from corral.backend.fleet.deploy import up
    from corral.backend.fleet.settings import read_fleet

    settings = read_fleet(args.fleet_config)
    warning = exposure_warning(settings.host, settings.api_key)
    if warning:
        print(f"corral fleet: warning: {warning}", file=sys.stderr, flush=True)
    ray.init(address=args.address, namespace="corral", log_to_driver=False)
    up(settings)
    print(f"corral fleet: {settings.app} is up with {len(settings.nodes)} nodes; OpenAI API on "
          f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}/v1", flush=True)
    return 0


def _fleet_view(args: argparse.Namespace, address: str) -> int:
    """The console's fleet view: nodes, models by node, the operator's verbs on a chosen node."""
    ray = _ray()
    from corral.backend import load_settings
    from corral.backend.fleet.client import Fleet
    from corral.console.screens.fleet import FleetApp

    theme = load_settings(args.config).console.theme
    ray.init(address=address, namespace="corral", log_to_driver=False)
    try:
        FleetApp(Fleet(args.app), f"{args.app} on {address}", theme=theme).run()
    finally:
        ray.shutdown()
    return 0


def _themes_dir(args: argparse.Namespace) -> Path:
    """The user's theme files: `themes/` beside the config file (on this machine, attached too)."""
    from corral.backend.config import config_source

    return config_source(args.config).file.parent / "themes"


def _console(args: argparse.Namespace) -> int:
    from corral.console.app import create_app

    backend = _backend(args, lasting=True)
    console = backend.settings.console
    try:
        create_app(backend, theme=console.theme, keymap=console.keymap, themes_dir=_themes_dir(args)).run()
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _config_command(args: argparse.Namespace) -> int:
    """`corral reload` and `corral config ...`: ask a running server over its admin API."""
    import asyncio
    import os

    from corral.backend.remote import RemoteBackend

    async def talk() -> int:
        async with RemoteBackend(args.url, api_key=args.api_key or os.environ.get("CORRAL_API_KEY") or None) as remote:
            if args.command == "reload":
                _print_version(await remote.reload_config("cli"))
            elif args.config_command == "history":
                for version in await remote.config_versions():
                    _print_version(version)
            elif args.config_command == "show":
                text = await remote.config_text(args.number)
                print(text if text is not None else "# (no config file: defaults and environment only)")
            else:
                _print_version(await remote.rollback_config(args.number, "cli"))
        return 0

    return asyncio.run(talk())


def _print_version(version: Any) -> None:
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(version.applied_at))
    print(f"version {version.number}  {when}  {version.source}")
    for line in version.diff or ("(no changes)",):
        print(f"    {line}")
    for line in version.actions:
        print(f"    -> {line}")
