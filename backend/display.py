"""Tables of models, status and events for Jupyter (`_repr_html_`) and Rich (`__rich__`).

A notebook shows `await backend.status()` as tables rather than a page of dataclass repr.
The HTML is plain strings with every value escaped (a model name or an error message comes
from files and servers); Rich is imported only when Rich itself asks for a renderable, so it
is installed then, and the backend still never imports Textual.

snapshot.py and events.py take their display methods from here, so this module reads their
types only when it renders.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .memory import format_bytes

if TYPE_CHECKING:
    from .events import Event
    from .snapshot import ModelInfo, Status

# Fields every event has: shown in their own columns, so the details column lists the rest.
_EVENT_COMMON = frozenset({"seq", "ts", "model", "request_id", "session_id"})


@dataclass(frozen=True)
class Table:
    """One table as text cells: what both renderings are made from."""

    columns: tuple[str, ...]  # all empty: a table of label/value rows, shown without a header
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns) if any(self.columns) else ""
        head = f"<thead><tr>{head}</tr></thead>" if head else ""
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                       for row in self.rows)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f'<table class="corral">{caption}{head}<tbody>{body}</tbody></table>'

    def rich(self) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(*self.columns, title=self.caption or None, show_header=any(self.columns))
        for row in self.rows:
            table.add_row(*row)
        return table


def repr_html(obj: Any) -> str:
    """`_repr_html_` of ModelInfo, Status, Event, ModelTable and EventLog."""
    return "".join(table.html() for table in tables(obj))


def rich_renderable(obj: Any) -> Any:
    """`__rich__` of the same objects: one Rich table, or a group of them."""
    from rich.console import Group

    rendered = [table.rich() for table in tables(obj)]
    return rendered[0] if len(rendered) == 1 else Group(*rendered)


class ModelTable(list["ModelInfo"]):
    """A list of models that Jupyter and Rich show as one table: `ModelTable(await backend.models())`."""

    _repr_html_ = repr_html
    __rich__ = rich_renderable


class EventLog(list["Event"]):
    """A list of events that Jupyter and Rich show as one table, oldest first."""

    _repr_html_ = repr_html
    __rich__ = rich_renderable


def tables(obj: Any) -> list[Table]:
    """The tables that show `obj`."""
    from .events import Event
    from .snapshot import ModelInfo, Status

    if isinstance(obj, Status):
        return [host_table(obj), model_table(obj.models)]
    if isinstance(obj, ModelInfo):
        return [model_details(obj)]
    if isinstance(obj, Event):
        return [event_table([obj])]
    if isinstance(obj, ModelTable):
        return [model_table(obj)]
    if isinstance(obj, EventLog):
        return [event_table(obj)]
    raise TypeError(f"corral has no table for {type(obj).__name__}")


def model_table(models: Iterable[ModelInfo]) -> Table:
    """One row a model: what `corral models` and the console's models table show."""
    rows = tuple((m.name, m.source, m.state if m.usable else f"unusable: {m.error}", m.architecture or "-",
                  m.quantization or "-", _millions(m.parameters), format_bytes(m.file_size), str(m.n_ctx),
                  _memory(m), str(m.in_flight), _number(m.tokens_per_s or None, "{:.1f}"),
                  "yes" if m.pinned else "")
                 for m in models)
    return Table(("model", "source", "state", "arch", "quant", "params", "size", "n_ctx", "memory", "in flight",
                  "tok/s", "pinned"), rows, "models")


def model_details(model: ModelInfo) -> Table:
    """One model as field/value rows, with what the models table has no room for."""
    rows = [("state", model.state), ("source", model.source), ("path", model.path or "-"),
            ("architecture", model.architecture or "-"), ("quantization", model.quantization or "-"),
            ("parameters", _millions(model.parameters)), ("file size", format_bytes(model.file_size)),
            ("context", f"{model.n_ctx} (trained {model.context_length or '?'}), {model.n_parallel} slots"),
            ("memory", f"estimate {format_bytes(model.estimate_bytes)}, measured {format_bytes(model.measured_bytes)}"),
            ("requests", f"{model.active} active, {model.queued} queued"),
            ("pinned", "yes" if model.pinned else "no"),
            ("chat template", model.chat_template or "-")]
    if model.alias_of:
        rows.append(("alias of", model.alias_of))
    if model.short_name:
        rows.append(("short name", model.short_name))
    if model.error:
        rows.append(("error", model.error))
    return Table(("field", "value"), tuple(rows), model.name)


def host_table(status: Status) -> Table:
    """The host and the budgets, one row a figure, as the console's header shows them."""
    host = status.host
    loaded = sum(1 for m in status.models if m.loaded)
    rows = [("CPU", f"{host.cpu_percent:.0f} % of {host.cpu_count} threads ({host.physical_cores} cores)"),
            ("RAM", f"{format_bytes(host.ram_used)} used of {format_bytes(host.ram_total)}"),
            ("corral process", format_bytes(host.process_rss)),
            ("model memory", f"{format_bytes(status.ram_reserved)} of a {format_bytes(status.ram_budget)} budget"),
            ("loaded models", f"{loaded} of at most {status.max_loaded}")]
    rows += [(f"GPU {g.index}", f"{g.name}: {_number(g.util_percent, '{:.0f} %')} busy, "
                                f"{format_bytes(g.mem_used)} of {format_bytes(g.mem_total)}")
             for g in host.gpus]
    if not host.gpus:
        rows.append(("GPU", host.gpu_note or "none"))
    return Table(("", ""), tuple(rows), "host")


def event_table(events: Sequence[Event]) -> Table:
    """One row an event; the fields particular to its type go in one details column."""
    rows = tuple((str(e.seq or ""), _clock(e.ts), e.type, e.model or "", e.request_id or "", _details(e))
                 for e in events)
    return Table(("seq", "time", "type", "model", "request", "details"), rows, "events")


def _details(event: Event) -> str:
    parts = []
    for field in fields(event):
        value = getattr(event, field.name)
        if field.name in _EVENT_COMMON or value is None or value == "" or value == ():
            continue
        if isinstance(value, float):
            value = f"{value:.3g}"
        elif isinstance(value, tuple):
            value = "; ".join(map(str, value))
        parts.append(f"{field.name}={value}")
    return " ".join(parts)


def _clock(ts: float) -> str:
    """Local wall-clock time with milliseconds (events come seconds apart at most)."""
    if not ts:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def _memory(model: ModelInfo) -> str:
    """Measured memory once loaded, else the estimate marked with a tilde."""
    if model.measured_bytes is not None:
        return format_bytes(model.measured_bytes)
    return f"~{format_bytes(model.estimate_bytes)}" if model.estimate_bytes is not None else "-"


def _millions(count: int | None) -> str:
    """Parameters as `corral models` gives them: 268M (and 120K for a tiny test model)."""
    if not count:
        return "-"
    return f"{count / 1e6:.0f}M" if count >= 1e6 else f"{count / 1e3:.0f}K"


def _number(value: float | None, pattern: str) -> str:
    return pattern.format(value) if value is not None else "-"
