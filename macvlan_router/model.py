"""Plain values shared by the pure logic and the edges.

Docker and netlink are translated into these at the edges, so desired.py and
plan.py never see a library object and can be tested with literals.
"""

import dataclasses
import functools
import ipaddress
import itertools
import operator
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple

# Our rtnetlink protocol number: above everything iproute2 names in rt_protos.
ROUTE_PROTO = 210
ROUTE_PROTO_NAME = "macvlan-router"
# IFLA_IFALIAS on every link we create: our claim of ownership.
LINK_ALIAS = "macvlan-router"
MAIN_TABLE = 254
# The kinds of shim, named as the kernel and Docker's drivers name them. The kernel lets
# only one kind of child on an interface, and an ipvlan interface's children share one
# mode (the mode of the newest child becomes every child's).
MACVLAN, IPVLAN = "macvlan", "ipvlan"
SHIM_KINDS = (MACVLAN, IPVLAN)
IPVLAN_MODES = ("l2", "l3", "l3s")


@dataclass(frozen=True)
class Endpoint:
    container_id: str
    container_name: str
    ipv4: Optional[ipaddress.IPv4Address] = None
    ipv6: Optional[ipaddress.IPv6Address] = None
    mac: Optional[str] = None  # lower case; None when the engine does not say

    @property
    def short_id(self):
        return self.container_id[:12]


@dataclass(frozen=True)
class Network:
    """A Docker macvlan network, with its --config-from network already followed."""

    id: str
    name: str
    parent: Optional[str]
    driver: str = "macvlan"
    subnets: Tuple[ipaddress._BaseNetwork, ...] = ()
    endpoints: Tuple[Endpoint, ...] = ()
    # Addresses Docker will not hand out: the LAN's routers, and --aux-address entries.
    gateways: FrozenSet[ipaddress._BaseAddress] = frozenset()
    aux_addresses: FrozenSet[ipaddress._BaseAddress] = frozenset()
    # Where Docker allocates from (--ip-range); empty means the whole subnet.
    ip_ranges: Tuple[ipaddress._BaseNetwork, ...] = ()
    labels: Tuple[Tuple[str, str], ...] = ()
    # No parent given, and the engine puts the containers on the interface of the host's
    # default route (Podman's netavark does, when a container starts).
    default_route_parent: bool = False
    # The LAN's DHCP server gives the containers their addresses, not the engine.
    dhcp: bool = False
    # The ipvlan driver's ipvlan_mode and ipvlan_flag, defaults filled in ("l2",
    # "bridge"); None for other drivers.
    ipvlan_mode: Optional[str] = None
    ipvlan_flag: Optional[str] = None
    # The macvlan driver's macvlan_mode, "bridge" when absent; None for other drivers.
    macvlan_mode: Optional[str] = None
    # Who reported it ("Docker" or "Podman"): the advice in messages is that engine's.
    engine: str = "Docker"

    @property
    def shim_kind(self):
        """(link kind, mode) of the shim that reaches this network's containers."""
        if self.driver == IPVLAN:
            return IPVLAN, self.ipvlan_mode
        return MACVLAN, "bridge"


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: Optional[str] = None
    alias: Optional[str] = None
    parent_index: Optional[int] = None
    up: bool = True
    mac: Optional[str] = None
    macvlan_mode: Optional[str] = None
    arp_filter: Optional[bool] = None
    ipvlan_mode: Optional[str] = None


@dataclass(frozen=True)
class Address:
    ifname: str
    interface: ipaddress._BaseAddress  # an ip_interface: address and prefix
    tentative: bool = False
    dad_failed: bool = False

    @property
    def ip(self):
        return self.interface.ip


@dataclass(frozen=True)
class Route:
    """A route in the main table, as netlink reports it."""

    dst: ipaddress._BaseNetwork
    ifname: Optional[str]
    proto: int
    src: Optional[ipaddress._BaseAddress] = None
    scope: int = 0
    priority: int = 0
    # Next hops (one, or several for a multipath route): the route-safety policy keeps
    # the host's default gateways off the shims.
    gateways: Tuple[ipaddress._BaseAddress, ...] = ()

    @property
    def owned(self):
        return self.proto == ROUTE_PROTO


@dataclass(frozen=True)
class Neighbour:
    """An ARP or NDP cache entry on a macvlan link: the MAC an address was last seen at."""

    ifname: str
    ip: ipaddress._BaseAddress
    mac: str  # lower case


@dataclass(frozen=True)
class Host:
    """What netlink shows of this network namespace: every link, address and main route,
    and the neighbour entries on macvlan links."""

    links: Tuple[Link, ...] = ()
    addresses: Tuple[Address, ...] = ()
    routes: Tuple[Route, ...] = ()
    machine_id: str = ""
    neighbours: Tuple[Neighbour, ...] = ()

    def link(self, name):
        return next((link for link in self.links if link.name == name), None)

    def link_name(self, index):
        return next((link.name for link in self.links if link.index == index), None)

    def addresses_of(self, name):
        return tuple(a for a in self.addresses if a.ifname == name)

    def neighbour(self, ifname, ip):
        return self._neighbour_index.get((ifname, ip))

    @functools.cached_property
    def _neighbour_index(self):
        # A full plan looks up every route's destination: once per snapshot, not a scan each.
        return {(n.ifname, n.ip): n for n in self.neighbours}

    def default_gateways(self):
        return self.route_index.default_gateways

    def default_route_interface(self):
        """The interface of the first IPv4 default route that names one (else IPv6), in
        the kernel's order (lowest metric first): the one netavark picks for a blank
        macvlan parent. None without such a route (a multipath one names none)."""
        return next((r.ifname for version in (4, 6) for r in self.routes
                     if r.dst.prefixlen == 0 and r.dst.version == version and r.ifname), None)

    @functools.cached_property
    def route_index(self):
        """What the pure logic looks up in the routes, built once per snapshot."""
        return RouteIndex.of(self.routes)

    def with_routes(self, gone, new):
        """This host without the routes `gone` (objects of this host) and with our routes
        `new`, each replacing ours at its destination; the index follows along instead
        of being rebuilt from every route."""
        index = self.route_index
        replaced = [index.owned[r.dst] for r in new if r.dst in index.owned]
        dropped = {id(r) for r in gone} | {id(r) for r in replaced}
        routes = self.routes
        if dropped:
            # In C, object by object: this runs on every disconnect, over every route.
            routes = tuple(itertools.compress(routes, map(
                operator.not_, map(dropped.__contains__, map(id, routes)))))
        routes += tuple(new)
        host = dataclasses.replace(self, routes=routes)
        removed = tuple(gone) + tuple(replaced)
        if not any(r.dst in index.shared for r in removed):
            # Set where cached_property keeps it; otherwise built from `routes` on use.
            host.__dict__["route_index"] = index.replacing(removed, new)
        return host

    def with_neighbours(self, neighbours):
        """This host with other neighbour entries; the route index is kept, not rebuilt."""
        host = dataclasses.replace(self, neighbours=tuple(neighbours))
        if "route_index" in self.__dict__:
            host.__dict__["route_index"] = self.__dict__["route_index"]
        return host

    def with_notified(self, changes):
        """This host after netlink's notifications, in order: (kind, added, value), kind
        "link" (a Link), "address" (an Address) or "route" (a Route), the address's and
        route's `ifname` still the interface index (or None). None when the snapshot
        cannot follow: a link new to it, deleted, renamed or gone down (the kernel drops
        its IPv4 routes without a notification), or an index it lacks. A notification
        the snapshot already reflects changes nothing."""
        links, addresses, routes = self.links, self.addresses, self.routes
        for kind, added, value in changes:
            if kind == "link":
                links = _notified_link(links, added, value)
                if links is None:
                    return None
                continue
            if value.ifname is not None:
                name = next((link.name for link in links if link.index == value.ifname), None)
                if name is None:
                    return None
                value = dataclasses.replace(value, ifname=name)
            if kind == "address":
                key = (value.ifname, value.interface)
                addresses = tuple(a for a in addresses if (a.ifname, a.interface) != key) \
                    + (value,) * added
            else:
                # A route is the kernel's by destination and metric: a notification
                # replaces or removes the one there.
                routes = tuple(r for r in routes if not (
                    r.priority == value.priority and r.dst == value.dst)) + (value,) * added
        host = dataclasses.replace(self, links=links, addresses=addresses, routes=routes)
        if routes is self.routes and "route_index" in self.__dict__:
            host.__dict__["route_index"] = self.__dict__["route_index"]
        return host


def _notified_link(links, added, link):
    """`links` after a link notification, or None when the snapshot cannot follow it: a
    link it lacks may have had addresses and routes before anyone watched it."""
    before = next((known for known in links if known.index == link.index), None)
    if not added or before is None or before.name != link.name or (
            before.up and not link.up):
        return None
    return tuple(link if known is before else known for known in links)


@dataclass(frozen=True)
class RouteIndex:
    owned: Dict  # destination -> our route there (the last one listed, as a dump gives)
    foreign: FrozenSet  # destinations of routes we do not own
    default_gateways: FrozenSet
    # Destinations with more than one of our routes (different metrics): removing one
    # leaves another, so an index without it is rebuilt from the routes.
    shared: FrozenSet = frozenset()

    @classmethod
    def of(cls, routes):
        seen, shared = set(), set()
        for route in routes:
            if route.owned:
                (shared if route.dst in seen else seen).add(route.dst)
        return cls(owned={r.dst: r for r in routes if r.owned}, shared=frozenset(shared),
                   foreign=frozenset(r.dst for r in routes if not r.owned),
                   default_gateways=frozenset(g for r in routes if r.dst.prefixlen == 0
                                              for g in r.gateways))

    def replacing(self, gone, new):
        """Without our routes `gone` and with our routes `new` (never a default route:
        the safety policy refuses anything that wide)."""
        owned = dict(self.owned)
        for route in gone:
            if owned.get(route.dst) is route:
                del owned[route.dst]
        owned.update((r.dst, r) for r in new)
        return dataclasses.replace(self, owned=owned)


@dataclass(frozen=True)
class ShimSpec:
    name: str
    parent: str
    mac: Optional[str]
    addresses: FrozenSet[ipaddress._BaseAddress]  # ip_interface /32 and /128
    kind: str = MACVLAN
    mode: str = "bridge"

    def fits(self, link):
        return is_kind(link, (self.kind, self.mode))


def is_kind(link, kind):
    """Whether `link` is of `kind`, a (link kind, mode) pair; a mode the kernel did not
    report counts as the one asked for."""
    mode = link.macvlan_mode if link.kind == MACVLAN else link.ipvlan_mode
    return link.kind == kind[0] and mode in (None, kind[1])


@dataclass(frozen=True)
class RouteSpec:
    dst: ipaddress._BaseNetwork
    shim: str
    src: Optional[ipaddress._BaseAddress]
    # Why the route exists: for logs and status, not part of its identity.
    network: str = field(default="", compare=False)
    container_id: str = field(default="", compare=False)
    container_name: str = field(default="", compare=False)
    # The container's MAC, when the engine says: a neighbour entry at another MAC is stale.
    mac: Optional[str] = field(default=None, compare=False)


@dataclass(frozen=True)
class Problem:
    """Something the user should know, worded as what is wrong and what to do.

    kind "error": the user must fix it (fatal when present at start);
    "warning": something is skipped or at risk, the rest works; "waiting": it fixes
    itself (a parent interface still down).
    """

    message: str
    network: Optional[str] = None
    kind: str = "error"


@dataclass(frozen=True)
class ManagedNetwork:
    network: Network
    shim: Optional[str]


@dataclass(frozen=True)
class Protection:
    """Owned routes (and the shims and addresses they need) that must stay even though
    the desired state lacks them: Docker's view is not complete enough to say they go."""

    prefixes: Tuple[ipaddress._BaseNetwork, ...] = ()
    reason: str = ""

    def covers(self, dst):
        return any(dst.version == p.version and dst.subnet_of(p) for p in self.prefixes)

    @property
    def total(self):
        return any(p.prefixlen == 0 for p in self.prefixes)


@dataclass
class Desired:
    shims: Dict[str, ShimSpec] = field(default_factory=dict)
    routes: Dict[ipaddress._BaseNetwork, RouteSpec] = field(default_factory=dict)
    networks: Tuple[ManagedNetwork, ...] = ()
    problems: Tuple[Problem, ...] = ()
    # Route destinations whose wanted route may differ from the computation before this
    # one (desired.Memo); None: any may.
    changed: Optional[FrozenSet] = field(default=None, compare=False)
