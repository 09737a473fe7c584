"""ipvlan networks: the shim's kind per parent, parents asked for both kinds, Docker's
ipvlan options, and replacing a shim of the wrong kind (pure logic)."""

import dataclasses
import errno

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from macvlan_router import desired, netlink, plan
from macvlan_router.config import Config, Selector
from macvlan_router.docker_source import to_network
from macvlan_router.model import IPVLAN, LINK_ALIAS, MACVLAN, Link, Protection

from .factories import apply_model, endpoint, host, ip, net, network, route

SHIM_IP = "198.51.100.3"
WITH_SHIM_IP = Config(bridge_ips=(ip(SHIM_IP),))


def ipvlan(name="ipnet", mode="l2", flag="bridge", **kw):
    return network(name, driver=IPVLAN, ipvlan_mode=mode, ipvlan_flag=flag, **kw)


def shim_link(kind, mode, parent_index=2, index=100, name="mvr-eth0"):
    modes = {"macvlan_mode": mode} if kind == MACVLAN else {"ipvlan_mode": mode}
    return Link(index=index, name=name, kind=kind, alias=LINK_ALIAS,
                parent_index=parent_index, arp_filter=True, **modes)


def with_link(h, link):
    return dataclasses.replace(h, links=h.links + (link,))


def applied(h, actions):
    """apply_model, with the links it creates of the kind and mode their LinkAdd names."""
    after = apply_model(h, actions)
    added = {a.name: a for a in actions if isinstance(a, plan.LinkAdd)}
    return dataclasses.replace(after, links=tuple(
        shim_link(added[link.name].kind, added[link.name].mode, link.parent_index,
                  link.index, link.name) if link.name in added else link
        for link in after.links))


# --------------------------------------------------------------- Docker's ipvlan options

def docker_record(driver="ipvlan", **options):
    return {"Id": "a" * 64, "Name": "ipnet", "Driver": driver,
            "Options": dict(parent="eth0", **options),
            "IPAM": {"Config": [{"Subnet": "198.51.100.0/24"}]}}


@pytest.mark.parametrize("options, expected", [
    ({}, ("l2", "bridge")),
    ({"ipvlan_mode": ""}, ("l2", "bridge")),
    ({"ipvlan_mode": "l3"}, ("l3", "bridge")),
    ({"ipvlan_mode": "l3s", "ipvlan_flag": "private"}, ("l3s", "private")),
    ({"ipvlan_mode": 5}, ("5", "bridge")),
])
def test_ipvlan_options_take_dockers_defaults(options, expected):
    translated, problems = to_network(docker_record(**options), {})
    assert (translated.ipvlan_mode, translated.ipvlan_flag) == expected
    assert translated.shim_kind == (IPVLAN, expected[0])
    assert problems == []


def test_macvlan_networks_have_no_ipvlan_options():
    translated, _ = to_network(docker_record("macvlan", ipvlan_mode="l3"), {})
    assert (translated.ipvlan_mode, translated.ipvlan_flag) == (None, None)
    assert translated.shim_kind == (MACVLAN, "bridge")


def test_ipvlan_networks_are_selected_and_bridge_ones_refused():
    nets = [network("mac"), ipvlan("ipnet"), network("br", driver="bridge")]
    chosen, problems = desired.select_networks((), nets)
    assert [n.name for n in chosen] == ["mac", "ipnet"]
    chosen, problems = desired.select_networks((Selector("ipnet"), Selector("br")), nets)
    assert [n.name for n in chosen] == ["ipnet"]
    assert "not macvlan or ipvlan" in problems[0].message


# ------------------------------------------------------------------ kind per parent

@pytest.mark.parametrize("mode", ["l2", "l3", "l3s"])
def test_ipvlan_network_gets_an_ipvlan_shim_in_its_mode(mode):
    lan = ipvlan(mode=mode, endpoints=[endpoint("web", "198.51.100.130", mac="02:42:c6:33:64:82")])
    want = desired.compute(WITH_SHIM_IP, [lan], host())
    shim = want.shims["mvr-eth0"]
    assert (shim.kind, shim.mode, shim.mac) == (IPVLAN, mode, None)
    assert [str(a) for a in shim.addresses] == [f"{SHIM_IP}/32"]
    route_spec = want.routes[net("198.51.100.130/32")]
    # Every ipvlan child answers at the parent's MAC: a recorded one would be stale forever.
    assert (route_spec.shim, route_spec.src, route_spec.mac) == ("mvr-eth0", ip(SHIM_IP), None)
    commands = [a.command() for a in plan.compute(want, host()).actions]
    assert commands[0] == (f"ip link add mvr-eth0 link eth0 type ipvlan mode {mode} "
                           "&& ip link set mvr-eth0 alias macvlan-router")


def test_ipvlan_shim_never_reuses_the_hosts_address():
    lan = ipvlan(endpoints=[endpoint("web", "198.51.100.130")])
    want = desired.compute(Config(), [lan], host())
    assert want.shims == {} and want.routes == {}
    (problem,) = want.problems
    assert problem.kind == "warning" and problem.network == "ipnet"
    assert "cannot reuse the host's address 198.51.100.2" in problem.message
    assert "MACVLAN_BRIDGE_IP" in problem.message


def test_ipvlan_shim_is_not_given_a_host_address_by_the_setting_either():
    lan = ipvlan(endpoints=[endpoint("web", "198.51.100.130")])
    want = desired.compute(Config(bridge_ips=(ip("198.51.100.2"),)), [lan], host())
    assert want.shims == {} and want.routes == {}
    (problem,) = want.problems
    assert problem.kind == "error" and problem.network == "ipnet"
    assert "MACVLAN_BRIDGE_IP=198.51.100.2 is this host's address on eth0" in problem.message


def test_ipvlan_ipv6_gets_its_own_address_as_macvlan_does():
    lan = ipvlan(subnets=("2001:db8:1::/64",), endpoints=[endpoint("web", v6="2001:db8:1::9")])
    want = desired.compute(Config(), [lan], host())
    shim = want.shims["mvr-eth0"]
    assert shim.kind == IPVLAN and [a.version for a in shim.addresses] == [6]
    assert net("2001:db8:1::9/128") in want.routes


@pytest.mark.parametrize("mode, flag, words", [
    ("l4", "bridge", "ipvlan_mode=l4"),
    ("l2", "private", "ipvlan_flag=private"),
    ("l2", "vepa", "ipvlan_flag=vepa"),
])
def test_ipvlan_networks_a_shim_cannot_reach_are_skipped(mode, flag, words):
    lan = ipvlan(mode=mode, flag=flag, endpoints=[endpoint("web", "198.51.100.130")])
    want = desired.compute(WITH_SHIM_IP, [lan], host())
    assert want.shims == {} and want.routes == {}
    assert [m.shim for m in want.networks] == [None]
    (problem,) = [p for p in want.problems if words in p.message]
    assert problem.kind == "warning" and "not served" in problem.message


def test_a_parent_with_macvlan_and_ipvlan_networks_keeps_the_kind_whose_containers_run():
    mac = network("mac", endpoints=[endpoint("web", "198.51.100.130")])
    ipnet = ipvlan(subnets=("198.51.100.0/24",))
    want = desired.compute(WITH_SHIM_IP, [mac, ipnet], host())
    assert want.shims["mvr-eth0"].kind == MACVLAN
    assert {m.network.name: m.shim for m in want.networks} == {"mac": "mvr-eth0", "ipnet": None}
    (problem,) = [p for p in want.problems if "different kinds" in p.message]
    assert problem.kind == "warning"
    assert "(ipvlan l2: ipnet; macvlan: mac)" in problem.message
    assert "only the macvlan networks are served, the kind whose containers run" \
        in problem.message
    assert "leave ipnet out of MACVLAN_DOCKER_NETWORK" in problem.message


def test_the_shim_already_there_decides_so_no_served_route_goes():
    mac = network("mac", endpoints=[endpoint("web", "198.51.100.130")])
    ipnet = ipvlan(endpoints=[endpoint("db", "198.51.100.140")])
    h = with_link(host(), shim_link(IPVLAN, "l2"))
    want = desired.compute(WITH_SHIM_IP, [mac, ipnet], h)
    assert want.shims["mvr-eth0"].kind == IPVLAN
    assert set(want.routes) == {net("198.51.100.140/32")}
    assert any("the kind of mvr-eth0, the shim it has now" in p.message for p in want.problems)


def test_a_parent_asked_for_both_kinds_without_containers_is_left_as_it_is():
    h = host()
    want = desired.compute(WITH_SHIM_IP, [network("mac"), ipvlan()], h)
    assert want.shims == {}
    assert any("none is served and eth0 gets no shim" in p.message for p in want.problems)
    assert plan.compute(want, h).actions == ()


def test_ipvlan_networks_in_two_modes_on_one_parent_conflict_too():
    l2 = ipvlan("a", endpoints=[endpoint("web", "198.51.100.130")])
    l3 = ipvlan("b", mode="l3")
    want = desired.compute(WITH_SHIM_IP, [l2, l3], host())
    assert (want.shims["mvr-eth0"].kind, want.shims["mvr-eth0"].mode) == (IPVLAN, "l2")
    assert any("ipvlan l2: a; ipvlan l3: b" in p.message for p in want.problems)


def test_each_parent_gets_the_kind_of_its_own_networks():
    mac = network("mac", endpoints=[endpoint("web", "198.51.100.130")])
    ipnet = ipvlan(parent="eth1", subnets=("203.0.113.0/24",),
                   endpoints=[endpoint("db", "203.0.113.130")])
    h = host(links=("eth0", "eth1"),
             addresses=(("eth0", "198.51.100.2/24"), ("eth1", "203.0.113.2/24")))
    cfg = Config(bridge_ips=(ip("203.0.113.3"),))
    want = desired.compute(cfg, [mac, ipnet], h)
    assert {n: (s.kind, s.mac is None) for n, s in want.shims.items()} == {
        "mvr-eth0": (MACVLAN, False), "mvr-eth1": (IPVLAN, True)}
    assert not [p for p in want.problems if p.kind != "warning" or "kind" in p.message]
    first = plan.compute(want, h)
    after = applied(h, first.actions)
    assert plan.compute(desired.compute(cfg, [mac, ipnet], after), after).actions == ()


# ------------------------------------------------------------------ replacing a shim

def test_a_shim_of_the_wrong_kind_is_replaced_and_its_routes_follow():
    h = with_link(host(routes=(route("198.51.100.140/32", "mvr-eth0", src="198.51.100.2"),)),
                  shim_link(MACVLAN, "bridge"))
    lan = ipvlan(endpoints=[endpoint("db", "198.51.100.140")])
    want = desired.compute(WITH_SHIM_IP, [lan], h)
    first = plan.compute(want, h)
    assert [a.command().split(" && ")[0] for a in first.actions[:2]] == [
        "ip link del mvr-eth0", "ip link add mvr-eth0 link eth0 type ipvlan mode l2"]
    after = applied(h, first.actions)
    assert [(r.dst, r.ifname, r.src) for r in after.routes] == [
        (net("198.51.100.140/32"), "mvr-eth0", ip(SHIM_IP))]
    assert plan.compute(desired.compute(WITH_SHIM_IP, [lan], after), after).actions == ()


def test_an_ipvlan_shim_in_another_mode_is_replaced():
    h = with_link(host(), shim_link(IPVLAN, "l3"))
    want = desired.compute(WITH_SHIM_IP, [ipvlan(mode="l2")], h)
    kinds = [type(a).__name__ for a in plan.compute(want, h).actions[:2]]
    assert kinds == ["LinkDel", "LinkAdd"]


def test_a_shim_of_the_wrong_kind_holding_protected_routes_stays_as_it_is():
    kept = route("198.51.100.140/32", "mvr-eth0", src="198.51.100.2")
    h = with_link(host(routes=(kept,)), shim_link(MACVLAN, "bridge"))
    want = desired.compute(WITH_SHIM_IP, [ipvlan(endpoints=[endpoint("x", "198.51.100.150")])],
                           h)
    protection = Protection((net("198.51.100.0/24"),), "network mac not read completely")
    result = plan.compute(want, h, protection)
    assert result.actions == ()
    assert any("it is replaced only then" in p.message and p.kind == "waiting"
               for p in result.problems)
    assert result.kept >= 1


def test_ipvlan_shims_are_ours_only_with_our_alias():
    # ipvlan children take the parent's MAC: the MAC cannot tell a half-made one.
    h = with_link(with_link(host(), shim_link(IPVLAN, "l2")),
                  dataclasses.replace(shim_link(IPVLAN, "l2", index=101), name="ipv0",
                                      alias=None))
    assert set(plan.owned_shims(h)) == {"mvr-eth0"}


# ------------------------------------------------------------------ the kernel says no

@pytest.mark.parametrize("code, words", [
    (errno.EOPNOTSUPP, "this kernel cannot make ipvlan links (its ipvlan module is missing"),
    (errno.EBUSY, "eth0 already has macvlan children"),
])
def test_a_refused_ipvlan_shim_says_what_to_do(code, words):
    action = plan.LinkAdd("mvr-eth0", "eth0", None, IPVLAN, "l2")
    text = netlink._reason(NetlinkError(code, "refused"), action)
    assert text.startswith("refused: ") and words in text
    assert "MACVLAN_DOCKER_NETWORK" in text


@pytest.mark.parametrize("mode, words", [
    ("private", "cannot talk to the other macvlan children of eth0"),
    ("vepa", "only through a LAN switch"),
    ("passthru", "a shim there would keep it from starting"),
])
def test_macvlan_networks_a_shim_cannot_reach_are_skipped(mode, words):
    lan = network(macvlan_mode=mode, endpoints=[endpoint("web", "198.51.100.130")])
    want = desired.compute(Config(), [lan], host())
    assert want.shims == {} and want.routes == {}
    (problem,) = want.problems
    assert problem.kind == "warning" and f"macvlan_mode={mode}" in problem.message
    assert words in problem.message


def test_a_bridge_mode_macvlan_network_is_served_beside_a_private_one():
    web = network(macvlan_mode="bridge", endpoints=[endpoint("web", "198.51.100.130")])
    private = network("iso", parent="eth0", subnets=("203.0.113.0/24",),
                      macvlan_mode="private", endpoints=[endpoint("db", "203.0.113.130")])
    want = desired.compute(Config(), [web, private], host())
    assert list(want.routes) == [net("198.51.100.130/32")]
    assert [p.network for p in want.problems] == ["iso"]
