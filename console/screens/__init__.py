"""Screens of the console: the dashboard, and the modal confirm and help screens."""

from .confirm import ConfirmScreen
from .dashboard import DashboardScreen
from .help import HelpScreen

__all__ = ["ConfirmScreen", "DashboardScreen", "HelpScreen"]
