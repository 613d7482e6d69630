"""Widgets of the console: gauges and sparklines, the models table, the queue panel and the
event log."""

from .event_log import EventLog
from .gauges import Gauge, Trend
from .models_table import ModelsTable
from .queue_panel import QueuePanel

__all__ = ["EventLog", "Gauge", "ModelsTable", "QueuePanel", "Trend"]
