"""The diff between Desired and the Host: a list of actions, each the twin of an `ip` command.

Pure: no I/O. Ownership rules live here: we only ever delete or change links
carrying our alias and routes carrying our protocol number.
"""

import ipaddress
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Tuple

from .desired import stable_mac
from .model import LINK_ALIAS, MACVLAN, ROUTE_PROTO, ROUTE_PROTO_NAME, SHIM_KINDS, Problem, \
    Protection, Route

SCOPE_UNIVERSE = 0
SCOPE_LINK = 253
IPV6_DEFAULT_METRIC = 1024   # what the kernel gives an IPv6 route added without one


@dataclass(frozen=True)
class LinkAdd:
    name: str
    parent: str
    mac: Optional[str]
    kind: str = MACVLAN
    mode: str = "bridge"

    def command(self):
        mac = f" address {self.mac}" if self.mac else ""
        return (f"ip link add {self.name} link {self.parent}{mac} type {self.kind} mode "
                f"{self.mode} && ip link set {self.name} alias {LINK_ALIAS}")


@dataclass(frozen=True)
class _OnLink:
    """An action on one of our links; `template` is the command it equals."""

    name: str
    template: ClassVar[str] = ""

    def command(self):
        return self.template.format(self=self)


@dataclass(frozen=True)
class LinkDel(_OnLink):
    template: ClassVar[str] = "ip link del {self.name}"


@dataclass(frozen=True)
class LinkUp(_OnLink):
    template: ClassVar[str] = "ip link set {self.name} up"


@dataclass(frozen=True)
class ArpFilter(_OnLink):
    template: ClassVar[str] = "sysctl -w net.ipv4.conf.{self.name}.arp_filter=1"


@dataclass(frozen=True)
class RefuseRouterAdvertisements(_OnLink):
    template: ClassVar[str] = "sysctl -w net.ipv6.conf.{self.name}.accept_ra=0"


@dataclass(frozen=True)
class AddrAdd(_OnLink):
    interface: ipaddress._BaseAddress
    template: ClassVar[str] = "ip address add {self.interface} dev {self.name} noprefixroute"


@dataclass(frozen=True)
class AddrDel(_OnLink):
    interface: ipaddress._BaseAddress
    template: ClassVar[str] = "ip address del {self.interface} dev {self.name}"


@dataclass(frozen=True)
class NeighDel(_OnLink):
    """Forget the MAC a container address was last seen at: the container answers at
    another one now (restarted or recreated with a new MAC, as Podman does), and the
    stale entry would cut the host off it for up to a minute."""

    address: ipaddress._BaseAddress
    template: ClassVar[str] = "ip neigh del {self.address} dev {self.name}"


def _route_words(dst, shim, scope, src=None):
    family = "-6 " if dst.version == 6 else ""
    scope_word = " scope link" if scope == SCOPE_LINK else ""
    src_word = f" src {src}" if src else ""
    return f"ip {family}route {{}} {dst} dev {shim} proto {ROUTE_PROTO_NAME}{scope_word}{src_word}"


def route_scope(dst):
    # A gatewayless IPv4 route is scope link; a delete must name the same scope.
    return SCOPE_LINK if dst.version == 4 else SCOPE_UNIVERSE


@dataclass(frozen=True)
class RouteReplace:
    spec: object  # RouteSpec

    def command(self):
        spec = self.spec
        return _route_words(spec.dst, spec.shim, route_scope(spec.dst), spec.src).format(
            "replace")


@dataclass(frozen=True)
class RouteDel:
    route: object  # model.Route

    def command(self):
        route = self.route
        return _route_words(route.dst, route.ifname, route.scope).format("del")


@dataclass
class Plan:
    actions: Tuple = ()
    problems: Tuple[Problem, ...] = ()
    # Routes waiting for their IPv6 source to finish duplicate address detection.
    pending: int = 0
    # Deletions held back by the Protection (Docker's view was not complete).
    kept: int = 0
    # For the next plan, scoped to what changed: what every route's decision depends on
    # besides its own destination, and the destinations whose decision is not "nothing
    # to do" (kept, pending, or blocked by a foreign route: the Problem).
    inputs: tuple = field(default=(), repr=False, compare=False)
    routes_state: dict = field(default_factory=dict, repr=False, compare=False)


def owned_shims(host):
    """Our links: macvlans and ipvlans with our alias, or macvlans (created but not yet
    tagged when we died) with no alias and the MAC we derive for their parent."""
    return {link.name: link for link in host.links
            if link.kind in SHIM_KINDS and (
                link.alias == LINK_ALIAS
                or (link.alias is None and link.kind == MACVLAN and link.mac is not None
                    and link.mac == stable_mac(host.machine_id,
                                               host.link_name(link.parent_index))))}


def compute(desired, host, protection=Protection(), previous=None, scope=None):
    """Return the Plan that turns `host` into `desired`, touching only what we own and
    deleting nothing that `protection` covers.

    With `previous`, the plan for the same desired state and host except at the route
    destinations in `scope` (after it was carried out), only those destinations are
    looked at; the result is the same as without."""
    problems = []
    ours = owned_shims(host)
    owned_routes = host.route_index.owned
    drop, create, kept, held = [], [], set(), set()
    for name, link in ours.items():
        spec = desired.shims.get(name)
        wrong = spec is None or host.link_name(link.parent_index) != spec.parent \
            or not spec.fits(link)
        if wrong and _protected_link(name, host, owned_routes, protection):
            # Replacing it (another kind or parent) would cost routes that must stay.
            kept.add(name)
            if spec is not None:
                held.add(name)
        elif wrong:
            drop.append(name)
    usable = {}
    for name, spec in desired.shims.items():
        link = host.link(name)
        if name in held:
            problems.append(Problem(
                f"{name} should be a {spec.kind} {spec.mode} shim on {spec.parent}; the "
                "link of that name now (of another kind, mode or parent) carries routes that "
                "must stay until Docker's networks are read completely, so it is replaced "
                "only then",
                kind="waiting"))
            continue
        if link is not None and name not in ours:
            problems.append(Problem(
                f"interface {name} exists but was not created by macvlan-router, so it is "
                "left alone and no shim is made on "
                f"{spec.parent}; choose another shim name with "
                f"MACVLAN_BRIDGE_INTERFACE_NAME={spec.parent}=<a free name>"))
            continue
        if link is None or name in drop:
            create.append(spec)
        usable[name] = spec

    link_actions = []
    # Last: deleting an address takes the kernel's routes that use it as their source
    # with it, so the routes move to the shim's new address first.
    address_dels = []
    link_actions.extend(LinkDel(name) for name in sorted(drop))
    link_actions.extend(LinkAdd(spec.name, spec.parent, spec.mac, spec.kind, spec.mode)
                        for spec in create)

    ready_sources = set()
    for name, spec in sorted(usable.items()):
        fresh = spec in create
        link = None if fresh else ours[name]
        parent = host.link(spec.parent)
        if parent is None or not parent.up:
            continue
        has_v4 = any(a.version == 4 for a in spec.addresses)
        if has_v4 and (fresh or not link.arp_filter):
            link_actions.append(ArpFilter(name))
        if fresh:
            link_actions.append(RefuseRouterAdvertisements(name))
        if fresh or not link.up:
            link_actions.append(LinkUp(name))
        present = {} if fresh else {a.interface: a for a in host.addresses_of(name)
                                    if not a.ip.is_link_local}
        for interface in sorted(set(present) - spec.addresses, key=_address_key):
            if protection.covers(interface.network) or protection.total:
                kept.add(interface)
            else:
                address_dels.append(AddrDel(name, interface))
        for interface in sorted(spec.addresses - set(present), key=_address_key):
            link_actions.append(AddrAdd(name, interface))
        for interface in spec.addresses & set(present):
            address = present[interface]
            if address.dad_failed:
                problems.append(Problem(
                    f"the shim's IPv6 address {address.ip} on {name} failed duplicate address "
                    "detection: another host on the LAN uses it; set MACVLAN_BRIDGE_IP6 to a "
                    "free address", kind="warning"))
            elif not address.tentative:
                ready_sources.add((name, address.ip))
        ready_sources.update((name, a.ip) for a in spec.addresses if a.version == 4)

    inputs = (usable, drop, frozenset(ready_sources), protection)
    if previous is not None and scope is not None and previous.inputs == inputs:
        state = dict(previous.routes_state)
        for dst in scope:
            state.pop(dst, None)
        looked_at = scope
    else:
        state, looked_at = {}, owned_routes.keys() | desired.routes.keys()
    deletions, replacements = [], []
    for dst in sorted(looked_at, key=_dst_key):
        found, state[dst] = _route(dst, desired.routes.get(dst), owned_routes.get(dst),
                                   dst in host.route_index.foreign, host, usable, drop,
                                   ready_sources, protection)
        if state[dst] is None:
            del state[dst]
        for action in found:
            (deletions if isinstance(action, RouteDel) else replacements).append(action)
    routes_kept = 0
    for dst, outcome in sorted(state.items(), key=lambda item: _dst_key(item[0])):
        if isinstance(outcome, Problem):
            problems.append(outcome)
        routes_kept += outcome == KEPT
    if kept or routes_kept:
        problems.append(Problem(
            f"keeping {len(kept) + routes_kept} route(s), shim(s) or address(es) that Docker's "
            f"networks no longer seem to need: {protection.reason}", kind="waiting"))
    return Plan(actions=tuple(deletions + link_actions + replacements + address_dels),
                problems=tuple(problems),
                pending=sum(1 for outcome in state.values() if outcome == PENDING),
                kept=len(kept) + routes_kept, inputs=inputs, routes_state=state)


KEPT, PENDING = "kept", "pending"


def _route(dst, want, have, foreign, host, usable, drop, ready_sources, protection):
    """(the actions for one destination, KEPT, PENDING, a Problem or None)."""
    unwanted = want is None or want.shim not in usable
    if have is not None and have.ifname not in drop and unwanted:
        if protection.covers(dst):
            return (), KEPT
        return (RouteDel(have),), None
    if unwanted:
        return (), None
    if foreign:
        return (), Problem(
            f"{dst} already has a route that macvlan-router did not add; leaving it "
            f"alone, so {want.container_name or dst} is not routed via {want.shim}",
            want.network or None, kind="warning")
    if (want.shim, want.src) not in ready_sources:
        return (), PENDING if want.dst.version == 6 else None
    found = ()
    if have is None or have.ifname != want.shim or have.src != want.src \
            or want.shim in drop:
        found = (RouteReplace(want),)
    seen = host.neighbour(want.shim, dst.network_address)
    if want.mac and seen is not None and seen.mac != want.mac and want.shim not in drop:
        found += (NeighDel(want.shim, dst.network_address),)
    return found, None


def after(host, actions):
    """The host once `actions` all succeeded, when they only add and delete routes: the
    kernel's result is then known exactly, and the Docker event after this one needs no
    netlink dump. None for anything else (a new link's index, an address's DAD state:
    only a dump tells)."""
    if not all(isinstance(a, (RouteReplace, RouteDel)) for a in actions):
        return None
    new = {a.spec.dst: a.spec for a in actions if isinstance(a, RouteReplace)}
    return host.with_routes(
        [a.route for a in actions if isinstance(a, RouteDel)],
        [Route(dst=spec.dst, ifname=spec.shim, proto=ROUTE_PROTO, src=spec.src,
               scope=route_scope(spec.dst),
               priority=IPV6_DEFAULT_METRIC if spec.dst.version == 6 else 0)
         for spec in new.values()])


def _protected_link(name, host, owned_routes, protection):
    return protection.total or any(
        protection.covers(r.dst) for r in owned_routes.values() if r.ifname == name) or any(
        protection.covers(a.interface.network) for a in host.addresses_of(name))


def _dst_key(dst):
    return (dst.version, dst)


def _address_key(interface):
    return (interface.version, interface)
