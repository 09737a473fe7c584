import dataclasses
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from macvlan_router import desired, plan
from macvlan_router.config import Config
from macvlan_router.model import Address, Desired, Link, Neighbour

from .factories import MACHINE, apply_model, endpoint, host, iface, ip, net, network, route


def converge(cfg, networks, h):
    want = desired.compute(cfg, networks, h)
    first = plan.compute(want, h)
    after = apply_model(h, first.actions)
    return want, first, after, plan.compute(desired.compute(cfg, networks, after), after)


def test_fresh_host_gets_shim_then_routes_in_order():
    lan = network(endpoints=[endpoint("web", "198.51.100.130")])
    want, first, after, second = converge(Config(), [lan], host())
    kinds = [type(a).__name__ for a in first.actions]
    assert kinds == ["LinkAdd", "ArpFilter", "RefuseRouterAdvertisements", "LinkUp", "AddrAdd",
                     "RouteReplace"]
    assert second.actions == ()


def test_a_shim_address_moves_under_its_routes_before_the_old_one_goes():
    """The kernel deletes the routes whose source is an address it deletes: the routes
    must move to the new address first, or they are gone for a moment."""
    lan = network(endpoints=[endpoint("web", "198.51.100.130")])
    _, _, settled, _ = converge(Config(), [lan], host())
    moved = dataclasses.replace(settled, addresses=tuple(
        Address("eth0", iface("198.51.100.7/24")) if a.ifname == "eth0" else a
        for a in settled.addresses))
    want = desired.compute(Config(), [lan], moved)
    commands = [a.command() for a in plan.compute(want, moved).actions]
    assert commands == [
        "ip address add 198.51.100.7/32 dev mvr-eth0 noprefixroute",
        "ip route replace 198.51.100.130/32 dev mvr-eth0 proto macvlan-router scope link "
        "src 198.51.100.7",
        "ip address del 198.51.100.2/32 dev mvr-eth0"], commands


def test_commands_read_like_ip():
    lan = network(endpoints=[endpoint("web", "198.51.100.130")])
    first = plan.compute(desired.compute(Config(), [lan], host()), host())
    commands = [a.command() for a in first.actions]
    assert commands[0].startswith("ip link add mvr-eth0 link eth0 address ")
    assert commands[0].endswith(
        "type macvlan mode bridge && ip link set mvr-eth0 alias macvlan-router")
    assert "ip address add 198.51.100.2/32 dev mvr-eth0 noprefixroute" in commands
    assert ("ip route replace 198.51.100.130/32 dev mvr-eth0 proto macvlan-router scope link "
            "src 198.51.100.2") in commands
    delete = plan.RouteDel(route("2001:db8::5/128", "mvr-eth0", scope=0))
    assert delete.command() == "ip -6 route del 2001:db8::5/128 dev mvr-eth0 proto macvlan-router"


def test_ipv6_routes_wait_for_dad():
    lan = network(subnets=("198.51.100.0/24", "2001:db8:1::/64"),
                  endpoints=[endpoint("web", "198.51.100.130", "2001:db8:1::2")])
    want, first, after, second = converge(Config(), [lan], host())
    assert first.pending == 1
    assert [a.spec.dst.version for a in first.actions if isinstance(a, plan.RouteReplace)] == [4]
    # The model adds addresses as not tentative: the second pass adds the IPv6 route.
    assert [type(a).__name__ for a in second.actions] == ["RouteReplace"]
    tentative = dataclasses.replace(after, addresses=tuple(
        dataclasses.replace(a, tentative=a.ip.version == 6) for a in after.addresses))
    assert plan.compute(desired.compute(Config(), [lan], tentative), tentative).pending == 1


def test_dad_failure_is_reported():
    lan = network(subnets=("2001:db8:1::/64",))
    want = desired.compute(Config(), [lan], host())
    h = apply_model(host(), plan.compute(want, host()).actions)
    h = dataclasses.replace(h, addresses=tuple(
        dataclasses.replace(a, tentative=True, dad_failed=True) for a in h.addresses))
    problems = plan.compute(want, h).problems
    assert any("duplicate address detection" in p.message for p in problems)


def test_a_neighbour_entry_at_another_mac_is_forgotten():
    """A container restarted or recreated with a new MAC (Podman's are random) keeps its
    address: the shim's ARP entry must not keep the old MAC."""
    lan = network(endpoints=[endpoint("web", "198.51.100.130", mac="0a:00:00:00:00:02")])
    want = desired.compute(Config(), [lan], host())
    h = apply_model(host(), plan.compute(want, host()).actions)

    def seen_at(mac):
        return dataclasses.replace(h, neighbours=(
            Neighbour("mvr-eth0", ip("198.51.100.130"), mac),))
    stale = plan.compute(want, seen_at("0a:00:00:00:00:01")).actions
    assert [a.command() for a in stale] == ["ip neigh del 198.51.100.130 dev mvr-eth0"]
    assert plan.compute(want, apply_model(seen_at("0a:00:00:00:00:01"), stale)).actions == ()
    assert plan.compute(want, seen_at("0a:00:00:00:00:02")).actions == ()
    unknown = desired.compute(Config(), [network(endpoints=[endpoint("web", "198.51.100.130")])],
                              host())
    assert plan.compute(unknown, seen_at("0a:00:00:00:00:01")).actions == ()


def test_stale_owned_route_removed_foreign_route_kept():
    h = host(shims=(("mvr-eth0", "eth0"),), routes=(
        route("198.51.100.140/32", "mvr-eth0", "198.51.100.2"),
        route("203.0.113.77/32", "mvr-eth0", proto=4)))
    h = dataclasses.replace(h, addresses=h.addresses + (Address("mvr-eth0",
                                                                iface("198.51.100.2/32")),))
    result = plan.compute(desired.compute(Config(), [network()], h), h)
    assert [a.command() for a in result.actions] == [
        "ip route del 198.51.100.140/32 dev mvr-eth0 proto macvlan-router scope link"]


def test_foreign_route_for_a_container_address_is_left_alone():
    h = host(routes=(route("198.51.100.130/32", "eth0", proto=4),))
    lan = network(endpoints=[endpoint("web", "198.51.100.130")])
    result = plan.compute(desired.compute(Config(), [lan], h), h)
    assert not any(isinstance(a, plan.RouteReplace) for a in result.actions)
    assert [p.kind for p in result.problems] == ["warning"]


def test_foreign_link_with_our_name_is_not_touched():
    h = host(links=("eth0", "mvr-eth0"))
    result = plan.compute(desired.compute(Config(), [network()], h), h)
    assert result.actions == ()
    assert "not created by macvlan-router" in result.problems[0].message


def test_shim_on_wrong_parent_is_recreated():
    h = host(links=("eth0", "eth1"), shims=(("mvr-eth0", "eth1"),))
    actions = plan.compute(desired.compute(Config(), [network()], h), h).actions
    assert [type(a).__name__ for a in actions[:2]] == ["LinkDel", "LinkAdd"]


def test_cleanup_removes_only_what_we_own():
    h = host(links=("eth0", "other0"), shims=(("mvr-eth0", "eth0"),), routes=(
        route("198.51.100.140/32", "mvr-eth0"), route("203.0.113.0/28", "eth0"),
        route("203.0.113.77/32", "eth0", proto=4), route("198.51.100.0/24", "eth0", proto=2)))
    actions = plan.compute(Desired(), h).actions
    assert [a.command() for a in actions] == [
        "ip route del 203.0.113.0/28 dev eth0 proto macvlan-router scope link",
        "ip link del mvr-eth0"]


def test_half_created_shim_is_recognised_by_its_mac():
    h = host()
    orphan = Link(index=50, name="mvr-eth0", kind="macvlan", alias=None, parent_index=2,
                  mac=desired.stable_mac(MACHINE, "eth0"), macvlan_mode="bridge")
    stranger = Link(index=51, name="mv0", kind="macvlan", alias=None, parent_index=2,
                    mac="02:00:00:00:00:01", macvlan_mode="bridge")
    h = dataclasses.replace(h, links=h.links + (orphan, stranger))
    assert set(plan.owned_shims(h)) == {"mvr-eth0"}


addresses_v4 = st.integers(min_value=3, max_value=254).map(
    lambda n: ipaddress.ip_address(f"198.51.100.{n}"))


@settings(max_examples=150, deadline=None)
@given(before=st.sets(addresses_v4, max_size=12), after_set=st.sets(addresses_v4, max_size=12),
       foreign=st.sets(addresses_v4, max_size=3),
       extra=st.lists(st.sampled_from(["198.51.100.64/26", "203.0.113.0/28"]), unique=True))
def test_reconcile_converges_and_never_touches_foreign_routes(before, after_set, foreign, extra):
    cfg = Config(additional_routes=tuple(net(e) for e in extra))
    foreign_routes = tuple(route(f"{a}/32", "eth0", proto=4) for a in sorted(foreign))
    h = host(routes=foreign_routes)
    for addresses in (before, after_set, set()):
        lan = network(endpoints=[endpoint(f"c{a.packed[-1]}", str(a)) for a in sorted(addresses)])
        want, first, h, second = converge(cfg, [lan], h)
        assert second.actions == (), "a second pass must find nothing to do"
        owned = {r.dst for r in h.routes if r.owned}
        expected = {net(f"{a}/32") for a in addresses - foreign - {ip("198.51.100.2")}}
        expected |= {net(e) for e in extra}
        assert owned == expected
        assert set(foreign_routes) <= set(h.routes)
        for action in first.actions:
            if isinstance(action, plan.RouteDel):
                assert action.route.owned
    h = apply_model(h, plan.compute(Desired(), h).actions)
    assert not plan.owned_shims(h) and not any(r.owned for r in h.routes)
    assert set(h.routes) == set(foreign_routes)
