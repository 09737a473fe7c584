"""The daemon's main loop: triggers in, reconciles out, systemd kept informed.

Threads (Docker events, netlink monitor) and signal handlers only put a trigger on a
queue; all the work happens here, in the main thread.

The state is small and explicit:
- `phase`: STARTING until every read of Docker answered once (then the configuration
  is judged, if every record could be read; nothing on the host changes before that),
  SERVING after;
- `stream`: the Docker event stream's state, from the watcher;
- `owed`: what must still be read from Docker (network ids, REFRESH_*);
- the Reconciler's `view`, replaced only piece by piece by reads that answered;
- one Backoff per thing retried (Docker reads, host changes), reset only by its own
  success.
"""

import gc
import logging
import queue
import signal
import time

from . import lifecycle
from . import log as log_mod
from .docker_source import REFRESH_ALL
from .errors import EX_CONFIG, EX_OK, ConfigError, PermissionDenied

log = logging.getLogger(__name__)

STOP, RELOAD, HOST, DOCKER, LOST = "stop", "reload", "host", "docker", "lost"
STARTING, SERVING = "starting", "serving"
# How long one pass of the loop may take outside Docker requests (which renew the
# watchdog lease themselves) before the watchdog may fire.
STEP_BUDGET = 20.0


class Backoff:
    """When to try one thing again: after `first` seconds, doubling up to `cap`."""

    def __init__(self, clock, first=1.0, cap=4.0):
        self.clock, self.first, self.cap = clock, first, cap
        self.delay = first
        self.due = None
        self.failures = 0

    def failed(self):
        self.due = self.clock() + self.delay
        self.delay = min(self.delay * 2, self.cap)
        self.failures += 1

    def succeeded(self):
        self.due, self.delay, self.failures = None, self.first, 0

    def ready(self):
        return self.due is not None and self.clock() >= self.due


class Daemon:
    def __init__(self, config_path, load_config, reconciler, notifier, watchdog, triggers,
                 watcher, monitor, docker_url, clock=time.monotonic):
        self.config_path = config_path
        self.load_config = load_config
        self.reconciler = reconciler
        self.notifier = notifier
        self.watchdog = watchdog
        self.triggers = triggers
        self.watcher = watcher
        self.monitor = monitor
        self.docker_url = docker_url
        self.clock = clock
        self.phase = STARTING
        self.stream = None            # None: not connected yet; else why it is lost, or "up"
        self.owed = {REFRESH_ALL}
        self.docker_retry = Backoff(clock)
        self.last_docker_error = None
        self.host_retry = Backoff(clock)
        self.ready_sent = False
        self.summary = None           # the last reconcile's one-line summary
        self.last_problems = ()
        self.next_resync = clock() + self.config.resync_interval

    @property
    def config(self):
        return self.reconciler.config

    @property
    def engine(self):
        """"Docker" or "Podman", for messages: who answers at DOCKER_HOST."""
        return self.reconciler.docker.engine

    def run(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.triggers.put((STOP, None)))
        signal.signal(signal.SIGHUP, lambda *_: self.triggers.put((RELOAD, None)))
        log.info("macvlan-router starting: %s at %s, configuration %s",
                 self.engine, self.docker_url, self.config_path)
        self.watchdog.renew(STEP_BUDGET)
        self.watchdog.start()
        self.watcher.start()
        self.monitor.start()
        status = None
        while status is None:
            status = self.step()
        return status

    def step(self):
        """Wait for triggers, act on them; returns an exit status to stop with, or None."""
        if self.phase is SERVING and self.triggers.empty():
            self._warm()
        kinds = self._wait()
        self.watchdog.renew(STEP_BUDGET)
        if STOP in kinds:
            return self._stop()
        if RELOAD in kinds:
            self._reload()
        if self.clock() >= self.next_resync:
            self.owed.add(REFRESH_ALL)
            self.reconciler.invalidate_host()
            self.next_resync = self.clock() + self.config.resync_interval
        host_changed = bool(kinds & {HOST, RELOAD}) or self.host_retry.ready()
        docker_changed = self._read_docker(fresh=bool(kinds & {DOCKER, RELOAD}))
        status = self._reconcile(docker_changed or host_changed)
        if RELOAD in kinds and status is None:
            # After the reconcile, so that `systemctl reload` returns on the new state.
            self.notifier.ready(self._status_text())
        return status

    def _wait(self):
        """Block for the next trigger or deadline, then take every trigger already queued."""
        deadlines = [self.next_resync] + [b.due for b in (self.docker_retry, self.host_retry)
                                          if b.due is not None]
        timeout = max(0.0, min(deadlines) - self.clock())
        self.watchdog.renew(timeout + STEP_BUDGET)
        items = []
        try:
            items.append(self.triggers.get(timeout=timeout))
            while True:
                items.append(self.triggers.get_nowait())
        except queue.Empty:
            pass
        kinds = set()
        for kind, arg in items:
            kinds.add(kind)
            if kind == DOCKER:
                self._stream_up()
                self.owed |= self.reconciler.owed_for(arg)
            elif kind == LOST:
                self._stream_lost(arg)
            elif kind == HOST:
                self.reconciler.host_changed()
        return kinds

    def _warm(self):
        try:
            self.reconciler.warm()
        except Exception as exc:  # noqa: BLE001 - only an optimisation; the reconcile reads again
            log.debug("could not read the host ahead of time: %s", exc)

    # Docker ---------------------------------------------------------------------------

    def _stream_up(self):
        if self.stream not in (None, "up"):
            log.info("connected to %s at %s again", self.engine, self.docker_url)
        self.stream = "up"

    def _stream_lost(self, message):
        if self.stream != message:
            log.warning("%s; waiting for it (routes stay as they are)", message)
        self.stream = message
        self._tell_systemd()

    def _read_docker(self, fresh):
        """Read what is owed, when the stream is up and a new trigger or the retry says so.
        True when the view may have changed."""
        if not self.owed or self.stream != "up":
            return False
        if self.docker_retry.due is not None and not (fresh or self.docker_retry.ready()):
            return False
        started, began = self.clock(), time.time()
        owed, error = self.reconciler.refresh(self.owed)
        self.owed = owed
        if error is None:
            if self.docker_retry.failures:
                log.info("reading from %s works again", self.engine)
            self.last_docker_error = None
            self.docker_retry.succeeded()
        else:
            self.docker_retry.failed()
            # Once per kind of failure, not once per retry: a broken engine must not
            # flood the journal every few seconds.
            level = logging.WARNING if str(error) != self.last_docker_error else logging.DEBUG
            self.last_docker_error = str(error)
            log.log(level, "reading networks from %s failed (%s); routes stay as they "
                    "are, retrying every few seconds", self.engine, error)
        # With the wall-clock start, for the benchmark's timeline (tests/bench.py).
        log.debug("%s reads took %.2f ms (began at %.6f)", self.engine,
                  (self.clock() - started) * 1000, began)
        return True

    # the host ---------------------------------------------------------------------------

    def _reconcile(self, changed):
        """Plan and apply when something changed; returns an exit status or None."""
        view = self.reconciler.view
        started = self.clock()
        if self.phase is STARTING:
            if not view.answered:
                self._tell_systemd()
                return None
            outcome = self.reconciler.assess()
            if outcome.errors and view.complete:
                return self._refuse_to_start(outcome)
            if not view.complete:
                # A record Docker keeps sending garbled could be any network: serve the
                # rest (deleting nothing, see View.protection), but judge nothing on it.
                log.warning("%s's network list has %d record(s) that cannot be read; "
                            "serving the rest, removing nothing, and not judging the "
                            "configuration until they can be read", self.engine,
                            view.listing.unreadable)
            self.phase = SERVING
        elif not changed:
            return None
        else:
            outcome = self.reconciler.assess()
        planned, applying = self.clock(), time.time()
        try:
            self.reconciler.apply(outcome)
        except PermissionDenied:
            raise  # retrying cannot help
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive a bad apply
            log.exception("applying the changes failed: %s", exc)
            outcome.failed = outcome.failed or 1
            self.reconciler.invalidate_host()
        if outcome.failed:
            self.host_retry.failed()
        else:
            self.host_retry.succeeded()
        if self.reconciler.reread:
            self.reconciler.reread = False
            self.triggers.put((HOST, None))
        # The daemon's share of an event's latency, with the reads' line above.
        log.debug("reconcile planned in %.2f ms, applied %d changes in %.2f ms (began at "
                  "%.6f)", (planned - started) * 1000, len(outcome.plan.actions),
                  (self.clock() - planned) * 1000, applying)
        self._report(outcome)
        return None

    def _refuse_to_start(self, outcome):
        """Mistakes of the configuration, on a complete view: stop before changing anything."""
        for problem in outcome.errors:
            log.error("%s", problem.message, extra=log_mod.fields(network=problem.network))
        log.error("stopping without changing anything: fix the problems above in %s and "
                  "restart (macvlan-router check shows them)", self.config_path)
        self.notifier.status("configuration error: " + outcome.errors[0].message)
        self.watcher.stop()
        self.watchdog.stop()
        return EX_CONFIG

    def _report(self, outcome):
        if outcome.problems != self.last_problems:
            for problem in outcome.problems:
                if problem not in self.last_problems:
                    level = logging.ERROR if problem.kind == "error" else logging.WARNING
                    log.log(level, "%s", problem.message,
                            extra=log_mod.fields(network=problem.network))
            self.last_problems = outcome.problems
        self.summary = outcome.summary()
        first = not self.ready_sent
        self._tell_systemd()
        if first:
            log.info("ready: %s", self._status_text())
            # What start-up built (imports, pyroute2's compiled message classes) stays
            # for good: keep it out of the collector's way, so its pauses stay short.
            gc.freeze()

    def _waiting(self):
        """Why Docker's view cannot be trusted now, or None."""
        if self.stream not in (None, "up"):
            return f"waiting for {self.engine} at {self.docker_url}"
        if self.docker_retry.failures:
            stale = ", ".join(sorted(self.reconciler.view.stale())) or "the network list"
            return (f"{self.engine} at {self.docker_url} answers badly; waiting for a "
                    f"complete read of {stale} (routes stay as they are)")
        return None

    def _status_text(self):
        return self._waiting() or self.summary or "starting"

    def _tell_systemd(self):
        """READY=1 once, after the first reconcile or as soon as the daemon knows it must
        wait for Docker (systemctl start must not hang meanwhile); STATUS= after that."""
        if self.ready_sent:
            self.notifier.status(self._status_text())
        elif self.summary is not None or self._waiting():
            self.notifier.ready(self._status_text())
            self.ready_sent = True

    # signals ----------------------------------------------------------------------------

    def _reload(self):
        """Re-read the configuration; a bad one is logged and the old one kept."""
        self.notifier.reloading()
        try:
            new = self.load_config()
        except ConfigError as exc:
            log.error("reload: %s; keeping the previous configuration", exc)
            return
        if new.docker_host != self.config.docker_host:
            log.warning("reload: DOCKER_HOST changes only on restart "
                        "(systemctl restart macvlan-router)")
        self.reconciler.config = new
        log_mod.set_level(new.log_level)
        self.owed.add(REFRESH_ALL)
        self.next_resync = self.clock() + new.resync_interval
        log.info("reloaded %s", self.config_path)

    def _stop(self):
        self.notifier.stopping()
        self.watcher.stop()
        self.watchdog.stop()
        # A restart, an upgrade or a crash keeps the shims and routes: lifecycle.py decides.
        lifecycle.leave(self.reconciler.netlink, self.config.cleanup_on_exit,
                        lifecycle.service_unit())
        return EX_OK
