"""Start the operator: logging, scope (namespaces or the whole cluster), peering, liveness, then kopf.

`run_operator` is what `distillery run` calls (blocking, until SIGINT/SIGTERM: kopf stops watching, lets
running handlers finish, then returns). `operate` is the same as a coroutine with stop/ready flags, for
the demo, the benchmark and the integration tests, which run it in-process against an emulator.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from typing import Any

import kopf

from . import handlers
from .settings import OperatorSettings

log = logging.getLogger(__name__)


def configure_logging(settings: OperatorSettings) -> None:
    kopf.configure(
        debug=settings.log_level == "DEBUG",
        verbose=settings.log_level in ("DEBUG", "INFO"),
        quiet=settings.log_level in ("WARNING", "ERROR"),
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
        log_refkey="object" if settings.log_format == "json" else None,
    )
    logging.getLogger().setLevel(settings.log_level)


def scope(
    settings: OperatorSettings, namespaces: list[str] | None, all_namespaces: bool
) -> tuple[bool, list[str]]:
    """(clusterwide, namespaces): the CLI wins over DISTILLERY_NAMESPACES; nothing named means all."""
    if all_namespaces:
        return True, []
    chosen = list(namespaces or settings.namespaces)
    return (not chosen), chosen


def build_registry(settings: OperatorSettings, login: kopf.ConnectionInfo | None = None) -> kopf.OperatorRegistry:
    """A fresh registry with every handler; `login` pins the API server (tests, demo), else kubeconfig/in-cluster."""
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    if login is not None:

        async def fixed_login(**_: Any) -> kopf.ConnectionInfo:
            return login

        kopf.on.login(registry=registry)(fixed_login)
    else:
        kopf.on.login(registry=registry)(kopf.login_via_client)
    return registry


def peering_priority(settings: OperatorSettings) -> int:
    """This replica's kopf peering priority: the highest one handles objects, the others stand by.

    kopf pauses *every* replica when two share a priority, so replicas of one Deployment (identical
    settings) must not share one: unless pinned by DISTILLERY_PEERING_PRIORITY, each process draws its own.
    """
    if settings.peering_priority is not None:
        return settings.peering_priority
    return secrets.randbelow(1_000_000) + 1


async def operate(
    settings: OperatorSettings,
    *,
    namespaces: list[str] | None = None,
    all_namespaces: bool = False,
    standalone: bool = False,
    login: kopf.ConnectionInfo | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the operator in the current event loop until `stop_flag` is set (or a signal arrives)."""
    clusterwide, names = scope(settings, namespaces, all_namespaces)
    standalone = standalone or settings.standalone
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    log.info(
        "watching %s%s", "all namespaces" if clusterwide else ", ".join(names),
        " (standalone)" if standalone else f" (peering {settings.peering_name})",
    )
    await kopf.operator(
        registry=build_registry(settings, login),
        clusterwide=clusterwide,
        namespaces=names,
        standalone=standalone,
        peering_name=None if standalone else settings.peering_name,
        priority=peering_priority(settings),
        liveness_endpoint=liveness,
        memo=kopf.Memo(config=settings),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def run_operator(
    settings: OperatorSettings, namespaces: list[str] | None, all_namespaces: bool, standalone: bool
) -> None:
    """`distillery run`: block until SIGINT/SIGTERM (kopf installs the signal handlers)."""
    configure_logging(settings)
    asyncio.run(operate(settings, namespaces=namespaces, all_namespaces=all_namespaces, standalone=standalone))


class OperatorThread:
    """The operator in a thread with its own event loop (the demo, the tests): kopf cancels every task
    created in its loop after it started when it stops, so it must not share a loop with the caller."""

    def __init__(
        self, settings: OperatorSettings, login: kopf.ConnectionInfo, *, all_namespaces: bool = True,
        namespaces: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self._kwargs: dict[str, Any] = dict(
            namespaces=namespaces, all_namespaces=all_namespaces, standalone=True, login=login
        )
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> None:
        ready = threading.Event()
        self._stop = threading.Event()

        def main() -> None:
            try:
                asyncio.run(operate(self.settings, stop_flag=self._stop, ready_flag=ready, **self._kwargs))
            except BaseException as exc:  # surfaced by stop()
                self.error = exc
                ready.set()

        self._thread = threading.Thread(target=main, name="distillery-operator", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"the operator did not start: {self.error!r}")

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        alive, self._thread = self._thread.is_alive(), None
        if alive:
            raise RuntimeError(f"the operator did not stop within {timeout} s")
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise RuntimeError("the operator failed") from self.error
