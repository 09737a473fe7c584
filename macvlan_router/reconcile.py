"""One reconcile: refresh what changed in Docker, read the host, compute, apply.

Shared by the daemon and by the check/status commands, so they all see the
host the same way.
"""

import ipaddress
import logging
from dataclasses import dataclass, field

from . import desired as desired_state
from . import plan as plan_mod
from .docker_source import CONTAINER_CHANGED, REFRESH_ALL, REFRESH_ENDPOINTS
from .errors import DockerUnavailable
from .log import fields
from .model import Desired, Host
from .netlink import HostNews, Watched
from .view import View

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    desired: Desired
    plan: plan_mod.Plan
    host: Host
    failed: int = 0
    problems: tuple = field(default=())
    # The destinations the plan looked at (None: all), and whether it was made on
    # neighbour entries as last read (see Reconciler.apply).
    scope: object = None
    neighbours_stale: bool = False

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
    """Docker's view (view.View), the host as last read, and one reconcile pass over both."""

    def __init__(self, config, docker, netlink):
        self.config = config
        self.docker = docker
        self.netlink = netlink
        self.view = View()
        # Each network's routes as last computed: an event recomputes what it changed.
        self.memo = desired_state.Memo()
        # The host as last read, or as it is after our own route changes (plan.after).
        # Netlink tells the daemon when someone else changes it (invalidate_host);
        # keeping it saves a full dump on every Docker event.
        self._host = None
        # The plan that led to _host, and the route destinations it changed there.
        self._last_plan, self._touched = None, frozenset()
        # What the netlink monitor saw change, for host_changed().
        self.news = HostNews()
        # netlink.Watched, for the netlink monitor; None until the first reconcile:
        # then everything matters.
        self.watched = None
        self._watched_names = frozenset()
        # True after an apply that left what only a fresh read settles: links the
        # snapshot did not follow, neighbour entries not looked at again. The daemon
        # then reconciles once more, on a fresh read.
        self.reread = False

    def invalidate_host(self):
        self._host, self._last_plan = None, None

    def host_changed(self):
        """Netlink reported changes: links, addresses and routes go into the snapshot
        (and the next plan looks again at the routes' destinations; a link or address
        changes the plan's inputs, which it compares); what the snapshot cannot follow
        means reading the host again."""
        changes, everything = self.news.take()
        routes = [route for kind, _, route in changes if kind == "route"]
        if any(route.dst.prefixlen == 0 for route in routes):
            # A default route came or went: the host's gateways (the route-safety gate)
            # and the parent of a network that names none follow it. Compute anew.
            self.memo = desired_state.Memo()
            everything = True
        host = None
        if changes and not everything and self._host is not None:
            host = self._host.with_notified(changes)
        if host is None:
            self.invalidate_host()
            return
        self._host = host
        self._touched = self._touched | {route.dst for route in routes}
        log.debug("%d netlink notification(s) folded into the host snapshot", len(changes))

    def warm(self):
        """Read the host now, while idle, if the snapshot is stale (after our own changes),
        so that the next Docker event costs no netlink dump."""
        if self._host is None:
            self._host = self.netlink.read()
            self._watch(self._host)

    def _watch(self, host):
        # Indexes from the latest read: a shim created by the last apply has one now.
        self.watched = Watched(self._watched_names, frozenset(
            link.index for link in host.links if link.name in self._watched_names),
            self.netlink.own, self.news)

    def owed_for(self, scope):
        """What an event's scope (docker_source.classify) owes: a container start or die
        owes nothing where the engine reports the network connect/disconnect anyway."""
        if scope != CONTAINER_CHANGED:
            return {scope}
        return set() if self.docker.network_events else {REFRESH_ENDPOINTS}

    def refresh(self, scope):
        """Re-read from Docker what `scope` names (REFRESH_ALL, REFRESH_ENDPOINTS or network
        ids). Returns (what is still owed, the DockerUnavailable that stopped the pass):
        (set(), None) when every read answered.

        Each piece of the view is replaced only by a read of it that answered; the first
        failed read ends the pass (the engine is struggling: ask it nothing more now) and
        leaves its network stale, with its last endpoints.
        """
        scope = set(scope)
        try:
            if not self.view.listed or REFRESH_ALL in scope:
                listing = self.docker.list_networks()
                self.view = self.view.after_list(listing, self.config.networks)
                # A full re-read (start, reconnect, reload, resync) computes in full too.
                self.memo = desired_state.Memo()
                scope = (scope - {REFRESH_ALL}) | {REFRESH_ENDPOINTS}
        except DockerUnavailable as exc:
            return scope, exc
        every = REFRESH_ENDPOINTS in scope
        due = [network_id for network_id, record in sorted(self.view.records.items())
               if every or network_id in scope or record.stale]
        for position, network_id in enumerate(due):
            try:
                self.view = self.view.after_inspect(network_id, *self.docker.inspect(network_id))
            except DockerUnavailable as exc:
                self.view = self.view.after_failed_inspect(network_id, str(exc))
                return set(due[position:]), exc
        return set(), None

    def compute(self, host, neighbours_current=True):
        """The Outcome for `host`; `neighbours_current` False: its neighbour entries are
        as last read, and apply() reads those the plan may need again, once its routes
        are in place (a route must not wait for that read)."""
        want = desired_state.compute(self.config, self.view.networks(), host, self.memo)
        # The last plan carried out, if the host is still the one it led to: then only
        # the destinations changed since (in Docker's view or by our own changes) are
        # looked at again.
        previous, self._last_plan = self._last_plan, None
        scope = None
        if previous is not None and host is self._host and want.changed is not None:
            scope = want.changed | self._touched
        plan = plan_mod.compute(want, host, self.view.protection(), previous, scope)
        problems = self.view.problems() + want.problems + plan.problems
        return Outcome(desired=want, plan=plan, host=host, problems=problems,
                       scope=scope, neighbours_stale=not neighbours_current)

    def _moved_neighbours(self, host, want, scope):
        """(host, destinations) with the neighbour entries a plan may turn into a NeighDel
        read afresh (they change without a notification the monitor follows): every entry
        for a full plan; for a scoped one, those on the shims of its destinations whose
        container's MAC is known, and none without such a destination (a disconnect).
        The destinations are those whose entry moved."""
        shims = None
        if scope is not None:
            shims = {spec.shim for spec in map(want.routes.get, scope)
                     if spec is not None and spec.mac}
            if not shims:
                return host, frozenset()
        links = host.links if shims is None else tuple(
            link for link in host.links if link.name in shims)
        found = tuple(n for n in self.netlink.neighbours(links)
                      if shims is None or n.ifname in shims)
        if shims is not None:
            found += tuple(n for n in host.neighbours if n.ifname not in shims)
        moved = set(found) ^ set(host.neighbours)
        if not moved:
            return host, frozenset()
        return host.with_neighbours(found), frozenset(ipaddress.ip_network(n.ip) for n in moved)

    def assess(self):
        """What a reconcile would do now, without doing it."""
        if self._host is None:
            return self.compute(self.netlink.read())
        return self.compute(self._host, neighbours_current=False)

    def apply(self, outcome):
        """Carry out the outcome's plan; sets outcome.failed to the number of failed changes."""
        host = outcome.host
        outcome.failed = self._carry_out(outcome.plan, host)
        if outcome.neighbours_stale and not outcome.failed:
            if self._host is None:
                self.reread = True  # a link or address changed: no snapshot to read into
            else:
                outcome.failed += self._clear_moved_neighbours(outcome)
        watched = frozenset(
            set(outcome.desired.shims) | set(plan_mod.owned_shims(host))
            | {m.network.parent for m in outcome.desired.networks if m.network.parent})
        if not watched <= self._watched_names:
            # Notifications of a link nobody watched were not folded (a new network's
            # parent, its address): the host must be read again.
            self.invalidate_host()
            self.reread = True
        self._watched_names = watched
        self._watch(host)

    def _carry_out(self, plan, host):
        failed = self.netlink.apply(plan.actions, host, explain)
        self._host = None if failed else plan_mod.after(host, plan.actions)
        self._last_plan, self._touched = None, frozenset()
        if self._host is not None:  # plan.after: route actions only
            self._last_plan = plan
            self._touched = frozenset(
                a.spec.dst if isinstance(a, plan_mod.RouteReplace) else a.route.dst
                for a in plan.actions)
        return failed

    def _clear_moved_neighbours(self, outcome):
        """After a plan made on neighbour entries as last read: the entries that moved
        since, planned and carried out (a NeighDel where a container's MAC changed)."""
        host, moved = self._moved_neighbours(self._host, outcome.desired, outcome.scope)
        if not moved:
            return 0
        self._host = host
        plan = plan_mod.compute(outcome.desired, host, self.view.protection(),
                                self._last_plan, moved)
        return self._carry_out(plan, host)


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
    if isinstance(action, plan_mod.NeighDel):
        return (fields(shim=action.name, address=action.address),
                "  # the container answers at another MAC now")
    return fields(shim=action.name), ""
