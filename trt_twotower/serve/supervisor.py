"""Keep a tritonserver serving through the death of any of its processes.

Every piece of serving state (each sequence's caches, the orchestrator's requests) lives in the
Python backend stubs, one process per model instance. Triton does not bring a dead stub back:
its model keeps answering "ready" while every request to it fails, and requests waiting on it
hang. So the supervisor treats the death of tritonserver or of any stub as the death of the
whole server: it kills the process group at once (clients' streams end with an error instead of
hanging, and readiness answers nothing, i.e. "not ready", until the server is back), then
starts tritonserver again on the same ports and the same rendered repository, which rebuilds
every stub and cache from scratch. A fault after ``MAX_RESTARTS`` restarts within ``WINDOW_S``
(restarts that fail, or servers that keep dying) is a crash loop: it stops the server and gives
up with one line saying why."""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Callable, Optional

from .server import ServerError, TritonServer, exit_cause

WAKE_S = 0.5  # how often the watch also rereads /proc, should a process give no pidfd
READY_TIMEOUT_S = 60.0  # a restart ready later than this counts as failed
MAX_RESTARTS, WINDOW_S = 5, 120.0  # a fault after this many restarts in the window: a crash loop
RETRY_PAUSE_S = 1.0  # between a failed restart and the next


def _warn(line: str) -> None:
    logging.getLogger(__name__).warning(line)


def _clock() -> str:
    return datetime.now(timezone.utc).strftime("%H:%M:%S.%f")[:-3] + " UTC"


class Supervisor:
    """Watches one started ``TritonServer`` from a thread of its own; ``stop`` ends the watch
    and the server. ``report`` gets one line per fault and per recovery; ``failure`` is the
    one-line cause once it has given up (the server is stopped then)."""

    def __init__(self, server: TritonServer, report: Callable[[str], None] = _warn,
                 max_restarts: int = MAX_RESTARTS, window_s: float = WINDOW_S,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.server = server
        self.report = report
        self.max_restarts, self.window_s = max_restarts, window_s
        self.ready_timeout_s = ready_timeout_s
        self.models = Counter(server.stubs.values())  # the stubs every start must have
        self.restarts: list[float] = []  # monotonic times of the restarts in the window
        self.recoveries = 0
        self.failure: Optional[str] = None
        self._lock = threading.Lock()  # a stop and a restart never replace the process at once
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> Optional[int]:
        """End the watch and stop the server (a restart under way is cut short); returns the
        server's exit code."""
        self._closing.set()
        with self._lock:
            code = self.server.stop()
        self._thread.join()
        return code

    def _run(self) -> None:
        while not self._closing.is_set():
            fault = self._next_fault()
            if fault is None or not self._recover(fault):
                return

    def _next_fault(self) -> Optional[str]:
        """Block until tritonserver or one of its stubs is gone, and say which; None once
        closing. pidfds wake the watch the moment a process exits; /proc decides."""
        missing = sorted((self.models - Counter(self.server.stubs.values())).elements())
        if missing:
            return f"no Python stub of model {', '.join(missing)} ran after the restart"
        process = self.server.process
        watched = {}
        for pid in (process.pid, *self.server.stubs):
            try:
                watched[os.pidfd_open(pid)] = pid
            except OSError:
                pass  # already gone (found below), or no pidfds: the periodic reread finds it
        poller = select.poll()
        for fd in watched:
            poller.register(fd, select.POLLIN)
        try:
            while not self._closing.is_set():
                if process.poll() is not None:
                    return exit_cause(process, self.server.log)
                dead = self.server.dead_stubs()
                if dead:
                    return "; ".join(f"the Python stub of model {model} (pid {pid}) died"
                                     for pid, model in sorted(dead.items()))
                poller.poll(WAKE_S * 1000)
            return None
        finally:
            for fd in watched:
                os.close(fd)

    def _recover(self, fault: str) -> bool:
        """Kill the broken server now, then restart it until one start is ready; False when
        closing or after giving up."""
        began, detected = time.monotonic(), _clock()
        with self._lock:
            if self._closing.is_set():
                return False
            self.server.stop(graceful=False)
        self.report(f"fault at {detected}: {fault}; restarting tritonserver on "
                    f"{self.server.grpc_url}")
        while True:
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < self.window_s]
            if len(self.restarts) >= self.max_restarts:
                return self._give_up(fault)
            self.restarts.append(now)
            try:
                self._restart()
            except ServerError as err:
                if self._closing.is_set():
                    return False
                fault = f"the restart failed: {err}"
                self.report(f"fault at {_clock()}: {fault}")
                if self._closing.wait(RETRY_PAUSE_S):
                    return False
                continue
            if self._closing.is_set():
                return False
            self.recoveries += 1
            self.report(f"recovered at {_clock()}: tritonserver ready again on "
                        f"{self.server.grpc_url} {time.monotonic() - began:.1f} s after the "
                        f"fault (restart {self.recoveries})")
            return True

    def _restart(self) -> None:
        with self._lock:
            if self._closing.is_set():
                raise ServerError("stopped while restarting")
            self.server.launch()
        self.server.wait_ready(self.ready_timeout_s)

    def _give_up(self, fault: str) -> bool:
        with self._lock:
            self.server.stop(graceful=False)
        log = "" if str(self.server.log) in fault else f" (log: {self.server.log})"
        self.failure = (f"gave up restarting tritonserver: it failed {len(self.restarts) + 1} "
                        f"times within {self.window_s:.0f} s, last: {fault}{log}")
        return False
