"""The diff between Desired and the Host: a list of actions, each the twin of an `ip` command.

Pure: no I/O. Ownership rules live here: we only ever delete or change links
carrying our alias and routes carrying our protocol number.
"""

import ipaddress
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from .desired import stable_mac
from .model import LINK_ALIAS, ROUTE_PROTO_NAME, Problem, Protection

SCOPE_UNIVERSE = 0
SCOPE_LINK = 253


@dataclass(frozen=True)
class LinkAdd:
    name: str
    parent: str
    mac: Optional[str]

    def command(self):
        mac = f" address {self.mac}" if self.mac else ""
        return (f"ip link add {self.name} link {self.parent}{mac} type macvlan mode bridge"
                f" && ip link set {self.name} alias {LINK_ALIAS}")


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


def owned_shims(host):
    """Our links: macvlans with our alias, or (created but not yet tagged when we
    died) with no alias and the MAC we derive for their parent."""
    return {link.name: link for link in host.links
            if link.kind == "macvlan" and (
                link.alias == LINK_ALIAS
                or (link.alias is None and link.mac is not None
                    and link.mac == stable_mac(host.machine_id,
                                               host.link_name(link.parent_index))))}


def compute(desired, host, protection=Protection()):
    """Return the Plan that turns `host` into `desired`, touching only what we own and
    deleting nothing that `protection` covers."""
    problems = []
    ours = owned_shims(host)
    owned_routes = {r.dst: r for r in host.routes if r.owned}
    drop, create, kept = [], [], set()
    for name, link in ours.items():
        spec = desired.shims.get(name)
        if spec is None and _protected_link(name, host, owned_routes, protection):
            kept.add(name)
        elif spec is None or host.link_name(link.parent_index) != spec.parent \
                or link.macvlan_mode not in (None, "bridge"):
            drop.append(name)
    usable = {}
    for name, spec in desired.shims.items():
        link = host.link(name)
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

    actions = []
    foreign = {r.dst for r in host.routes if not r.owned}
    for dst, route in sorted(owned_routes.items(), key=_route_key):
        want = desired.routes.get(dst)
        if route.ifname in drop:
            continue  # Goes with its link.
        if want is None or want.shim not in usable:
            if protection.covers(dst):
                kept.add(dst)
            else:
                actions.append(RouteDel(route))
    actions.extend(LinkDel(name) for name in sorted(drop))
    actions.extend(LinkAdd(spec.name, spec.parent, spec.mac) for spec in create)

    ready_sources = set()
    for name, spec in sorted(usable.items()):
        fresh = spec in create
        link = None if fresh else ours[name]
        parent = host.link(spec.parent)
        if parent is None or not parent.up:
            continue
        has_v4 = any(a.version == 4 for a in spec.addresses)
        if has_v4 and (fresh or not link.arp_filter):
            actions.append(ArpFilter(name))
        if fresh:
            actions.append(RefuseRouterAdvertisements(name))
        if fresh or not link.up:
            actions.append(LinkUp(name))
        present = {} if fresh else {a.interface: a for a in host.addresses_of(name)
                                    if not a.ip.is_link_local}
        for interface in sorted(set(present) - spec.addresses, key=_address_key):
            if protection.covers(interface.network) or protection.total:
                kept.add(interface)
            else:
                actions.append(AddrDel(name, interface))
        for interface in sorted(spec.addresses - set(present), key=_address_key):
            actions.append(AddrAdd(name, interface))
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

    pending = 0
    for dst, spec in sorted(desired.routes.items(), key=_route_key):
        if spec.shim not in usable:
            continue
        if dst in foreign:
            problems.append(Problem(
                f"{dst} already has a route that macvlan-router did not add; leaving it "
                f"alone, so {spec.container_name or dst} is not routed via {spec.shim}",
                spec.network or None, kind="warning"))
            continue
        if (spec.shim, spec.src) not in ready_sources:
            pending += spec.dst.version == 6
            continue
        have = owned_routes.get(dst)
        if have is None or have.ifname != spec.shim or have.src != spec.src \
                or spec.shim in drop:
            actions.append(RouteReplace(spec))
        seen = host.neighbour(spec.shim, dst.network_address)
        if spec.mac and seen is not None and seen.mac != spec.mac and spec.shim not in drop:
            actions.append(NeighDel(spec.shim, dst.network_address))
    if kept:
        problems.append(Problem(
            f"keeping {len(kept)} route(s), shim(s) or address(es) that Docker's networks no "
            f"longer seem to need: {protection.reason}", kind="waiting"))
    return Plan(actions=tuple(actions), problems=tuple(problems), pending=pending,
                kept=len(kept))


def _protected_link(name, host, owned_routes, protection):
    return protection.total or any(
        protection.covers(r.dst) for r in owned_routes.values() if r.ifname == name) or any(
        protection.covers(a.interface.network) for a in host.addresses_of(name))


def _route_key(item):
    dst = item[0]
    return (dst.version, dst)


def _address_key(interface):
    return (interface.version, interface)
