"""Widgets of the console: gauges, the models table and the event log."""

from .event_log import EventLog
from .gauges import Gauge
from .models_table import ModelsTable

__all__ = ["EventLog", "Gauge", "ModelsTable"]
