"""Leaving: remove what macvlan-router owns on a stop, keep it on a restart, an upgrade, a crash.

systemd tears the service down the same way for `systemctl stop` and `systemctl restart`
(SIGTERM to the daemon, then ExecStopPost=), and debhelper's postinst restarts it on a
package upgrade; $SERVICE_RESULT and $EXIT_CODE are the same in all of these. Only the
unit's job tells them apart: `systemctl list-jobs` shows `stop` while the unit stops and
`restart` while it restarts. Anything but a stop job keeps the shims and routes: the next
start adopts them, and the host never loses its way to its containers meanwhile. When in
doubt we keep too: a route left behind costs a `macvlan-router cleanup`, a route removed
by mistake cuts traffic.
"""

import logging
import os
import subprocess
from dataclasses import dataclass

from .plan import owned_shims
from .reconcile import cleanup

log = logging.getLogger(__name__)

CGROUP_FILE = "/proc/self/cgroup"
LIST_JOBS = ("systemctl", "list-jobs", "--no-legend", "--no-pager", "--full")
# Well inside TimeoutStopSec=; a systemd that has not answered by then is not answering.
QUERY_TIMEOUT = 5.0
NEXT_START = " for the next start"
BY_HAND = NEXT_START + "; `macvlan-router cleanup` removes them"


class QueryFailed(Exception):
    """systemd did not say what the unit's job is."""


@dataclass(frozen=True)
class Decision:
    remove: bool
    reason: str = ""     # what was found, for the log line; empty for a plain command
    note: str = ""       # what follows "keeping ..." in the log line


def service_unit(environ=os.environ, cgroup_file=CGROUP_FILE):
    """The systemd service this process belongs to, or None when it was started by hand.

    Both must hold: systemd gives each service's processes an INVOCATION_ID (a shell a user
    opened has none, even when it sits in a service's cgroup), and a service's processes
    live in that service's own cgroup (one moved into a scope is not the service's any more).
    """
    if not environ.get("INVOCATION_ID"):
        return None
    try:
        with open(cgroup_file, encoding="utf-8") as handle:
            return unit_from_cgroup(handle.read())
    except OSError:
        return None


def unit_from_cgroup(text):
    """The .service that /proc/PID/cgroup places us in: the last component of the systemd
    hierarchy's path ("0::" on cgroup v2, "name=systemd" on v1), which may sit under a
    container's own prefix (/docker/ID/system.slice/x.service)."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1] in ("", "name=systemd"):
            leaf = parts[2].rstrip("/").rpartition("/")[2]
            if leaf.endswith(".service"):
                return leaf
    return None


def list_jobs(command=LIST_JOBS, timeout=QUERY_TIMEOUT):
    """systemd's pending jobs as `systemctl list-jobs` prints them; QueryFailed when it cannot
    say (no system bus, systemd busy or gone)."""
    text = " ".join(command)
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise QueryFailed(f"{text} gave no answer within {timeout:g} s") from None
    except OSError as exc:
        raise QueryFailed(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        why = done.stderr.strip() or f"exit status {done.returncode}"
        raise QueryFailed(f"{text} failed: {why}")
    return done.stdout


def job_types(listing, unit):
    """The types of `unit`'s jobs in `list-jobs --no-legend` output ("JOB UNIT TYPE STATE")."""
    return {fields[2] for fields in map(str.split, listing.splitlines())
            if len(fields) >= 4 and fields[1] == unit}


def decide(cleanup_on_exit, unit, query=list_jobs):
    """Whether leaving now removes what we own. `unit` is the service we run as, None when
    not run by systemd (then we remove, as the command always did)."""
    if not cleanup_on_exit:
        return Decision(False, "CLEANUP_ON_EXIT=false")
    if unit is None:
        return Decision(True)
    try:
        jobs = job_types(query(), unit)
    except QueryFailed as exc:
        return Decision(False, f"cannot tell whether {unit} is stopping or restarting ({exc})",
                        BY_HAND)
    if "stop" in jobs:
        return Decision(True, f"{unit} is stopping")
    if "restart" in jobs:
        return Decision(False, "restarting", NEXT_START)
    if jobs:
        return Decision(False, f"{unit} is not stopping (its job: {', '.join(sorted(jobs))})",
                        BY_HAND)
    return Decision(False, f"{unit} ended without a stop job (a crash, a watchdog kill or a "
                    "signal sent by hand; systemd restarts it if its Restart= says so)", BY_HAND)


def owned_summary(host):
    """What we own on `host` in words ("mvr-eth0 and its 14 routes"); empty when nothing."""
    shims = sorted(owned_shims(host))
    count = sum(1 for route in host.routes if route.owned)
    routes = f"{count} route{'' if count == 1 else 's'}"
    if not shims:
        return routes if count else ""
    return f"{', '.join(shims)} and {'its' if len(shims) == 1 else 'their'} {routes}"


def leave(netlink, cleanup_on_exit, unit):
    """Remove what we own or keep it, saying why; returns how many removals failed."""
    decision = decide(cleanup_on_exit, unit)
    if not decision.remove:
        what = owned_summary(netlink.read())
        if what:
            log.info("%s: keeping %s%s", decision.reason, what, decision.note)
        else:
            log.info("%s: no shim or route of macvlan-router to keep", decision.reason)
        return 0
    if decision.reason:
        log.info("%s: removing the shims and routes macvlan-router owns", decision.reason)
    failed, count = cleanup(netlink)
    if failed:
        log.error("%d of %d removals failed (see above); `macvlan-router cleanup` tries again",
                  failed, count)
    elif not count:
        log.info("nothing to remove")
    return failed
