"""Screens of the console: the dashboard and the prompt screen, and the modal confirm,
details and help screens."""

from .confirm import ConfirmScreen
from .dashboard import DashboardScreen
from .details import DetailsScreen
from .help import HelpScreen
from .prompt import Conversation, PromptScreen

__all__ = ["ConfirmScreen", "Conversation", "DashboardScreen", "DetailsScreen", "HelpScreen",
           "PromptScreen"]
