"""The route-safety policy: which destinations macvlan-router may ever route via a shim.

One policy, written once. desired.py asks `refusal()` before it wants any route, and
config.py asks `static_refusal()` to reject an ADDITIONAL_ROUTES entry at once. A route
through a shim reaches only the macvlan LAN, so anything that would pull the host's own,
special or general traffic into it is refused:

- special space: unspecified, "this network" (0.0.0.0/8), loopback, link-local,
  multicast, limited broadcast and reserved (240.0.0.0/4) addresses;
- prefixes wide enough to take over general traffic: shorter than /8 (IPv4) or /16
  (IPv6), such as the halves of the default route, 126.0.0.0/7 or 224.0.0.0/3;
- against the host: an address the host holds, and anything covering one of its default
  gateways;
- against a managed IPv4 subnet: its network and broadcast addresses and its gateway.
"""

import ipaddress
from dataclasses import dataclass
from typing import FrozenSet, Tuple

# The shortest prefix a route via a shim may have; a managed subnet wider than this is
# not served either.
WIDEST = {4: 8, 6: 16}

SPECIAL = (
    (ipaddress.ip_network("0.0.0.0/8"), "the unspecified / \"this network\" range"),
    (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast"),
    (ipaddress.ip_network("240.0.0.0/4"), "reserved (240.0.0.0/4) or limited broadcast"),
    (ipaddress.ip_network("::/128"), "the unspecified address"),
    (ipaddress.ip_network("::1/128"), "loopback"),
    (ipaddress.ip_network("::ffff:0:0/96"), "IPv4-mapped"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
    (ipaddress.ip_network("ff00::/8"), "multicast"),
)


@dataclass(frozen=True)
class HostFacts:
    """What the policy must know of the host and the managed networks."""

    addresses: FrozenSet[ipaddress._BaseAddress] = frozenset()
    default_gateways: FrozenSet[ipaddress._BaseAddress] = frozenset()
    # (subnet, gateways) of every managed network.
    subnets: Tuple[Tuple[ipaddress._BaseNetwork, FrozenSet[ipaddress._BaseAddress]], ...] = ()


def too_wide(prefix):
    return prefix.prefixlen < WIDEST[prefix.version]


def static_refusal(prefix):
    """Why `prefix` may never be routed via a shim, whatever the host; None when it may."""
    if too_wide(prefix):
        return (f"it is wider than /{WIDEST[prefix.version]} and would take over general "
                "traffic of the host")
    for special, name in SPECIAL:
        if special.version == prefix.version and prefix.overlaps(special):
            return f"it {'is' if prefix.subnet_of(special) else 'covers'} {name} space"
    return None


def refusal(prefix, facts):
    """Why `prefix` may not be routed via a shim on this host now; None when it may."""
    reason = static_refusal(prefix)
    if reason:
        return reason
    for address in sorted(a for a in facts.addresses if a.version == prefix.version):
        if address in prefix:
            return f"the host itself holds {address}"
    for gateway in sorted(g for g in facts.default_gateways if g.version == prefix.version):
        if gateway in prefix:
            return f"it covers the host's default gateway {gateway}"
    for subnet, gateways in facts.subnets:
        if subnet.version != prefix.version:
            continue
        for gateway in sorted(gateways):
            if gateway in prefix:
                return f"it covers {gateway}, the gateway of subnet {subnet}"
        if subnet.version == 4 and subnet.prefixlen < 31:
            for edge, name in ((subnet.network_address, "network"),
                               (subnet.broadcast_address, "broadcast")):
                if edge in prefix:
                    return f"it covers {edge}, the {name} address of subnet {subnet}"
    return None
