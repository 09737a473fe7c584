"""sd_notify(3): readiness, status, reloading, stopping and watchdog messages to systemd."""

import os
import socket
import threading
import time


class Notifier:
    """Sends to $NOTIFY_SOCKET; does nothing when systemd did not give one."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address or None
        self.watchdog_interval = self._watchdog_interval(environ)
        # Made once: the watchdog thread and the main loop both send on it.
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) \
            if self.address else None

    @staticmethod
    def _watchdog_interval(environ):
        """Half of WatchdogSec=, as sd_watchdog_enabled(3) advises; None when off."""
        pid = environ.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None
        try:
            usec = int(environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None

    def send(self, **fields):
        if self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, self.address)
        except OSError:
            pass  # systemd gone (shutdown) or socket not ours: nothing useful to do

    def ready(self, status):
        self.send(READY=1, STATUS=status)

    def status(self, status):
        self.send(STATUS=status)

    def reloading(self):
        self.send(RELOADING=1, STATUS="reloading the configuration")

    def stopping(self, status="stopping"):
        self.send(STOPPING=1, STATUS=status)

    def watchdog(self):
        if self.watchdog_interval is not None:
            self.send(WATCHDOG=1)


class Watchdog:
    """Pings systemd's watchdog from a thread for as long as the main loop's lease runs.

    The main loop renews the lease before each step that may block (waiting for a
    trigger, a Docker request, a netlink change), for as long as that step may take.
    A slow but answering engine therefore never gets the daemon killed, while a loop
    stuck past its lease stops the pings and systemd restarts it.
    """

    def __init__(self, notifier, clock=time.monotonic):
        self.notifier = notifier
        self.clock = clock
        self._until = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def renew(self, seconds):
        self._until = max(self._until, self.clock() + seconds)

    def alive(self):
        return self.clock() < self._until

    def start(self):
        if self.notifier.watchdog_interval is not None:
            self.thread.start()

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.notifier.watchdog_interval / 2):
            if self.alive():
                self.notifier.watchdog()
