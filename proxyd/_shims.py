# Temporary: replaced by proxyd.policy.store and proxyd.sdnotify when they land.
from typing import Any
from types import SimpleNamespace
from proxyd.context import ALLOWED


class _L4:
    allowed = True
    audit = False
    reason = ""
    policy_name = None


class _View:
    def l4(self) -> Any:
        return _L4()

    def decide(self, request: Any) -> Any:
        return ALLOWED


class PolicyStore:
    revision = 0

    def __init__(self, *a: Any) -> None:
        pass

    def view(self, *a: Any) -> Any:
        return _View()

    def reload_files(self) -> int:
        return 0

    def watch_mtimes(self) -> bool:
        return False

    def adopt_revision(self, r: int) -> None:
        pass


sdnotify = SimpleNamespace(notify=lambda *a: False, notify_reloading=lambda: False, watchdog_interval=lambda: None)
