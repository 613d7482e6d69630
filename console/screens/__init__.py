"""Screens of the console: the dashboard, the prompt, config and requests screens, and the modal
confirm, details, log, help and pull screens."""

from .config import ConfigScreen
from .confirm import ConfirmScreen
from .dashboard import DashboardScreen
from .details import DetailsScreen
from .help import HelpScreen
from .logs import LogScreen
from .prompt import Conversation, PromptScreen
from .pull import PullScreen
from .requests import RequestsScreen

__all__ = ["ConfigScreen", "ConfirmScreen", "Conversation", "DashboardScreen", "DetailsScreen",
           "HelpScreen", "LogScreen", "PromptScreen", "PullScreen", "RequestsScreen"]
