"""The models table: one row per model the backend knows, refreshed in place.

`update_models` takes a fresh list of `ModelInfo` (from each status poll) and changes only
the cells whose text changed, so a 1 Hz refresh neither flickers nor moves the cursor; rows
are keyed by model name, so the cursor stays on the same model when rows come and go.
States are coloured through component classes that app.tcss styles with theme variables.

An alias (a virtual model over a base model's weights) is a row of its own, named
`alias → base`, that mirrors its base's state; a model read from another tool's store names
that store after its name (`llama3.2:3b · ollama`); a load waiting behind another load shows
as `waiting #N`, N being its place in the line.

The name column gives way first: a name longer than the room left beside the state, size,
quant and memory columns is cut with "…" (the store or base model after it kept while they
are short), so the state column, "loading 100%" included, is always whole at 80 columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

from corral.backend.snapshot import STORE_SOURCES, ModelInfo

from ..commands import COMMANDS_BY_ID
from .gauges import NA, component_style, format_ago, format_bytes, format_duration

STATES = ("available", "loading", "ready", "busy", "unloading", "failed", "waiting")

# (key, header, fixed width or None for auto)
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("name", "model", None),
    ("state", "state", 12),  # "loading 100%", "waiting #12"
    ("size", "size", 9),
    ("quant", "quant", 7),
    ("memory", "mem est/meas", 17),
    ("gpu", "placed", 10),
    ("pinned", "pin", 3),
    ("ttl", "TTL left", 8),
    ("load", "act/q", 5),
    ("tps", "tok/s", 6),
    ("last_used", "last used", 9),
)
COLUMN_KEYS = tuple(key for key, _, _ in COLUMNS)
KEPT_VISIBLE = ("state", "size", "quant", "memory")  # the columns a long name must not push away
NAME_MIN = 16  # the name column never gets narrower than this

_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def format_memory(estimate: int | None, measured: int | None) -> str:
    """`est/measured UNIT` in the larger figure's unit; `~est` before a load is measured."""
    if estimate is None and measured is None:
        return NA
    if measured is None:
        return f"~{format_bytes(estimate)}"
    if estimate is None:
        return format_bytes(measured)
    largest = max(estimate, measured)
    for unit, scale in _UNITS:
        if largest >= scale:
            return f"{estimate / scale:.1f}/{measured / scale:.1f} {unit}"
    return f"{estimate}/{measured} B"


def format_placement(model: ModelInfo) -> str | None:
    """Where a loaded model's layers went: `GPU0 14/33` (offloaded of all), `CPU`; None when
    it is not loaded. `GPU 20/33` is a forced offload on a GPU that NVML does not see."""
    if model.gpu_layers is None:
        return None
    if model.gpu_layers == 0:
        return "CPU"
    where = "GPU" if model.gpu is None else f"GPU{model.gpu}"
    return f"{where} {model.gpu_layers}/{model.gpu_layers_total}"


def is_waiting(model: ModelInfo) -> bool:
    """Whether `model`'s load waits for another load to finish (loads go one at a time)."""
    return model.load_position is not None and model.state in ("available", "failed")


def state_label(model: ModelInfo) -> str:
    if model.state == "loading" and model.load_percent is not None:
        return f"loading {model.load_percent}%"
    if is_waiting(model):
        return f"waiting #{model.load_position}"
    return model.state


def state_class(model: ModelInfo) -> str:
    """The component class suffix that colours `model`'s state."""
    return "waiting" if is_waiting(model) else model.state


def backing_models(models: Iterable[ModelInfo]) -> list[ModelInfo]:
    """The models that hold weights of their own. Aliases mirror their base model's state,
    queue and requests, so counting them too would count each load twice."""
    return [m for m in models if m.alias_of is None]


_PROMPT = COMMANDS_BY_ID["corral.prompt"]


class ModelsTable(DataTable[Text]):
    """A DataTable of `ModelInfo`, keyed by model name.

    The table's own enter (select the row, which opens the prompt screen) shadows the
    dashboard's binding of the same key, and the footer shows the focused widget's bindings
    first: so the table carries the prompt command's key, name and id (a keymap remaps both),
    and the prompt key leads the footer where it always fits, 80 columns included."""

    BINDINGS = [Binding(_PROMPT.key, "select_cursor", _PROMPT.description, id=_PROMPT.id,
                        tooltip=_PROMPT.help)]

    COMPONENT_CLASSES = DataTable.COMPONENT_CLASSES | {
        *(f"models-table--{state}" for state in STATES),
        "models-table--muted",
        "models-table--pinned",
        "models-table--name",
        "models-table--alias",
        "models-table--store",
    }

    def __init__(self, *, clock: Callable[[], float] = time.time, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self.clock = clock
        self.filter_text = ""
        self._all: dict[str, ModelInfo] = {}  # every model the backend listed, in its order
        self._models: dict[str, ModelInfo] = {}  # the rows shown: those the filter lets through
        self._cells: dict[str, dict[str, Text]] = {}
        self._name_room: int | None = None  # cells the name column may take; None: no size yet

    def on_mount(self) -> None:
        for key, header, width in COLUMNS:
            self.add_column(header, key=key, width=width)

    def on_resize(self) -> None:
        room = self.name_room()
        if room != self._name_room:
            self._name_room = room
            self._rebuild(self.models)  # add_row measures the columns again; update_cell does not

    def name_room(self) -> int | None:
        """How wide the name column may be so the KEPT_VISIBLE columns stay in view."""
        width = self.scrollable_content_region.width
        if width <= 0:
            return None
        others = sum(w + 2 * self.cell_padding for key, _, w in COLUMNS if key in KEPT_VISIBLE and w)
        return max(NAME_MIN, width - others - 2 * self.cell_padding)

    # -- reading -----------------------------------------------------------------------------

    @property
    def models(self) -> list[ModelInfo]:
        """The models shown, in row order."""
        return list(self._models.values())

    @property
    def all_models(self) -> list[ModelInfo]:
        """Every model, the filtered-out ones too."""
        return list(self._all.values())

    def matches(self, model: ModelInfo) -> bool:
        """Whether the filter lets `model` through (case-insensitive, in name, state, quant or source)."""
        needle = self.filter_text.strip().lower()
        haystack = (f"{model.name} {model.alias_of or ''} {state_label(model)} {model.quantization or ''} "
                    f"{model.source}").lower()
        return not needle or needle in haystack

    @property
    def selected(self) -> ModelInfo | None:
        """The model under the cursor, or None when the table is empty."""
        if not self._models or self.row_count == 0:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return self._models.get(str(row_key.value))

    def cell_text(self, name: str, column: str) -> str:
        """The plain text shown in one cell (for tests and the help screen)."""
        return self._cells[name][column].plain

    def select(self, name: str) -> None:
        """Move the cursor to the row of model `name`."""
        try:
            self.move_cursor(row=self.get_row_index(name), animate=False)
        except RowDoesNotExist:
            pass

    # -- updating ----------------------------------------------------------------------------

    def set_filter(self, text: str) -> None:
        """Show only the models matching `text` ("" shows all)."""
        if text != self.filter_text:
            self.filter_text = text
            self.update_models(self.all_models)

    def update_models(self, models: Iterable[ModelInfo]) -> None:
        """Show `models` (through the filter): changed cells are updated in place; the cursor
        follows its model."""
        self._all = {m.name: m for m in models}
        models = [m for m in self._all.values() if self.matches(m)]
        names = [m.name for m in models]
        if names != list(self._models):
            self._rebuild(models)
            return
        for model in models:
            self._models[model.name] = model
            self._render_row(model)

    def patch(self, name: str, **changes: Any) -> None:
        """Change fields of one model's row, and of its aliases' rows, before the next poll
        brings the backend's word on them (load progress arrives as events, a poll would be
        slower; events name the base model only)."""
        for model in [m for m in self._all.values() if name in (m.name, m.alias_of)]:
            model = replace(model, **changes)
            self._all[model.name] = model
            if model.name in self._models:
                self._models[model.name] = model
                self._render_row(model)

    def restyle(self) -> None:
        """Render every row again (after a theme change, or to move 'last used' on)."""
        self._rich_style_cache.clear()
        for model in self._models.values():
            self._render_row(model, force=True)

    def _rebuild(self, models: list[ModelInfo]) -> None:
        selected = self.selected
        keep = selected.name if selected is not None else None
        self.clear()
        self._models = {m.name: m for m in models}
        self._cells = {}
        for model in models:
            cells = self._cells_for(model)
            self._cells[model.name] = cells
            self.add_row(*(cells[key] for key in COLUMN_KEYS), key=model.name)
        if keep is not None and keep in self._models:
            self.select(keep)
        # DataTable paints the rows that fit its first, smaller region before its auto-width
        # name column has grown, and keeps those lines in its render caches, whose keys do not
        # hold the column widths (seen with Textual 8.2): once the new layout has settled,
        # drop them and repaint the whole table.
        self.call_after_refresh(self._repaint)

    def _repaint(self) -> None:
        self._clear_caches()
        self.refresh()

    def _render_row(self, model: ModelInfo, *, force: bool = False) -> None:
        old = self._cells.get(model.name, {})
        new = self._cells_for(model)
        self._cells[model.name] = new
        for key in COLUMN_KEYS:
            if force or old.get(key) != new[key]:
                self.update_cell(model.name, key, new[key])

    # -- rendering ---------------------------------------------------------------------------

    def _style(self, component: str) -> Any:
        return component_style(self, f"models-table--{component}")

    def _cells_for(self, m: ModelInfo) -> dict[str, Text]:
        muted = self._style("muted")
        loaded = m.state in ("ready", "busy")
        state = state_class(m)
        state_style = self._style(state) if state in STATES else muted
        if m.ttl_left_s is not None:
            ttl = Text(format_duration(m.ttl_left_s))
        elif loaded and (m.pinned or m.keep_alive_s < 0):
            ttl = Text("∞", muted)
        else:
            ttl = Text(NA, muted)
        load = Text(f"{m.active}/{m.queued}") if loaded else Text(NA, muted)
        tps = Text(f"{m.tokens_per_s:.1f}") if m.tokens_per_s else Text(NA, muted)
        memory_style = None if m.measured_bytes is not None else muted
        return {
            "name": self._name_cell(m),
            "state": Text(state_label(m), state_style),
            "size": Text(format_bytes(m.file_size) if m.file_size is not None else NA),
            "quant": Text(m.quantization or NA),
            "memory": Text(format_memory(m.estimate_bytes, m.measured_bytes), memory_style),
            "gpu": Text(format_placement(m) or NA, None if m.gpu_layers is not None else muted),
            "pinned": Text("●" if m.pinned else "", self._style("pinned")),
            "ttl": ttl,
            "load": load,
            "tps": tps,
            "last_used": Text(format_ago(m.last_used, self.clock()),
                              None if m.last_used is not None else muted),
        }

    def _name_cell(self, m: ModelInfo) -> Text:
        """The name; an alias names its base model too (`alias → base`), a model from another
        tool's store that store (`name · ollama`). Cut to the name column's room: the name
        gives way before a short suffix does."""
        suffix = Text()
        if m.alias_of:
            suffix.append(f" → {m.alias_of}", self._style("alias"))
        elif m.source in STORE_SOURCES:
            suffix.append(f" · {m.source}", self._style("store"))
        room = self._name_room
        name = Text(m.name, self._style("name"))
        if room is not None and name.cell_len + suffix.cell_len > room and suffix.cell_len <= room // 2:
            name.truncate(room - suffix.cell_len, overflow="ellipsis")
        name.append_text(suffix)
        if room is not None:
            name.truncate(room, overflow="ellipsis")
        return name
