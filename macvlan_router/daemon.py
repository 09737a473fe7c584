"""The daemon's main loop: triggers in, reconciles out, systemd kept informed.

Threads (Docker events, netlink monitor) and signal handlers only put a trigger
on a queue; all the work happens here, in the main thread, so the watchdog ping
stops whenever that work hangs.
"""

import gc
import logging
import queue
import signal
import time

from . import config as config_mod
from . import lifecycle
from . import log as log_mod
from .docker_source import REFRESH_ALL, EventWatcher
from .errors import EX_CONFIG, EX_OK, ConfigError, PermissionDenied
from .netlink import Monitor

log = logging.getLogger(__name__)

STOP, RELOAD, HOST, DOCKER, LOST = "stop", "reload", "host", "docker", "lost"
MAX_RETRY = 30.0


class Daemon:
    def __init__(self, config_path, reconciler, notifier, docker_url, clock=time.monotonic):
        self.config_path = config_path
        self.reconciler = reconciler
        self.notifier = notifier
        self.docker_url = docker_url
        self.clock = clock
        # SimpleQueue.put is reentrant: safe to call from a signal handler.
        self.triggers = queue.SimpleQueue()
        self.watcher = EventWatcher(docker_url, lambda scope: self.triggers.put((DOCKER, scope)),
                                    lambda why: self.triggers.put((LOST, why)))
        self.monitor = Monitor(lambda: self.triggers.put((HOST, None)),
                               lambda: self.reconciler.watched)
        self.ready = False
        self.started = False          # the first reconcile with Docker's state has run
        self.docker_up = False
        self.waiting_message = None
        self.last_problems = ()
        self.status_text = "starting"
        self.scope = set()
        self.retry_delay = 1.0
        self.retry_at = None

    @property
    def config(self):
        return self.reconciler.config

    def run(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.triggers.put((STOP, None)))
        signal.signal(signal.SIGHUP, lambda *_: self.triggers.put((RELOAD, None)))
        log.info("macvlan-router starting: Docker at %s, configuration %s",
                 self.docker_url, self.config_path)
        self.watcher.start()
        self.monitor.start()
        next_resync = self.clock() + self.config.resync_interval
        while True:
            if self.reconciler.knows_docker and self.triggers.empty():
                self._warm()
            kinds = self._wait(next_resync)
            self.notifier.watchdog()
            if STOP in kinds:
                return self._stop()
            if RELOAD in kinds and self._reload():
                next_resync = self.clock() + self.config.resync_interval
            if self.clock() >= next_resync:
                self.scope.add(REFRESH_ALL)
                self.reconciler.invalidate_host()
                next_resync = self.clock() + self.config.resync_interval
            due = bool(kinds & {HOST, DOCKER, RELOAD}) or self._retry_due()
            status = self._cycle(force=due)
            if status is not None:
                return status
            if RELOAD in kinds:
                # After the reconcile, so that `systemctl reload` returns on the new state.
                self.notifier.ready(self.status_text)

    def _wait(self, next_resync):
        """Block for the next trigger, then take every trigger already queued (coalescing)."""
        deadlines = [next_resync] + ([self.retry_at] if self.retry_at else [])
        timeout = max(0.0, min(deadlines) - self.clock())
        if self.notifier.watchdog_interval:
            timeout = min(timeout, self.notifier.watchdog_interval)
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
                self.scope.add(arg)
                self.docker_up = True
            elif kind == LOST:
                self._docker_lost(arg)
            elif kind == HOST:
                self.reconciler.invalidate_host()
        return kinds

    def _warm(self):
        try:
            self.reconciler.warm()
        except Exception as exc:  # noqa: BLE001 - only an optimisation; the reconcile reads again
            log.debug("could not read the host ahead of time: %s", exc)

    def _retry_due(self):
        return self.retry_at is not None and self.clock() >= self.retry_at

    def _docker_lost(self, message):
        if self.docker_up or self.waiting_message is None:
            log.warning("%s; waiting for it (routes stay as they are)", message)
        self.docker_up = False
        self.status_text = self.waiting_message = f"waiting for Docker at {self.docker_url}"
        if not self.ready:
            # systemctl start must not hang while Docker is away: ready, but say so.
            self.notifier.ready(self.waiting_message)
            self.ready = True
        else:
            self.notifier.status(self.waiting_message)

    def _cycle(self, force):
        """Refresh from Docker if asked, reconcile; returns an exit status to stop with."""
        started = docker_done = self.clock()
        if self.scope and self.docker_up:
            try:
                self.reconciler.refresh(self.scope)
            except Exception as exc:  # noqa: BLE001 - Docker said something odd: try again
                # The event stream decides whether Docker is gone; a failed call on a live
                # stream (a timeout, an HTTP 500, an odd answer) is retried with backoff.
                log.warning("reading networks from Docker failed, retrying in %.0f s: %s",
                            self.retry_delay, exc)
                self._schedule_retry()
            else:
                docker_done = self.clock()
                self.scope.clear()
                if self.waiting_message:
                    log.info("connected to Docker at %s", self.docker_url)
                self.waiting_message = None
                force = True
        if not force or not self.reconciler.knows_docker:
            return None
        try:
            outcome = self.reconciler.assess()
            if not self.started:
                self.started = True
                if outcome.errors:
                    return self._refuse_to_start(outcome)
            self.reconciler.apply(outcome)
        except PermissionDenied:
            raise
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive a bad cycle
            log.exception("reconcile failed, retrying in %.0f s: %s", self.retry_delay, exc)
            self.reconciler.invalidate_host()
            self._schedule_retry()
            return None
        log.debug("reconcile took %.1f ms (Docker %.1f ms), %d changes",
                  (self.clock() - started) * 1000, (docker_done - started) * 1000,
                  len(outcome.plan.actions))
        self._report(outcome)
        if outcome.failed:
            self._schedule_retry()
        else:
            self.retry_at, self.retry_delay = None, 1.0
        return None

    def _refuse_to_start(self, outcome):
        """Problems at the first reconcile are configuration errors: stop before changing anything."""
        for problem in outcome.errors:
            log.error("%s", problem.message, extra=log_mod.fields(network=problem.network))
        log.error("stopping without changing anything: fix the problems above in %s and "
                  "restart (macvlan-router check shows them)", self.config_path)
        self.notifier.status("configuration error: " + outcome.errors[0].message)
        self.watcher.stop()
        return EX_CONFIG

    def _schedule_retry(self):
        self.retry_at = self.clock() + self.retry_delay
        self.retry_delay = min(self.retry_delay * 2, MAX_RETRY)

    def _report(self, outcome):
        if outcome.problems != self.last_problems:
            for problem in outcome.problems:
                if problem not in self.last_problems:
                    level = logging.ERROR if problem.kind == "error" else logging.WARNING
                    log.log(level, "%s", problem.message,
                            extra=log_mod.fields(network=problem.network))
            self.last_problems = outcome.problems
        self.status_text = status = self.waiting_message or outcome.summary()
        if not self.ready:
            log.info("ready: %s", status)
            self.notifier.ready(status)
            self.ready = True
            # What start-up built (imports, pyroute2's compiled message classes) stays
            # for good: keep it out of the collector's way, so its pauses stay short.
            gc.freeze()
        else:
            self.notifier.status(status)

    def _reload(self):
        """Re-read the configuration; True when the new one was taken."""
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            log.error("reload: %s; keeping the previous configuration", exc)
            return False
        if new.docker_host != self.config.docker_host:
            log.warning("reload: DOCKER_HOST changes only on restart "
                        "(systemctl restart macvlan-router)")
        self.reconciler.config = new
        log_mod.set_level(new.log_level)
        self.scope.add(REFRESH_ALL)
        log.info("reloaded %s", self.config_path)
        return True

    def _stop(self):
        self.notifier.stopping()
        self.watcher.stop()
        # A restart, an upgrade or a crash keeps the shims and routes: lifecycle.py decides.
        lifecycle.leave(self.reconciler.netlink, self.config.cleanup_on_exit,
                        lifecycle.service_unit())
        return EX_OK
