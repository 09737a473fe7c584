"""What the host should look like: a pure function of config, Docker networks and host.

No I/O here. Every decision that can go wrong for the user becomes a Problem
whose message names the network, the setting, the value and the fix.
"""

import dataclasses
import functools
import hashlib
import ipaddress
from collections import defaultdict

from . import safety
from .config import IFNAMSIZ
from .model import IPVLAN, IPVLAN_MODES, LINK_ALIAS, MACVLAN, SHIM_KINDS, Desired, \
    ManagedNetwork, Problem, RouteSpec, ShimSpec, is_kind

COMPOSE_NETWORK_LABEL = "com.docker.compose.network"
SHIM_PREFIX = "mvr-"


def select_networks(selectors, networks, engine="Docker"):
    """Pick the managed networks from Docker's list; returns (networks, problems).

    No selectors means every macvlan and ipvlan network. A name also matches the short
    name Compose records in a label, since Compose prefixes the project name.
    """
    served = [n for n in networks if n.driver in SHIM_KINDS]
    if not selectors:
        return served, []
    chosen, problems = {}, []
    for selector in selectors:
        matches = _matches(selector, networks)
        wrong = [n for n in matches if n.driver not in SHIM_KINDS]
        for network in wrong:
            problems.append(Problem(
                f"MACVLAN_DOCKER_NETWORK={selector.text}: network {network.name} uses the "
                f"{network.driver} driver, not macvlan or ipvlan; name a macvlan or ipvlan "
                "network", network.name))
        for network in matches:
            if network.driver in SHIM_KINDS:
                chosen.setdefault(network.id, network)
        if not matches and not selector.is_label:
            known = ", ".join(sorted(n.name for n in served)) or "none"
            problems.append(Problem(
                f"MACVLAN_DOCKER_NETWORK={selector.text}: {engine} has no network with that "
                f"name or ID (macvlan and ipvlan networks now: {known}); create it or fix "
                "the setting"))
    return list(chosen.values()), problems


def _matches(selector, networks):
    if selector.is_label:
        return [n for n in networks
                if any(k == selector.label_key
                       and (selector.label_value is None or v == selector.label_value)
                       for k, v in n.labels)]
    exact = [n for n in networks if n.name == selector.text or n.id == selector.text]
    if exact:
        return exact
    composed = [n for n in networks if (COMPOSE_NETWORK_LABEL, selector.text) in n.labels]
    if composed:
        return composed
    by_prefix = [n for n in networks if n.id.startswith(selector.text.lower())]
    return by_prefix if len(by_prefix) == 1 else []


def default_shim_name(parent):
    name = SHIM_PREFIX + parent
    if len(name.encode()) < IFNAMSIZ:
        return name
    # Keep it readable and stable: a prefix of the parent plus a short hash of all of it.
    digest = hashlib.sha256(parent.encode()).hexdigest()[:4]
    room = IFNAMSIZ - 1 - len(SHIM_PREFIX) - 1 - len(digest)
    return f"{SHIM_PREFIX}{parent.encode()[:room].decode(errors='ignore')}-{digest}"


@functools.lru_cache(maxsize=256)
def stable_mac(machine_id, parent):
    """A locally administered unicast MAC that stays the same across restarts and reboots.

    LAN neighbours cache the shim's MAC; a random one on every restart would leave
    them with stale entries.
    """
    if not machine_id:
        return None
    digest = bytearray(hashlib.sha256(f"{machine_id}:{parent}:mac".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


def stable_ipv6(machine_id, parent, subnet, taken):
    """An address in `subnet` derived from the machine and parent, avoiding `taken`."""
    host_bits = subnet.max_prefixlen - subnet.prefixlen
    if host_bits < 2:
        return None
    for attempt in range(64):
        seed = f"{machine_id}:{parent}:{subnet}:{attempt}".encode()
        number = int.from_bytes(hashlib.sha256(seed).digest(), "big") % (2 ** host_bits)
        candidate = subnet.network_address + number
        if number not in (0, 1) and candidate != subnet.broadcast_address \
                and candidate not in taken:
            return candidate
    return None


class Memo:
    """Each network's routes as computed last, so that an event costs work for what it
    changed: a network that is the same object as last time (view.View keeps a network's
    object until a read of it answers) with the same inputs is reused whole; a changed
    one is patched for the endpoints that are not the very objects it had (docker_source
    keeps an unchanged endpoint's object); and the routes of all networks together are
    patched at the destinations that changed, when no two networks (or endpoints) share
    one. A fresh Memo (or none) gives the full computation; all give the same Desired.

    The Desired a computation returns holds `routes`, which the next computation with
    the same memo patches in place: use a Desired before computing the next one."""

    def __init__(self):
        self.networks = {}   # network id -> _Routes, of the networks routed last time
        # All their routes, with the ADDITIONAL_ROUTES prefixes `extra` among them; None:
        # build them anew (first time, after an overlap, or a computation that failed).
        self.routes, self.extra = None, ()
        # network id -> (what its shim addresses were computed from, sources, problems)
        self.sources = {}
        self.host = None     # (host addresses, safety.HostFacts) of the last computation


class _Overlap(Exception):
    """Two networks or endpoints share a destination: only a full merge says who wins."""


@dataclasses.dataclass(frozen=True)
class _Routes:
    """One network's endpoints as routes: `steps` per container id, (the endpoint, its
    steps), each step a Problem or a (RouteSpec, who) candidate, and what they add up to
    when no other network has the same destinations."""

    network: object
    inputs: tuple
    steps: dict
    routes: dict
    problems: tuple
    distinct: bool        # no two endpoints share a destination
    # Destinations whose route may differ from the entry this one was built from (with
    # the same inputs); None: any may.
    delta: object = None
    # `steps` are in the order of network.endpoints (a patched entry's are not), and
    # keyed by container id alone (a test may repeat one: then by (id, position)).
    ordered: bool = True
    keyed: bool = True
    troubled: frozenset = frozenset()   # the keys of the steps with a Problem

    @functools.cached_property
    def destinations(self):
        # As a set: set operations between sets reuse the hashes they keep, where a
        # dict's keys view would hash every address again in Python.
        return frozenset(self.routes)

    def in_order(self):
        if self.ordered:
            return self.steps.values()
        return (self.steps[e.container_id] for e in self.network.endpoints)


def compute(config, networks, host, memo=None):
    """Return the Desired state for the managed `networks` on `host` (`memo`: see Memo)."""
    memo = memo or Memo()
    routes, memo.routes = memo.routes, None
    if routes is not None:
        try:
            return _compute(config, networks, host, memo, routes)
        except _Overlap:
            pass
    return _compute(config, networks, host, memo, None)


def _compute(config, networks, host, memo, patched):
    """compute(); `patched`: the last computation's routes, patched here (an _Overlap
    when that cannot be done), or None to merge every network's routes anew."""
    fresh = {}
    problems = []
    shims, managed = {}, []
    if patched is None:
        routes, taken, clean = {}, set(), True
    else:
        routes = patched
        for prefix in memo.extra:
            routes.pop(prefix, None)
    host_ips = _host_ips(host)
    networks = [_servable(_with_parent(network, host, problems), problems)
                for network in networks]
    # Our shims' addresses are not in host_ips: they are derived from the desired state,
    # and _route_endpoint refuses a shim's own address by itself.
    facts = safety.HostFacts(
        addresses=frozenset(host_ips),
        default_gateways=host.default_gateways(),
        subnets=tuple((subnet, frozenset(g for g in n.gateways if g in subnet))
                      for n in networks for subnet in n.subnets))
    # The last ones when equal: each network's inputs then compare them by identity.
    if (host_ips, facts) == memo.host:
        host_ips, facts = memo.host
    memo.host = (host_ips, facts)
    by_parent = defaultdict(list)
    for network in networks:
        if network.parent:
            by_parent[network.parent].append(network)
        else:
            managed.append(ManagedNetwork(network, None))
    names = _shim_names(config, sorted(by_parent), host, problems)
    sources_memo = {}

    for parent in sorted(by_parent):
        members = by_parent[parent]
        name = names.get(parent)
        parent_link = host.link(parent)
        if name is None or parent_link is None:
            if name is not None:
                # The host's doing (a VLAN link not created yet, a renamed NIC), not the
                # configuration's: it costs this network only, also when named.
                for network in members:
                    problems.append(Problem(
                        f"network {network.name}: its parent interface {parent} does not "
                        f"exist on this host; create {parent} or recreate the network with "
                        "-o parent=<an existing interface>", network.name, kind="warning"))
            managed.extend(ManagedNetwork(n, None) for n in members)
            continue
        if not parent_link.up:
            problems.append(Problem(f"parent interface {parent} is down; waiting for it",
                                    kind="waiting"))
        kind, served = _shim_kind(parent, _reachable(members, problems), name, host, problems)
        managed.extend(ManagedNetwork(n, None) for n in members if n not in served)
        shim_addresses = set()
        for network in served:
            managed.append(ManagedNetwork(network, name))
            key = (network, parent, host.addresses, host.links, host.machine_id, config)
            known = memo.sources.get(network.id)
            if known is None or not all(a is b for a, b in zip(known[0], key)):
                found = []
                sources = {subnet: source for subnet in network.subnets
                           for source in [_shim_address(config, network, subnet, parent,
                                                        name, host, host_ips, found)]
                           if source is not None}
                known = (key, sources, tuple(found), frozenset(
                    ipaddress.ip_interface(f"{source}/{source.max_prefixlen}")
                    for source in sources.values()))
            sources_memo[network.id] = known
            _, sources, found, interfaces = known
            problems.extend(found)
            shim_addresses |= interfaces
            # The parent too: a network that names none follows the default route.
            inputs = (network.name, parent, tuple(sources.items()), name, host_ips, facts)
            old = memo.networks.get(network.id)
            entry = _network_routes(network, inputs, old)
            fresh[network.id] = entry
            if patched is None:
                clean &= _merge(entry, routes, taken, problems)
            else:
                if old is not entry:
                    _patch(routes, old, entry)
                problems.extend(entry.problems)
        if shim_addresses:
            # ipvlan children all have the parent's MAC.
            mac = stable_mac(host.machine_id, parent) if kind[0] == MACVLAN else None
            shims[name] = ShimSpec(name=name, parent=parent, mac=mac,
                                   addresses=frozenset(shim_addresses),
                                   kind=kind[0], mode=kind[1])
    if patched is not None:
        for network_id in memo.networks.keys() - fresh.keys():
            _patch(routes, memo.networks[network_id], None)

    # Only a fixed list of names makes the set of networks the configuration's own: with
    # every network or a label served, a `docker network rm` must not stop the next start.
    fixed = bool(config.networks) and not any(s.is_label for s in config.networks)
    _outside_addresses(fixed, config.bridge_ips, "MACVLAN_BRIDGE_IP", networks, problems)
    _outside_addresses(fixed, config.bridge_ip6s, "MACVLAN_BRIDGE_IP6", networks, problems)
    free = [prefix for prefix in config.additional_routes if prefix not in routes]
    _additional_routes(fixed, config.additional_routes, shims, managed, facts, routes,
                       problems)
    changed = _changed(memo.networks, fresh, config) if memo.networks else None
    memo.networks, memo.sources = fresh, sources_memo
    if patched is not None or clean:
        memo.routes, memo.extra = routes, tuple(p for p in free if p in routes)
    return Desired(shims=shims, routes=routes, networks=tuple(managed),
                   problems=tuple(problems), changed=changed)


def _patch(routes, old, new):
    """All networks' `routes`, held by one network each, with network `old` replaced by
    `new` (either None: a network routed only before, or only now). _Overlap when `new`
    takes a destination another network holds, or two of its endpoints share one."""
    if new is not None and not new.distinct:
        raise _Overlap
    if old is not None and new is not None and new.delta is not None:
        delta = new.delta
    else:
        delta = (old.destinations if old else frozenset()) | (
            new.destinations if new else frozenset())
    for dst in delta:
        spec = new.routes.get(dst) if new is not None else None
        if spec is not None:
            if dst in routes and (old is None or dst not in old.routes):
                raise _Overlap
            routes[dst] = spec
        elif old is not None and dst in old.routes:
            del routes[dst]


def _changed(before, now, config):
    """Destinations whose route may differ between two computations: those of every
    network computed anew or gone (a destination two networks hold included), the ones
    a network patched or reused with the same inputs says changed, and the configured
    additional routes."""
    changed = set(config.additional_routes)
    for network_id in before.keys() | now.keys():
        old, new = before.get(network_id), now.get(network_id)
        if old is new:
            continue
        if old is None or new is None or new.delta is None:
            changed.update(d for entry in (old, new) if entry is not None
                           for d in entry.destinations)
        else:
            changed.update(new.delta)
    return frozenset(changed)


def _servable(network, problems):
    """The network without subnets too wide to be a LAN (an engine's odd answer)."""
    wide = [s for s in network.subnets if safety.too_wide(s)]
    for subnet in wide:
        problems.append(Problem(
            f"network {network.name}: {network.engine} reports the subnet {subnet}, wider than "
            f"/{safety.WIDEST[subnet.version]}; routing it via a shim would take over the "
            "host's general traffic, so it is not served. Recreate the network with its "
            "LAN's real subnet", network.name, kind="warning"))
    if not wide:
        return network
    return dataclasses.replace(network, subnets=tuple(
        s for s in network.subnets if s not in wide))


def _with_parent(network, host, problems):
    """The network with the interface of the host's default route as its parent, when it
    names none and its containers take that one (Podman's blank parent)."""
    if network.parent or not network.default_route_parent:
        return network
    parent = host.default_route_interface()
    if parent is None:
        problems.append(Problem(
            f"network {network.name} names no parent interface, so its containers use the "
            "interface of the host's default route, and this host has no default route; "
            "add one, or recreate the network with -o parent=<interface>", network.name,
            kind="warning"))
        return network
    return dataclasses.replace(network, parent=parent)


def _reachable(members, problems):
    """The networks a shim can reach the containers of: macvlan ones in bridge mode, and
    ipvlan ones in a mode the shim can share, whose children may talk to each other
    (ipvlan_flag bridge)."""
    reachable = []
    for network in members:
        if network.driver != IPVLAN:
            if network.macvlan_mode in (None, "bridge"):
                reachable.append(network)
            else:
                problems.append(_unreachable_macvlan(network))
        elif network.ipvlan_mode not in IPVLAN_MODES:
            problems.append(Problem(
                f"network {network.name} has ipvlan_mode={network.ipvlan_mode}, which "
                f"macvlan-router does not know ({', '.join(IPVLAN_MODES)}); it is not served, "
                "since a shim in another mode would switch its containers to that mode",
                network.name, kind="warning"))
        elif network.ipvlan_flag != "bridge":
            problems.append(Problem(
                f"network {network.name} has ipvlan_flag={network.ipvlan_flag}: its "
                "containers cannot talk to the other ipvlan children of "
                f"{network.parent} (private) or only through the LAN switch (vepa), so a "
                "shim cannot reach them; it is not served. Recreate it without ipvlan_flag "
                "(bridge) to reach its containers from this host",
                network.name, kind="warning"))
        else:
            reachable.append(network)
    return reachable


def _unreachable_macvlan(network):
    why = {"private": "its containers cannot talk to the other macvlan children of "
                      f"{network.parent}",
           "vepa": "its containers reach the other macvlan children only through a LAN "
                   "switch that sends frames back where they came from",
           "passthru": f"its container must be the only child of {network.parent}: a shim "
                       "there would keep it from starting"}.get(
        network.macvlan_mode, "macvlan-router does not know that mode")
    return Problem(
        f"network {network.name} has macvlan_mode={network.macvlan_mode}: {why}, so a shim "
        "cannot reach them; it is not served. Recreate it without macvlan_mode (bridge) to "
        "reach its containers from this host", network.name, kind="warning")


def _shim_kind(parent, members, name, host, problems):
    """(the (kind, mode) of the shim on `parent`, or None; the networks it serves).

    The kernel holds one kind of child per interface (and one ipvlan mode), so networks
    asking for several on one parent cannot all be served. The kind of the shim already
    there wins, so that no route it serves goes; else the kind whose containers run (the
    kernel has that kind on the parent now); else none: the parent gets no shim, since
    one of either kind would keep the other kind's containers from starting. The
    networks left out are reported with what to do.
    """
    kinds = {}
    for network in members:
        kinds.setdefault(network.shim_kind, []).append(network)
    if len(kinds) < 2:
        return next(iter(kinds), None), members
    link = host.link(name) if name else None
    present = next((k for k in kinds if link is not None and link.alias == LINK_ALIAS
                    and host.link_name(link.parent_index) == parent and is_kind(link, k)),
                   None)
    running = [k for k, networks in kinds.items() if any(n.endpoints for n in networks)]
    if present:
        chosen, why = present, f"the kind of {name}, the shim it has now"
    elif len(running) == 1:
        chosen, why = running[0], "the kind whose containers run there"
    else:
        chosen, why = None, None
    listing = "; ".join(f"{_kind_words(k)}: {', '.join(n.name for n in networks)}"
                        for k, networks in sorted(kinds.items()))
    left = [n.name for k, networks in sorted(kinds.items()) if k != chosen for n in networks]
    verdict = (f"only the {_kind_words(chosen)} networks are served, {why}" if chosen else
               f"none is served and {parent} gets no shim until containers of one kind run "
               "there (a shim of either kind would keep the other kind's containers from "
               "starting)")
    problems.append(Problem(
        f"parent interface {parent} has networks that need different kinds of shim "
        f"({listing}); the kernel allows only one kind of child (macvlan, or ipvlan in one "
        f"mode) on an interface, so {verdict}. Give each kind its own parent (docker "
        "network create ... -o parent=<another interface or VLAN>), or serve one kind only: "
        f"leave {', '.join(left)} out of MACVLAN_DOCKER_NETWORK", kind="warning"))
    return chosen, kinds.get(chosen, [])


def _kind_words(kind):
    return kind[0] if kind[0] == MACVLAN else f"{kind[0]} {kind[1]}"


def _host_ips(host):
    """Addresses the host holds on links that are not our shims (ours are derived)."""
    ours = {link.name for link in host.links if link.alias == LINK_ALIAS}
    return {a.ip: a.ifname for a in host.addresses if a.ifname not in ours}


def _shim_names(config, parents, host, problems):
    """The shim name per parent; two parents never share one."""
    explicit = dict(config.interface_names)
    names = {parent: explicit.get(parent) or default_shim_name(parent) for parent in parents}
    single = explicit.get(None)
    if single and parents:
        # One name for several parents: it stays where it already is (or goes to the
        # first parent), so a new network on another parent never takes it away.
        current = host.link(single)
        holder = current and host.link_name(current.parent_index)
        owner = holder if holder in parents else parents[0]
        names[owner] = single
        if len(parents) > 1:
            problems.append(Problem(
                f"MACVLAN_BRIDGE_INTERFACE_NAME={single} names one shim, but the managed "
                f"networks use {len(parents)} parents ({', '.join(parents)}); {single} serves "
                f"{owner}, the others get default names. Write PARENT=NAME for each, e.g. "
                + " ".join(f"{p}={names[p]}" for p in parents), kind="warning"))
    taken = {}
    for parent in parents:
        if names[parent] in parents or names[parent] == "lo":
            problems.append(Problem(
                f"MACVLAN_BRIDGE_INTERFACE_NAME would name the shim on {parent} "
                f"{names[parent]}, which is a network's parent interface; choose a free name, "
                f"e.g. {parent}={default_shim_name(parent)}"))
            names[parent] = None
            continue
        other = taken.setdefault(names[parent], parent)
        if other != parent:
            problems.append(Problem(
                f"parents {other} and {parent} would both get the shim name {names[parent]}; "
                "give each its own with MACVLAN_BRIDGE_INTERFACE_NAME=PARENT=NAME pairs"))
            names[parent] = None
    return names


def _shim_address(config, network, subnet, parent, shim, host, host_ips, problems):
    """The shim's own address for one subnet of `network`, or None (with a Problem)."""
    if subnet.version == 4:
        configured = [a for a in config.bridge_ips if a in subnet]
        reuse = [a.ip for a in host.addresses_of(parent) if a.ip in subnet]
        if network.driver == IPVLAN and reuse and not configured:
            problems.append(_no_reuse_on_ipvlan(network, subnet, parent, reuse[0]))
            return None
        if network.driver == IPVLAN and configured and configured[0] in host_ips:
            problems.append(_no_reuse_on_ipvlan(network, subnet, parent, configured[0],
                                                host_ips[configured[0]]))
            return None
        if configured or reuse:
            address = (configured or reuse)[0]
            return _checked(address, "MACVLAN_BRIDGE_IP" if configured else None, network,
                            problems)
        kept = sorted(a.ip for a in host.addresses_of(shim) if a.ip in subnet)
        if kept and network.driver != IPVLAN:
            # The host's address left the parent, most often for a moment: a network
            # manager reconnecting it (NetworkManager does, measured in a VM). Dropping the
            # shim's copy would take every route of the network with it.
            problems.append(Problem(
                f"network {network.name}: the host has no address in {subnet} on {parent} "
                f"now; the shim {shim} keeps its address {kept[0]}, so the containers' "
                "routes stay, and takes the host's address again when one appears. To stop "
                "serving the network, leave it out of MACVLAN_DOCKER_NETWORK",
                network.name, kind="waiting"))
            return kept[0]
        hint = ("none of MACVLAN_BRIDGE_IP=" + ",".join(map(str, config.bridge_ips))
                + " lies in it, and " if config.bridge_ips else "")
        # Common and legitimate (a VLAN the host itself is not on): skip, do not fail.
        problems.append(Problem(
            f"network {network.name} ({subnet} on {parent}) is skipped: {hint}the host has no "
            f"address in {subnet} on {parent} to reuse; to reach it from this host, set "
            f"MACVLAN_BRIDGE_IP to a free address of {subnet} (and {keep_off(network)})",
            network.name, kind="warning"))
        return None
    configured = [a for a in config.bridge_ip6s if a in subnet]
    if configured:
        return _checked(configured[0], "MACVLAN_BRIDGE_IP6", network, problems)
    taken = {e.ipv6 for e in network.endpoints}
    generated = stable_ipv6(host.machine_id or network.id, parent, subnet,
                            taken | set(host_ips) | network.gateways | network.aux_addresses)
    if generated is None:
        problems.append(Problem(
            f"network {network.name} ({subnet} on {parent}): the subnet has no room for a "
            "generated shim address; set MACVLAN_BRIDGE_IP6", network.name, kind="warning"))
    return generated


def _no_reuse_on_ipvlan(network, subnet, parent, address, configured_on=None):
    """`configured_on`: the host's interface that holds MACVLAN_BRIDGE_IP=`address`, when
    the setting names a host address rather than the shim reusing one by default."""
    # Measured in a VM: see README.md, "ipvlan networks".
    what = (f"MACVLAN_BRIDGE_IP={address} is this host's address on {configured_on}, and "
            if configured_on else "")
    return Problem(
        f"network {network.name} ({subnet} on {parent}) is skipped: {what}an ipvlan shim "
        f"cannot reuse the host's address {address}, since ipvlan hands every packet to the "
        f"child that holds its destination address: the host's own traffic to {address} "
        f"would arrive on the shim instead of {configured_on or parent}. Set "
        f"MACVLAN_BRIDGE_IP to a free address of {subnet} for the shim (and "
        f"{keep_off(network)})", network.name, kind="error" if configured_on else "warning")


def keep_off(network, address=None, name="shim"):
    """How to keep the network's engine from giving a container `address` (None: the
    address the user is about to choose), in that engine's own words."""
    if network.engine == "Podman":
        return ("keep Podman off it: Podman has no --aux-address, so recreate the network "
                "with an --ip-range that leaves it out (podman network create ... "
                "--ip-range ...)")
    if address is None:
        return "keep Docker off it with --aux-address"
    return (f"keep Docker off it (docker network create ... --aux-address {name}={address}) "
            "or use --ip-range")


def _checked(address, key, network, problems):
    """The shim's address, unless it is the network's gateway; warn if Docker may hand it out."""
    what = f"{key}={address}" if key else f"the host's address {address}, which the shim reuses,"
    if address in network.gateways:
        problems.append(Problem(
            f"{what} is the gateway of network {network.name} (the LAN's router); "
            + ("choose a free address" if key else
               f"set MACVLAN_BRIDGE_IP to a free address of {network.name}'s subnet"),
            network.name, kind="error" if key else "warning"))
        return None
    edge = next((f"the {name} address of {subnet}" for subnet in network.subnets
                 if subnet.version == 4 and subnet.prefixlen < 31 and address in subnet
                 for name, value in (("network", subnet.network_address),
                                     ("broadcast", subnet.broadcast_address))
                 if address == value), None)
    if edge:
        problems.append(Problem(
            f"{what} is {edge} of network {network.name}, which no host may use; "
            + ("give a free host address of the subnet" if key else
               f"set MACVLAN_BRIDGE_IP to a free address of {network.name}'s subnet"),
            network.name, kind="error" if key else "warning"))
        return None
    pools = [r for r in network.ip_ranges if r.version == address.version] or \
        [s for s in network.subnets if s.version == address.version]
    if not network.dhcp and address not in network.aux_addresses \
            and any(address in pool for pool in pools):
        problems.append(Problem(
            f"{what} lies where {network.engine} allocates container addresses in network "
            f"{network.name} and is not reserved: a new container may get it; "
            f"{keep_off(network, address, 'shim')}",
            network.name, kind="warning"))
    return address


def _network_routes(network, inputs, previous):
    """The _Routes of `network`, reusing what `previous` computed with the same inputs."""
    if previous is not None and previous.inputs == inputs:
        if previous.network is network:
            return previous
        try:
            return _patched(network, inputs, previous)
        except _Overlap:
            known = previous.steps
    else:
        previous, known = None, {}
    _, _, sources, shim, host_ips, facts = inputs
    sources = dict(sources)
    steps, reused = {}, set()
    for position, endpoint in enumerate(network.endpoints):
        # By container id, a cheap key; the endpoint itself is compared only when it is
        # not the very object translated before (docker_source reuses unchanged ones).
        key = endpoint.container_id
        if key in steps:  # Docker keys endpoints by container id: only a test repeats one
            key = (key, position)
        before = known.get(key)
        if before is not None and (before[0] is endpoint or before[0] == endpoint):
            found = before[1]
            reused.add(key)
        else:
            found = _steps(network, endpoint, sources, shim, host_ips, facts)
        steps[key] = (endpoint, found)
    routes, problems, troubled, count = {}, [], set(), 0
    for key, (_, found) in steps.items():
        for step in found:
            if isinstance(step, Problem):
                problems.append(step)
                troubled.add(key)
            else:
                routes[step[0].dst] = step[0]
                count += 1
    delta = None
    if previous is not None:
        delta = frozenset(_destinations(
            found for steps_ in (steps, known) for key, (_, found) in steps_.items()
            if key not in reused))
    return _Routes(network, inputs, steps, routes, tuple(problems), count == len(routes),
                   delta=delta, keyed=all(isinstance(key, str) for key in steps),
                   troubled=frozenset(troubled))


def _patched(network, inputs, previous):
    """`previous` (same inputs, distinct, keyed) with the endpoints it had and `network`
    has not gone, and the new ones added; _Overlap when only a full pass can tell (a
    container id twice, or two endpoints with one destination).

    docker_source keeps the endpoints in container id order and an unchanged one's
    object, so what changed lies between the common head and the common tail of the two
    tuples; tuple comparison finds them in C (an object is equal to itself at once)."""
    if not (previous.distinct and previous.keyed):
        raise _Overlap
    before, now = previous.network.endpoints, network.endpoints
    head = _common_head(before, now)
    tail = _common_head(before[head:][::-1], now[head:][::-1])
    steps, routes, delta = dict(previous.steps), dict(previous.routes), set()
    bad = set(previous.troubled)
    for endpoint in before[head:len(before) - tail]:
        _, found = steps.pop(endpoint.container_id)
        bad.discard(endpoint.container_id)
        for dst in _destinations([found]):
            del routes[dst]
            delta.add(dst)
    _, _, sources, shim, host_ips, facts = inputs
    sources = dict(sources)
    for endpoint in now[head:len(now) - tail]:
        if endpoint.container_id in steps:
            raise _Overlap
        found = _steps(network, endpoint, sources, shim, host_ips, facts)
        steps[endpoint.container_id] = (endpoint, found)
        for step in found:
            if isinstance(step, Problem):
                bad.add(endpoint.container_id)
            elif step[0].dst in routes:
                raise _Overlap
            else:
                routes[step[0].dst] = step[0]
                delta.add(step[0].dst)
    # Problems in the endpoints' order, as a full pass gives them.
    problems = () if not bad else tuple(
        step for e in network.endpoints if e.container_id in bad
        for step in steps[e.container_id][1] if isinstance(step, Problem))
    return _Routes(network, inputs, steps, routes, problems, True, delta=frozenset(delta),
                   ordered=False, troubled=frozenset(bad))


def _common_head(a, b):
    """How many leading items `a` and `b` share, by binary search over slices."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _steps(network, endpoint, sources, shim, host_ips, facts):
    return tuple(step for step in (
        _route_endpoint(network, endpoint, address, sources, shim, host_ips, facts)
        for address in (endpoint.ipv4, endpoint.ipv6) if address is not None)
        if step is not None)


def _destinations(founds):
    return (step[0].dst for found in founds for step in found
            if not isinstance(step, Problem))


def _merge(entry, routes, taken, problems):
    """Add one network's routes: at once when no destination is taken, else in order, the
    first network (by name) keeping a destination two networks hold. `taken`: the keys
    of `routes` as a set. False when a destination was shared."""
    if entry.distinct and taken.isdisjoint(entry.destinations):
        routes.update(entry.routes)
        taken |= entry.destinations
        problems.extend(entry.problems)
        return True
    for _, found in entry.in_order():
        for step in found:
            if isinstance(step, Problem):
                problems.append(step)
                continue
            spec, who = step
            if spec.dst in routes:
                problems.append(Problem(
                    f"{who} holds {spec.dst.network_address}, which network "
                    f"{routes[spec.dst].network} also routes; overlapping subnets on two "
                    "parents cannot both be reached, so only the first is routed",
                    spec.network, kind="warning"))
            else:
                routes[spec.dst] = spec
                taken.add(spec.dst)
    return False


def _route_endpoint(network, endpoint, address, sources, shim, host_ips, facts):
    """One endpoint address: a (RouteSpec, who) candidate, a Problem, or None."""
    subnet = next((s for s in sources if address in s), None)
    if subnet is None:
        return None  # No shim address for that subnet: already reported.
    source = sources[subnet]
    who = f"container {endpoint.container_name} ({endpoint.short_id}) on network {network.name}"
    if address == source or address in host_ips:
        six = "6" if address.version == 6 else ""
        owner, other = ((f"the shim's address on {shim}",
                         f", or set MACVLAN_BRIDGE_IP{six} to another free address")
                        if address == source else
                        (f"the host's own address on {host_ips[address]}", ""))
        # Docker handed out an address it should not have: that costs this container its
        # route, never the service (a restart would otherwise stop on it).
        return Problem(
            f"{who} holds {address}, {owner}; that container is not routed: "
            f"{keep_off(network, address, 'host')}{other}",
            network.name, kind="warning")
    spec = RouteSpec(dst=ipaddress.ip_network(address), shim=shim, src=source,
                     network=network.name, container_id=endpoint.container_id,
                     container_name=endpoint.container_name,
                     # ipvlan children answer at the parent's MAC, whatever Docker records.
                     mac=endpoint.mac if network.driver != IPVLAN else None)
    return _want_route(spec, facts, lambda reason: (
        f"{who} holds {address}, which is not routed: {reason}")) or (spec, who)


def _want_route(spec, facts, refused, kind="warning"):
    """None when the route-safety policy lets `spec` be, else the Problem saying why not:
    the one gate every route passes."""
    reason = safety.refusal(spec.dst, facts)
    if reason:
        return Problem(refused(reason), spec.network or None, kind=kind)
    return None


def _outside_addresses(fixed, configured, key, networks, problems):
    """`fixed`: the networks are the configuration's own (named), so this is its error."""
    subnets = [s for n in networks for s in n.subnets]
    for address in configured:
        if not any(address in subnet for subnet in subnets):
            listing = ", ".join(f"{n.name}: {s}" for n in networks for s in n.subnets) \
                or "none"
            problems.append(Problem(
                f"{key}={address} lies in none of the managed networks' subnets "
                f"({listing}); use a free address inside one of them"
                + ("" if fixed else ", or remove it if its network is gone"),
                kind="error" if fixed else "warning"))


def _additional_routes(fixed, prefixes, shims, managed, facts, routes, problems):
    subnets = [(s, m.shim) for m in managed if m.shim in shims for s in m.network.subnets]
    for prefix in prefixes:
        family = [(subnet, shim) for subnet, shim in subnets if subnet.version == prefix.version]
        inside = [(subnet, shim) for subnet, shim in family if prefix.subnet_of(subnet)]
        candidates = sorted({shim for _, shim in inside or family})
        if len(candidates) != 1:
            problems.append(Problem(
                f"ADDITIONAL_ROUTES entry {prefix}: " + (
                    f"no managed network has an IPv{prefix.version} subnet to route it through"
                    if not candidates else
                    f"it lies outside every managed subnet and there are several shims "
                    f"({', '.join(candidates)}) to choose from; list a prefix inside one of "
                    "the networks' subnets"), kind="error" if fixed else "warning"))
            continue
        shim = shims[candidates[0]]
        own = sorted(a.ip for a in shim.addresses if a.version == prefix.version)
        preferred = [ip for ip in own if any(ip in subnet for subnet, _ in inside)]
        if prefix in routes or not own:
            continue
        spec = RouteSpec(dst=prefix, shim=shim.name, src=(preferred or own)[0],
                         network="ADDITIONAL_ROUTES")
        problem = _want_route(spec, facts, lambda reason, prefix=prefix: (
            f"ADDITIONAL_ROUTES entry {prefix} is not routed: {reason}; remove it or list "
            "a narrower prefix"), kind="error")
        if problem:
            problems.append(problem)
        else:
            routes[prefix] = spec
