"""The netlink edge: read the host into model values, apply plan actions, watch for changes."""

import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from typing import NamedTuple, Optional

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_DELROUTE, RTM_NEWADDR,
                                   RTM_NEWLINK, RTM_NEWROUTE, RTM_SETLINK)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from . import plan as actions
from .errors import PermissionDenied
from .model import IPVLAN, LINK_ALIAS, MACVLAN, MAIN_TABLE, ROUTE_PROTO, Address, Host, Link, \
    Neighbour, Route

log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_NOPREFIXROUTE = 0x200
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
DUMP_ATTEMPTS = 5
MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
IFLA_IFNAME = 3
IFLA_AF_SPEC = 26
# The monitor's socket buffer, as pyroute2 sets it; a datagram is one message or a few.
RECEIVE_BUFFER = 1 << 20
RECEIVE_SIZE = 1 << 17
NLMSG_HEADER = struct.Struct("=IH10x")
NLATTR_HEADER = struct.Struct("=HH")
IFINFOMSG_INDEX = struct.Struct("=i")    # after family, pad and type
IFADDRMSG_INDEX = struct.Struct("=I")    # after family, prefixlen, flags and scope
RTMSG_HEAD = struct.Struct("=BBBBBB")    # family, dst_len, src_len, tos, table, protocol
IFLA_INET_CONF = 1
IPV4_DEVCONF_ARPFILTER = 13
MACVLAN_MODES = {1: "private", 2: "vepa", 4: "bridge", 8: "passthru", 16: "source"}
IPVLAN_MODES = {0: "l2", 1: "l3", 2: "l3s"}
IPVLAN_MODE_NUMBERS = {name: number for number, name in IPVLAN_MODES.items()}
# Errors that mean "already as wanted" for the action that got them.
ALREADY_DONE = {
    actions.LinkDel: (errno.ENODEV,),
    actions.AddrAdd: (errno.EEXIST,),
    actions.AddrDel: (errno.EADDRNOTAVAIL,),
    actions.RouteDel: (errno.ESRCH,),
    actions.NeighDel: (errno.ENOENT,),
}


def _nlattr(kind, payload):
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def set_arp_filter(index, value=1):
    """RTM_SETLINK with IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF/ARPFILTER, on a plain socket.

    Over netlink rather than /proc/sys, so it works where /proc/sys is read-only
    (ProtectKernelTunables=, containers). pyroute2 models AF_INET conf only for
    reading, and its raw request API differs between 0.7 and 0.9: hence bytes.
    """
    conf = _nlattr(IPV4_DEVCONF_ARPFILTER, struct.pack("=I", value))
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0) + _nlattr(
        IFLA_AF_SPEC, _nlattr(socket.AF_INET, _nlattr(IFLA_INET_CONF, conf)))
    header = struct.pack("=IHHII", 16 + len(body), RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)
        sock.send(header + body)
        reply = sock.recv(65536)
    error = struct.unpack_from("=i", reply, 16)[0]
    if error:
        raise NetlinkError(-error, os.strerror(-error))


def refuse_router_advertisements(name):
    """accept_ra=0 on a new shim, before it goes up.

    Otherwise a LAN router's advertisements give the shim a SLAAC address, a prefix
    route and a default route, all of which vanish with the shim. There is no
    netlink way to set it, so this one goes through /proc/sys.
    """
    if not os.path.isdir("/proc/sys/net/ipv6"):
        return  # IPv6 is off (ipv6.disable=1): no advertisements to refuse.
    with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w", encoding="ascii") as handle:
        handle.write("0")


def read_machine_id():
    for path in MACHINE_ID_PATHS:
        try:
            with open(path, encoding="ascii") as handle:
                value = handle.read().strip()
        except OSError:
            continue
        if value:
            return value
    return ""


def _attr(msg, *names):
    """Follow nested attributes; None when any level is missing."""
    for name in names:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def _flags(msg):
    value = msg.get_attr("IFA_FLAGS")
    return msg["flags"] if value is None else value


class Netlink:
    """One rtnetlink socket in the current network namespace."""

    def __init__(self, machine_id=None):
        self.ipr = IPRoute()
        self.own = OwnChanges()
        self._relinked = set()
        # Shim name -> why the kernel last refused to create it: the retries every few
        # seconds say it again only at debug level, until it changes or succeeds.
        self._refused = {}
        self.machine_id = read_machine_id() if machine_id is None else machine_id

    def close(self):
        self.ipr.close()

    def read(self):
        """The whole namespace; a dump that raced with a change (NLM_F_DUMP_INTR, which
        pyroute2 0.7 raises) is simply taken again."""
        for attempt in range(DUMP_ATTEMPTS):
            try:
                return self._read()
            except NetlinkDumpInterrupted:
                if attempt == DUMP_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _read(self):
        links = tuple(self._link(msg) for msg in self.ipr.get_links())
        names = {link.index: link.name for link in links}
        addresses = tuple(address for address in (
            self._address(msg, names) for msg in self.ipr.get_addr()) if address is not None)
        routes = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self.ipr.get_routes(family=family, table=MAIN_TABLE):
                route = self._route(msg, names)
                if route is not None:
                    routes.append(route)
        return Host(links=links, addresses=addresses, routes=tuple(routes),
                    machine_id=self.machine_id, neighbours=self.neighbours(links))

    def neighbours(self, links):
        """The ARP and NDP entries that name a MAC, on the macvlan links among `links`."""
        names = {link.index: link.name for link in links if link.kind == "macvlan"}
        found = []
        for msg in self.ipr.get_neighbours():
            name, dst = names.get(msg["ifindex"]), msg.get_attr("NDA_DST")
            mac = msg.get_attr("NDA_LLADDR")
            if name and dst and mac:
                found.append(Neighbour(name, ipaddress.ip_address(dst), mac.lower()))
        return tuple(found)

    @staticmethod
    def _link(msg):
        info = msg.get_attr("IFLA_LINKINFO")
        mode = _attr(info, "IFLA_INFO_DATA", "IFLA_MACVLAN_MODE")
        ipvlan_mode = _attr(info, "IFLA_INFO_DATA", "IFLA_IPVLAN_MODE")
        inet = _attr(msg, "IFLA_AF_SPEC", "AF_INET")
        return Link(
            index=msg["index"],
            name=msg.get_attr("IFLA_IFNAME"),
            kind=_attr(info, "IFLA_INFO_KIND"),
            alias=msg.get_attr("IFLA_IFALIAS"),
            parent_index=msg.get_attr("IFLA_LINK"),
            up=bool(msg["flags"] & IFF_UP),
            mac=msg.get_attr("IFLA_ADDRESS"),
            macvlan_mode=MACVLAN_MODES.get(mode, mode),
            ipvlan_mode=IPVLAN_MODES.get(ipvlan_mode, ipvlan_mode),
            arp_filter=None if inet is None else bool(inet["arpfilter"]))

    @staticmethod
    def _address(msg, names):
        ifname = names.get(msg["index"])
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if ifname is None or address is None:
            return None
        flags = _flags(msg)
        return Address(
            ifname=ifname,
            interface=ipaddress.ip_interface(f"{address}/{msg['prefixlen']}"),
            tentative=bool(flags & IFA_F_TENTATIVE),
            dad_failed=bool(flags & IFA_F_DADFAILED))

    @staticmethod
    def _route(msg, names):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        # Every type counts (a blackhole or prohibit route someone set is theirs to keep).
        if table != MAIN_TABLE:
            return None
        family = msg["family"]
        dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
        src = msg.get_attr("RTA_PREFSRC")
        hops = [msg] + list(msg.get_attr("RTA_MULTIPATH") or ())
        gateways = tuple(ipaddress.ip_address(hop.get_attr("RTA_GATEWAY")) for hop in hops
                         if hop.get_attr("RTA_GATEWAY"))
        return Route(
            dst=ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False),
            ifname=names.get(msg.get_attr("RTA_OIF")),
            proto=msg["proto"],
            src=ipaddress.ip_address(src) if src else None,
            scope=msg["scope"],
            priority=msg.get_attr("RTA_PRIORITY") or 0,
            gateways=gateways)

    def index(self, name, host):
        link = None if name in self._relinked else host.link(name)
        if link is not None:
            return link.index
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise NetlinkError(errno.ENODEV, f"no interface {name}")
        return found[0]

    def apply(self, plan_actions, host, why=lambda action: ({}, "")):
        """Carry out the actions in order; returns how many failed.

        `why(action)` gives journal fields and a human reason for the log line.
        A failure is logged and the rest goes on: the next reconcile retries.
        """
        failed = 0
        # Links deleted or created here: `host` has stale indexes for those names.
        self._relinked = set()
        # Shims the kernel would not create: the changes on them are skipped, not logged
        # as failures one by one (the creation's error says what to do).
        uncreated = set()
        for action in plan_actions:
            if _shim_of(action) in uncreated:
                failed += 1
                continue
            fields, reason = why(action)
            try:
                self._expecting(action, host)
            except NetlinkError as exc:
                if exc.code in ALREADY_DONE.get(type(action), ()):
                    continue
                if exc.code == errno.EPERM:
                    raise PermissionDenied(
                        f"changing the host's network needs CAP_NET_ADMIN ({action.command()} "
                        "was refused); run as root or through the macvlan-router service"
                    ) from None
                failed += 1
                why_not = _reason(exc, action)
                repeated = isinstance(action, actions.LinkAdd) \
                    and self._refused.get(action.name) == why_not
                log.log(logging.DEBUG if repeated else logging.ERROR, "failed: %s: %s",
                        action.command(), why_not, extra=fields)
                if isinstance(action, actions.LinkAdd):
                    self._refused[action.name] = why_not
                    uncreated.add(action.name)
                continue
            except OSError as exc:
                if not isinstance(action, actions.RefuseRouterAdvertisements):
                    failed += 1
                    log.error("failed: %s: %s", action.command(), exc, extra=fields)
                    continue
                # /proc/sys is read-only (a container, a unit without the ReadWritePaths=
                # the package ships): worth a warning, not a retry loop.
                log.warning("could not %s (%s): if the LAN announces IPv6 routers, the shim "
                            "may get an address and routes of its own", action.command(),
                            exc.strerror, extra=fields)
                continue
            finally:
                if isinstance(action, (actions.LinkAdd, actions.LinkDel)):
                    self._relinked.add(action.name)
            if isinstance(action, actions.LinkAdd):
                self._refused.pop(action.name, None)
            log.info("%s%s", action.command(), reason, extra=fields)
        return failed

    def _expecting(self, action, host):
        """_do(), with the monitor told beforehand of a route deletion it will see."""
        if not isinstance(action, actions.RouteDel):
            self._do(action, host)
            return
        self.own.expect(action.route.dst)
        try:
            self._do(action, host)
        except BaseException:
            self.own.cancel(action.route.dst)
            raise

    def _do(self, action, host):
        ipr = self.ipr
        if isinstance(action, actions.LinkAdd):
            spec = dict(ifname=action.name, kind=action.kind,
                        link=self.index(action.parent, host))
            if action.kind == IPVLAN:
                # Always named: without it the kernel makes an l3 child, and the newest
                # child's mode becomes the mode of every ipvlan child of the parent.
                spec["ipvlan_mode"] = IPVLAN_MODE_NUMBERS[action.mode]
            else:
                spec["macvlan_mode"] = action.mode
            if action.mac:
                spec["address"] = action.mac
            ipr.link("add", **spec)
            # The alias cannot ride on RTM_NEWLINK; if we die before this line the
            # link keeps our name and MAC, which plan.owned_shims() also accepts.
            ipr.link("set", index=self.index(action.name, Host()), ifalias=LINK_ALIAS)
        elif isinstance(action, actions.RefuseRouterAdvertisements):
            refuse_router_advertisements(action.name)
        elif isinstance(action, actions.LinkDel):
            ipr.link("del", index=self.index(action.name, host))
        elif isinstance(action, actions.LinkUp):
            ipr.link("set", index=self.index(action.name, host), state="up")
        elif isinstance(action, actions.ArpFilter):
            set_arp_filter(self.index(action.name, host))
        elif isinstance(action, (actions.AddrAdd, actions.AddrDel)):
            command = "add" if isinstance(action, actions.AddrAdd) else "del"
            extra = {"IFA_FLAGS": IFA_F_NOPREFIXROUTE} if command == "add" else {}
            ipr.addr(command, index=self.index(action.name, host),
                     address=str(action.interface.ip),
                     prefixlen=action.interface.network.prefixlen, **extra)
        elif isinstance(action, actions.RouteReplace):
            spec = action.spec
            ipr.route("replace", dst=str(spec.dst), oif=self.index(spec.shim, host),
                      proto=ROUTE_PROTO, scope=actions.route_scope(spec.dst),
                      prefsrc=str(spec.src), table=MAIN_TABLE,
                      family=socket.AF_INET if spec.dst.version == 4 else socket.AF_INET6)
        elif isinstance(action, actions.NeighDel):
            ipr.neigh("del", dst=str(action.address), ifindex=self.index(action.name, host),
                      family=socket.AF_INET if action.address.version == 4 else socket.AF_INET6)
        elif isinstance(action, actions.RouteDel):
            route = action.route
            kwargs = dict(dst=str(route.dst), proto=ROUTE_PROTO, scope=route.scope,
                          table=MAIN_TABLE,
                          family=socket.AF_INET if route.dst.version == 4 else socket.AF_INET6)
            if route.priority:
                kwargs["priority"] = route.priority
            if route.ifname:
                kwargs["oif"] = self.index(route.ifname, host)
            ipr.route("del", **kwargs)
        else:
            raise TypeError(f"unknown action {action!r}")


def _shim_of(action):
    return action.spec.shim if isinstance(action, actions.RouteReplace) \
        else getattr(action, "name", None)


def _reason(exc, action=None):
    """The kernel's words, and for a shim it would not create, what to do."""
    text = exc.args[1] if len(exc.args) > 1 else str(exc)
    if not isinstance(action, actions.LinkAdd):
        return text
    kind = action.kind
    if exc.code == errno.EOPNOTSUPP:
        return (f"{text}: this kernel cannot make {kind} links (its {kind} module is missing "
                f"or cannot be loaded). Load it (modprobe {kind}; Debian's stock kernel has "
                f"it), or leave the {kind} networks out of MACVLAN_DOCKER_NETWORK")
    if exc.code == errno.EBUSY:
        other = IPVLAN if kind == MACVLAN else MACVLAN
        return (f"{text}: {action.parent} already has {other} children (containers of a "
                f"network macvlan-router does not serve, or links made by hand), and the "
                f"kernel allows only one kind of child on an interface. Serve the {other} "
                f"networks of {action.parent} instead (MACVLAN_DOCKER_NETWORK), or move one "
                "kind to another parent")
    return text


class Change(NamedTuple):
    """One rtnetlink notification, reduced to what the change filter looks at."""

    kind: int
    index: int = 0
    name: Optional[str] = None
    link_state: tuple = ()          # flags, parent, alias, MAC: for links only
    table: int = MAIN_TABLE
    proto: int = 0
    host_route: bool = False        # a /32 or /128 destination
    dst: Optional[ipaddress._BaseNetwork] = None   # for our routes only
    default_route: bool = False     # a /0 destination

    @classmethod
    def of(cls, msg):
        kind = msg["header"]["type"]
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            return cls(kind, msg["index"], msg.get_attr("IFLA_IFNAME"), (
                msg["flags"] & (IFF_UP | IFF_LOWER_UP), msg.get_attr("IFLA_LINK"),
                msg.get_attr("IFLA_IFALIAS"), msg.get_attr("IFLA_ADDRESS")))
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            return cls(kind, msg["index"])
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            v4 = msg["family"] == socket.AF_INET
            dst = None
            if msg["proto"] == ROUTE_PROTO:
                dst = ipaddress.ip_network(
                    f"{msg.get_attr('RTA_DST') or ('0.0.0.0' if v4 else '::')}/{msg['dst_len']}",
                    strict=False)
            return cls(kind, table=msg.get_attr("RTA_TABLE") or msg["table"],
                       proto=msg["proto"], host_route=msg["dst_len"] == (32 if v4 else 128),
                       dst=dst, default_route=msg["dst_len"] == 0)
        return cls(kind)


class OwnChanges:
    """Route deletions the daemon itself is making, so that their notifications do not
    pass for someone else's and cost another reconcile and dump.

    Thread-safe: the main thread expects a deletion before making it (the kernel queues
    the notification before it answers) and cancels it when the deletion failed; the
    monitor takes one expectation per notification. An expectation whose notification
    never came (the monitor was reconnecting) lapses after EXPECTED_FOR seconds, and all
    go on an overflow: until then it could hide someone else's deletion of the same
    route, which the next resync would repair.
    """

    EXPECTED_FOR = 5.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._deletions = {}   # destination -> deadlines, one per deletion expected

    def expect(self, dst):
        with self._lock:
            self._deletions.setdefault(dst, []).append(self.clock() + self.EXPECTED_FOR)

    def cancel(self, dst):
        self.take(dst)

    def take(self, dst):
        """True when a deletion of `dst` was expected (and is now no longer)."""
        with self._lock:
            now = self.clock()
            deadlines = [d for d in self._deletions.pop(dst, ()) if d >= now]
            if not deadlines:
                return False
            if len(deadlines) > 1:
                self._deletions[dst] = deadlines[1:]
            return True

    def forget(self):
        with self._lock:
            self._deletions.clear()


class HostNews:
    """What the monitor saw change since the main thread last looked: links, addresses
    and routes the main thread folds into its snapshot of the host (model.Host.
    with_notified), or a change it cannot (dropped notifications, a message it cannot
    read), which means reading the whole host again.

    Thread-safe: the monitor adds, the main thread takes.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._changes, self._everything = [], False

    def add(self, kind, added, value):
        """A "link", "address" or "route" added (or changed) or deleted; an address's or
        route's `ifname` is still the interface index."""
        with self._lock:
            self._changes.append((kind, added, value))

    def everything(self):
        with self._lock:
            self._everything = True

    def take(self):
        """(the changes in order, whether everything must be read again)."""
        with self._lock:
            news = (self._changes, self._everything)
            self._changes, self._everything = [], False
            return news


class _Indexes:
    """A names-by-index mapping that keeps the index: the monitor has no names."""

    @staticmethod
    def get(index):
        return index


class Watched(NamedTuple):
    """The links whose changes matter (our shims, the managed networks' parents) by name
    and index, the route deletions the daemon is making itself, and where to tell the
    main thread what changed."""

    names: frozenset = frozenset()
    indexes: frozenset = frozenset()
    own: Optional[OwnChanges] = None
    news: Optional[HostNews] = None


class ChangeFilter:
    """Decides which host changes are worth a reconcile (pure; state: links last seen).

    `watched` is a Watched, or None before the first reconcile, meaning "all". Container
    interfaces come and go on every `docker run` and are ignored, and so are our own
    route additions and deletions. Over-reporting is harmless (the reconcile finds
    nothing to do) but costs a netlink dump; under-reporting leaves a repair to the
    resync timer.
    """

    def __init__(self):
        # index -> what we last saw of a link, so that the RTM_NEWLINK a parent gets
        # whenever Docker adds a container's macvlan on it does not count as a change.
        self._links = {}

    def forget(self):
        self._links.clear()

    def relevant(self, change, watched):
        names, indexes, own, _ = watched or Watched()
        if change.kind in (RTM_NEWLINK, RTM_DELLINK):
            if watched is not None and change.name not in names:
                self._links.pop(change.index, None)
                return False
            if change.kind == RTM_DELLINK:
                self._links.pop(change.index, None)
                return True
            seen = (change.name, change.link_state)
            changed = self._links.get(change.index) != seen
            self._links[change.index] = seen
            return changed
        if change.kind in (RTM_NEWADDR, RTM_DELADDR):
            return watched is None or change.index in indexes
        if change.kind in (RTM_NEWROUTE, RTM_DELROUTE):
            if change.table != MAIN_TABLE:
                return False  # the kernel's local and broadcast routes, for one
            ours = change.proto == ROUTE_PROTO
            if ours and change.kind == RTM_DELROUTE:
                # Ours deleted by someone else: repair.
                return own is None or not own.take(change.dst)
            # A foreign host route may now block or free one of ours. A default route
            # moves the host's gateways (which the route-safety policy keeps off the
            # shims) and the parent of a network that names none.
            return not ours and (change.host_route or change.default_route)
        return False


def _messages(data):
    """(type, offset, length) of each netlink message in one datagram."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            return
        yield kind, offset, length
        offset += (length + 3) & ~3


def worth_decoding(kind, data, offset, length, watched):
    """False for a notification ChangeFilter.relevant would turn down anyway, told from
    the fixed header fields (and a link's name) without decoding it."""
    if kind not in (RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE,
                    RTM_DELROUTE):
        return False
    if watched is None:
        return True
    body = offset + NLMSG_HEADER.size
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        return IFADDRMSG_INDEX.unpack_from(data, body + 4)[0] in watched.indexes
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        return IFINFOMSG_INDEX.unpack_from(data, body + 4)[0] in watched.indexes \
            or _link_name(data, body + 16, offset + length) in watched.names
    family, dst_len, _, _, table, proto = RTMSG_HEAD.unpack_from(data, body)
    if table != MAIN_TABLE:
        # A table above 255 is in RTA_TABLE, with RT_TABLE_COMPAT here: not main either.
        return False
    if proto == ROUTE_PROTO:
        return kind == RTM_DELROUTE
    return dst_len in (0, 32 if family == socket.AF_INET else 128)


def _link_name(data, offset, end):
    """IFLA_IFNAME of a link message (the kernel puts it first), or None."""
    while offset + 4 <= end:
        size, kind = NLATTR_HEADER.unpack_from(data, offset)
        if size < 4:
            return None
        if kind == IFLA_IFNAME:
            return data[offset + 4:offset + size].split(b"\0", 1)[0].decode(errors="replace")
        offset += (size + 3) & ~3
    return None


class Monitor:
    """Calls `on_change()` when something we care about changes in this namespace."""

    GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
              | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)

    def __init__(self, on_change, watched=lambda: None):
        self.on_change = on_change
        self.watched = watched
        self.filter = ChangeFilter()
        self.thread = threading.Thread(target=self._run, name="netlink-monitor", daemon=True)

    def start(self):
        self.thread.start()

    def _run(self):
        delay = 0.1
        while True:
            try:
                with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
                    sock.bind((0, self.GROUPS))
                    # Anything may have changed while we were not listening.
                    self._everything()
                    self.on_change()
                    delay = 0.1
                    self._listen(sock)
            except Exception as exc:  # noqa: BLE001 - a lost monitor must come back
                log.warning("netlink monitor restarting after: %s", exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _listen(self, sock):
        marshal = MarshalRtnl()
        while True:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped notifications we were too slow to read: any of
                # them may have mattered, so re-read the whole host.
                log.warning("the netlink monitor fell behind and the kernel dropped host "
                            "changes (ENOBUFS); re-reading the whole host")
                self.filter.forget()
                watched = self.watched()
                if watched is not None and watched.own is not None:
                    watched.own.forget()
                self._everything()
                self.on_change()
                continue
            watched = self.watched()
            relevant = False
            # Only what may matter is decoded (pyroute2 takes about 0.1 ms a link
            # message, in Python, while the main thread waits for the interpreter):
            # every `docker run` sends several for the container's own interface.
            for msg in (msg for kind, offset, length in _messages(data)
                        if worth_decoding(kind, data, offset, length, watched)
                        for msg in marshal.parse(data[offset:offset + length])):
                change = Change.of(msg)
                if self.filter.relevant(change, watched):
                    relevant = True
                    self._tell(watched, change, msg)
            if relevant:
                self.on_change()

    def _everything(self):
        watched = self.watched()
        if watched is not None and watched.news is not None:
            watched.news.everything()

    @staticmethod
    def _tell(watched, change, msg):
        """Pass a change on as a model value for the main thread's snapshot."""
        if watched is None or watched.news is None:
            return
        if change.kind in (RTM_NEWROUTE, RTM_DELROUTE):
            watched.news.add("route", change.kind == RTM_NEWROUTE, Netlink._route(msg, _Indexes))
        elif change.kind in (RTM_NEWLINK, RTM_DELLINK):
            watched.news.add("link", change.kind == RTM_NEWLINK, Netlink._link(msg))
        else:
            address = Netlink._address(msg, _Indexes)
            if address is None:
                watched.news.everything()
            else:
                watched.news.add("address", change.kind == RTM_NEWADDR, address)
