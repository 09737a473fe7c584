"""One reconcile: refresh what changed in Docker, read the host, compute, apply.

Shared by the daemon and by the check/status commands, so they all see the
host the same way.
"""

import logging
from dataclasses import dataclass, field

from . import desired as desired_state
from . import plan as plan_mod
from .docker_source import REFRESH_ALL, REFRESH_ENDPOINTS
from .log import fields
from .model import Desired, Host

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    desired: Desired
    plan: plan_mod.Plan
    host: Host
    failed: int = 0
    problems: tuple = field(default=())

    @property
    def errors(self):
        return [p for p in self.problems if p.kind == "error"]

    def summary(self):
        shims = sorted(self.desired.shims)
        routes = len(self.desired.routes)
        networks = len(self.desired.networks)
        text = (f"{networks} network{'s' * (networks != 1)}, {routes} "
                f"route{'s' * (routes != 1)}" + (f" via {', '.join(shims)}" if shims else ""))
        if self.plan.pending:
            text += f", {self.plan.pending} waiting for IPv6 duplicate address detection"
        if self.problems:
            text += f"; {len(self.problems)} problem{'s' * (len(self.problems) != 1)}: " \
                    + self.problems[0].message
        return text


class Reconciler:
    def __init__(self, config, docker, netlink):
        self.config = config
        self.docker = docker
        self.netlink = netlink
        self._all = None        # every network, from the last list call
        self._managed = {}      # id -> inspected Network, for the managed ones
        self._selection_problems = []
        # The host as last read. Netlink tells the daemon when it changes
        # (invalidate_host); keeping it saves a full dump on every Docker event.
        self._host = None
        # (names, indexes) of the links whose changes matter, for the netlink monitor;
        # None until the first reconcile: then everything matters.
        self.watched = None
        self._watched_names = frozenset()

    def invalidate_host(self):
        self._host = None

    def warm(self):
        """Read the host now, while idle, if the snapshot is stale (after our own changes),
        so that the next Docker event costs no netlink dump."""
        if self._host is None:
            self._host = self.netlink.read()
            self._watch(self._host)

    def _watch(self, host):
        # Indexes from the latest read: a shim created by the last apply has one now.
        self.watched = (self._watched_names, frozenset(
            link.index for link in host.links if link.name in self._watched_names))

    @property
    def knows_docker(self):
        return self._all is not None

    def refresh(self, scope):
        """Re-read from Docker what `scope` names: REFRESH_ALL, REFRESH_ENDPOINTS or network ids.

        Raises DockerUnavailable; the cache then stays as it was, so a Docker
        restart never makes us drop routes.
        """
        if self._all is None or REFRESH_ALL in scope:
            self._all = self.docker.list_networks()
        selected, self._selection_problems = desired_state.select_networks(
            self.config.networks, self._all)
        every = bool({REFRESH_ALL, REFRESH_ENDPOINTS} & set(scope))
        managed = {}
        for network in selected:
            if every or network.id in scope or network.id not in self._managed:
                fresh = self.docker.inspect(network.id)
                if fresh is not None:
                    managed[network.id] = fresh
            else:
                managed[network.id] = self._managed[network.id]
        self._managed = managed

    def compute(self, host):
        networks = sorted(self._managed.values(), key=lambda n: (n.name, n.id))
        want = desired_state.compute(self.config, networks, host)
        plan = plan_mod.compute(want, host)
        problems = tuple(self._selection_problems) + want.problems + plan.problems
        return Outcome(desired=want, plan=plan, host=host, problems=problems)

    def assess(self):
        """What a reconcile would do now, without doing it."""
        return self.compute(self._host or self.netlink.read())

    def apply(self, outcome):
        """Carry out the outcome's plan; sets outcome.failed to the number of failed changes."""
        host = outcome.host
        outcome.failed = self.netlink.apply(outcome.plan.actions, host, explain)
        self._host = None if outcome.plan.actions else host
        self._watched_names = frozenset(
            set(outcome.desired.shims) | set(plan_mod.owned_shims(host))
            | {m.network.parent for m in outcome.desired.networks if m.network.parent})
        self._watch(host)


def cleanup(netlink):
    """Remove every link and route we own, and nothing else."""
    host = netlink.read()
    plan = plan_mod.compute(Desired(), host)
    return netlink.apply(plan.actions, host, explain), len(plan.actions)


def explain(action):
    """Journal fields and a trailing comment saying why, for an action's log line."""
    if isinstance(action, plan_mod.RouteReplace):
        spec = action.spec
        who = (f"container {spec.container_name} on network {spec.network}"
               if spec.container_name else spec.network)
        return (fields(network=spec.network, shim=spec.shim, container_id=spec.container_id,
                       container_name=spec.container_name, address=spec.dst.network_address),
                f"  # {who}")
    if isinstance(action, plan_mod.RouteDel):
        route = action.route
        return fields(shim=route.ifname, address=route.dst.network_address), "  # no longer wanted"
    if isinstance(action, (plan_mod.AddrAdd, plan_mod.AddrDel)):
        return fields(shim=action.name, address=action.interface.ip), ""
    return fields(shim=action.name), ""
