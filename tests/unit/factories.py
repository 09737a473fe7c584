"""Literal model values for unit tests of the pure logic."""

import dataclasses
import ipaddress

from macvlan_router import plan
from macvlan_router.model import LINK_ALIAS, ROUTE_PROTO, Address, Endpoint, Host, Link, \
    Network, Route

MACHINE = "0123456789abcdef0123456789abcdef"


def ip(text):
    return ipaddress.ip_address(text)


def net(text):
    return ipaddress.ip_network(text)


def iface(text):
    return ipaddress.ip_interface(text)


def endpoint(name, v4=None, v6=None, mac=None):
    return Endpoint(container_id=(name * 64)[:64], container_name=name,
                    ipv4=ip(v4) if v4 else None, ipv6=ip(v6) if v6 else None, mac=mac)


def network(name="lan", parent="eth0", subnets=("198.51.100.0/24",), endpoints=(), **kw):
    """By default Docker allocates from the upper half of each subnet (--ip-range)."""
    subnets = tuple(net(s) for s in subnets)
    kw.setdefault("ip_ranges", tuple(list(s.subnets())[1] for s in subnets))
    return Network(id=(name + "0" * 64)[:64], name=name, parent=parent,
                   subnets=subnets, endpoints=tuple(endpoints), **kw)


def host(links=("eth0",), addresses=(("eth0", "198.51.100.2/24"),), shims=(), routes=(),
         machine_id=MACHINE):
    """A host with plain parent links, optional owned shims (name, parent) and routes."""
    all_links = [Link(index=i + 2, name=name, kind=None) for i, name in enumerate(links)]
    index = {link.name: link.index for link in all_links}
    for name, parent in shims:
        all_links.append(Link(index=100 + len(all_links), name=name, kind="macvlan",
                              alias=LINK_ALIAS, parent_index=index[parent],
                              macvlan_mode="bridge", arp_filter=True))
    return Host(links=tuple(all_links),
                addresses=tuple(Address(n, iface(a)) for n, a in addresses),
                routes=tuple(routes), machine_id=machine_id)


def route(dst, dev, src=None, proto=ROUTE_PROTO, scope=253):
    return Route(dst=net(dst), ifname=dev, proto=proto, src=ip(src) if src else None,
                 scope=scope)


def apply_model(h, actions):
    """What the kernel would do with the actions, on model values (pure logic tests only)."""
    links, addresses, routes = list(h.links), list(h.addresses), list(h.routes)
    neighbours = list(h.neighbours)
    by_name = lambda name: next(link for link in links if link.name == name)  # noqa: E731
    for action in actions:
        if isinstance(action, plan.LinkAdd):
            links.append(Link(index=1000 + len(links), name=action.name, kind="macvlan",
                              alias=LINK_ALIAS, parent_index=by_name(action.parent).index,
                              up=False, mac=action.mac, macvlan_mode="bridge"))
        elif isinstance(action, plan.LinkDel):
            links.remove(by_name(action.name))
            addresses = [a for a in addresses if a.ifname != action.name]
            routes = [r for r in routes if r.ifname != action.name]
        elif isinstance(action, plan.RefuseRouterAdvertisements):
            pass
        elif isinstance(action, (plan.LinkUp, plan.ArpFilter)):
            link = by_name(action.name)
            field = "up" if isinstance(action, plan.LinkUp) else "arp_filter"
            links[links.index(link)] = dataclasses.replace(link, **{field: True})
        elif isinstance(action, plan.AddrAdd):
            addresses.append(Address(action.name, action.interface))
        elif isinstance(action, plan.AddrDel):
            addresses = [a for a in addresses
                         if (a.ifname, a.interface) != (action.name, action.interface)]
        elif isinstance(action, plan.RouteReplace):
            spec = action.spec
            routes = [r for r in routes if not (r.owned and r.dst == spec.dst)]
            # The kernel gives an IPv6 route without a metric its default one.
            routes.append(Route(dst=spec.dst, ifname=spec.shim, proto=210, src=spec.src,
                                scope=plan.route_scope(spec.dst),
                                priority=plan.IPV6_DEFAULT_METRIC * (spec.dst.version == 6)))
        elif isinstance(action, plan.RouteDel):
            routes.remove(action.route)
        elif isinstance(action, plan.NeighDel):
            neighbours = [n for n in neighbours
                          if (n.ifname, n.ip) != (action.name, action.address)]
    return dataclasses.replace(h, links=tuple(links), addresses=tuple(addresses),
                               routes=tuple(routes), neighbours=tuple(neighbours))
