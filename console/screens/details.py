"""A model's details: its metadata, where it came from (a folder, the config, another tool's
store, with what that store gives beside the file), memory estimate next to the measured
figure, load time, and the TTFT / latency percentiles of its recent requests.

A modal over the dashboard that redraws from the app's `status_signal`, so the figures move
while it is open (a load finishing, requests coming in) without a call of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from corral.backend.errors import CorralError

from ..commands import DETAILS, bindings_for
from ..widgets.gauges import NA, format_bytes, format_duration
from ..widgets.models_table import state_label
from .logs import LogScreen

if TYPE_CHECKING:
    from corral.backend.snapshot import LoadPlan, ModelInfo, RequestPercentiles, Status

    from ..app import CorralApp


def format_seconds(seconds: float | None) -> str:
    """A latency: milliseconds below a second ("48 ms"), else seconds ("1.31 s")."""
    if seconds is None:
        return NA
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_count(n: int | None) -> str:
    """A parameter count: 268M, 1.5B."""
    if n is None:
        return NA
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


SERVES = {  # ModelInfo.kind, as a person reads it
    "chat": "chat and completions (and embeddings)",
    "embedding": "embeddings only: POST /v1/embeddings, ollama /api/embed",
    "rerank": "reranking only: POST /v1/rerank",
}


def metadata_rows(m: ModelInfo) -> list[tuple[str, str]]:
    keep = "never expires" if m.keep_alive_s < 0 else format_duration(m.keep_alive_s)
    rows = [
        ("state", state_label(m) + ("  (pinned)" if m.pinned else "")),
        ("file", m.path or NA),
        ("source", f"alias of {m.alias_of}" if m.alias_of else m.source),
        *([("short name", m.short_name)] if m.short_name else []),
        ("architecture", m.architecture or NA),
        *([("serves", SERVES.get(m.kind, m.kind))] if m.kind else []),
        ("parameters", format_count(m.parameters)),
        ("quantization", m.quantization or NA),
        ("file size", format_bytes(m.file_size)),
        ("context", f"{m.n_ctx} loaded (trained {m.context_length or NA}), {m.n_parallel} slots, "
                    f"KV cache {m.kv_types}"),
        ("chat template", m.chat_template or "chosen at load"),
        ("keep alive", keep),
        ("priority", str(m.priority)),
    ]
    if m.error:
        rows.append(("error", m.error))
    rows += [("not used", f"{clash.source} {clash.path or NA}: {clash.reason}") for clash in m.clashes]
    return rows


def store_rows(m: ModelInfo) -> list[tuple[str, str]]:
    """What the model's store keeps beside its file (an ollama manifest): its params, the
    defaults corral takes from them, its system prompt and its prompt template (shown; chats
    use the GGUF's)."""
    store = m.store
    if store is None:
        return []

    def listed(values: dict[str, object]) -> str:
        return ", ".join(f"{key} {value}" for key, value in values.items()) or "none"

    return [("manifest", store.manifest), ("params", listed(store.params)), ("defaults", listed(store.defaults)),
            ("system prompt", store.system or "none"), ("template", store.template or "none")]


def memory_rows(m: ModelInfo) -> list[tuple[str, str]]:
    detail = m.estimate_detail or {}
    parts = ", ".join(f"{key.replace('_', ' ')} {format_bytes(value)}"
                      for key, value in detail.items() if key != "total")
    estimate = format_bytes(m.estimate_bytes) + (f"  ({parts})" if parts else "")
    rows = [("estimate", estimate), ("measured", format_bytes(m.measured_bytes))]
    if m.parked_bytes:
        rows.append(("parked KV", f"{format_bytes(m.parked_bytes)} (idle conversations beside the cache)"))
    if m.measured_bytes is not None and m.estimate_bytes:
        rows.append(("measured/est.", f"{m.measured_bytes / m.estimate_bytes:.0%}"))
    if m.measured_vram:
        rows.append(("VRAM", ", ".join(f"GPU{i} {format_bytes(v)}" for i, v in sorted(m.measured_vram.items()))))
    rows.append(("load time", format_seconds(m.load_seconds)))
    return rows


def request_rows(stats: RequestPercentiles | None) -> list[tuple[str, str]]:
    if stats is None:
        return [("requests", "none yet")]

    def trio(p50: float | None, p90: float | None, p99: float | None) -> str:
        return "  ".join(f"{label} {format_seconds(v)}" for label, v in (("p50", p50), ("p90", p90), ("p99", p99)))

    speed = NA if stats.tokens_per_s_p50 is None else f"{stats.tokens_per_s_p50:.1f} tok/s (median)"
    return [
        ("requests", f"last {stats.count}"),
        ("TTFT", trio(stats.ttft_p50, stats.ttft_p90, stats.ttft_p99)),
        ("latency", trio(stats.latency_p50, stats.latency_p90, stats.latency_p99)),
        ("speed", speed),
    ]


def plan_rows(m: ModelInfo, plan: LoadPlan | str | None) -> list[tuple[str, str]]:
    """The dry run of loading it (`corral plan`): whether it fits, what it would evict, what
    would make it fit. For a loaded model, what loading it again would take."""
    if plan is None:
        return [("plan", "working it out…")]
    if isinstance(plan, str):
        return [("plan", plan)]
    left = plan.ram_budget - plan.ram_reserved
    if plan.fits:
        verdict = ("fits, after evicting " + ", ".join(f"{e.model} ({format_bytes(e.bytes)})" for e in plan.evictions)
                   if plan.evictions else "fits without evicting anything")
    else:
        verdict = f"does not fit: {plan.refusal}"
    rows = [("if loaded again" if m.state in ("ready", "busy", "loading") else "if loaded", verdict),
            ("needs", f"{format_bytes(plan.ram_bytes)} RAM" + (f", {format_bytes(plan.vram_bytes)} VRAM on GPU "
                                                               f"{plan.gpu}" if plan.vram_bytes else "")),
            ("budget left", f"{format_bytes(left)} of {format_bytes(plan.ram_budget)} "
                            f"({plan.loaded} other model(s) loaded, max {plan.max_loaded})")]
    rows += [("waits for", name) for name in plan.waits_for]
    if plan.suggestions:
        rows.append(("would fit with", "; ".join(plan.suggestions)))
    return rows


def details_table(m: ModelInfo, plan: LoadPlan | str | None = None) -> Table:
    """Sections of label/value rows, the labels in the theme's secondary colour."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for title, rows in (("model", metadata_rows(m)), ("store", store_rows(m)), ("memory", memory_rows(m)),
                        ("load plan", plan_rows(m, plan) if m.usable else []),
                        ("recent requests", request_rows(m.requests))):
        if not rows:
            continue
        table.add_row(Text(title, style="underline"), "")
        for label, value in rows:
            table.add_row(label, Text(value))
        table.add_row("", "")
    return table


class DetailsScreen(ModalScreen[None]):
    """The details of one model, kept current while open; `l` opens its log view."""

    SCOPE = DETAILS
    BINDINGS = [
        Binding("escape,q,d", "close", "Close", id="corral.details.close"),
        *bindings_for(DETAILS),
    ]

    def __init__(self, model: ModelInfo) -> None:
        super().__init__(classes="dialog")
        self.model = model
        self.plan: LoadPlan | str | None = None
        self._planned_for: tuple[tuple[str, str], ...] | None = None  # the models' states the plan saw

    @property
    def corral(self) -> CorralApp:
        return cast("CorralApp", self.app)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="details-box", classes="dialog-box") as box:
            box.border_title = self.model.name
            box.border_subtitle = "l: llama.cpp log · esc to close"
            yield Static(details_table(self.model, self.plan), id="details-body")

    def on_mount(self) -> None:
        self.corral.status_signal.subscribe(self, self.apply_status)
        self.query_one("#details-box").focus()
        if self.model.usable:
            self.refresh_plan()

    def apply_status(self, status: Status) -> None:
        model = next((m for m in status.models if m.name == self.model.name), None)
        if model is not None and model != self.model:
            self.model = model
            self._redraw()
        states = tuple((m.name, m.state) for m in status.models)
        if self._planned_for is not None and states != self._planned_for and self.model.usable:
            self.refresh_plan()  # a load or an eviction changes what loading this one would take
        self._planned_for = states

    def _redraw(self) -> None:
        self.query_one("#details-body", Static).update(details_table(self.model, self.plan))

    @work(exclusive=True, group="plan")
    async def refresh_plan(self) -> None:
        try:
            self.plan = await self.corral.backend.plan(self.model.name)
        except CorralError as exc:
            self.plan = f"cannot plan: {exc.message}"
        self._redraw()

    def action_logs(self) -> None:
        self.app.push_screen(LogScreen(self.model))

    def action_close(self) -> None:
        self.dismiss(None)
