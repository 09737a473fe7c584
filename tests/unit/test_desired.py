import pytest

from macvlan_router import desired
from macvlan_router.config import Config, Selector
from macvlan_router.model import Address

from .factories import MACHINE, endpoint, host, iface, ip, net, network


def compute(cfg=Config(), networks=(), h=None):
    return desired.compute(cfg, list(networks), h or host())


def errors(result):
    return [p.message for p in result.problems if p.kind == "error"]


def test_zero_config_reuses_host_address_and_routes_containers():
    lan = network(endpoints=[endpoint("web", "198.51.100.130"), endpoint("dns", "198.51.100.131")])
    result = compute(networks=[lan])
    shim = result.shims["mvr-eth0"]
    assert shim.parent == "eth0"
    assert shim.addresses == {iface("198.51.100.2/32")}
    assert set(result.routes) == {net("198.51.100.130/32"), net("198.51.100.131/32")}
    assert all(r.src == ip("198.51.100.2") and r.shim == "mvr-eth0" for r in result.routes.values())
    assert not result.problems


def test_configured_bridge_ip_wins_over_host_address():
    result = compute(Config(bridge_ips=(ip("198.51.100.250"),)),
                     [network(endpoints=[endpoint("web", "198.51.100.130")])])
    assert result.shims["mvr-eth0"].addresses == {iface("198.51.100.250/32")}
    assert result.routes[net("198.51.100.130/32")].src == ip("198.51.100.250")


def test_no_host_address_in_subnet_is_reported_and_skipped():
    result = compute(networks=[network(subnets=("203.0.113.0/24",),
                                       endpoints=[endpoint("web", "203.0.113.9")])])
    assert not result.routes and not result.shims
    assert not errors(result), "a network the host is not on is skipped, not fatal"
    (problem,) = result.problems
    assert problem.kind == "warning"
    assert "skipped" in problem.message and "203.0.113.0/24" in problem.message
    assert "MACVLAN_BRIDGE_IP" in problem.message


@pytest.mark.parametrize("selectors, kind", [
    ((Selector("lan"),), "error"),
    ((), "warning"),
    ((Selector("label=lan", "lan"), Selector("lan")), "warning"),
])
def test_out_of_subnet_bridge_ip_is_an_error_only_with_a_fixed_list_of_networks(
        selectors, kind):
    """With every network or a label served, the address may belong to a network removed
    since: the next start must not stop on it."""
    result = compute(Config(networks=selectors, bridge_ips=(ip("203.0.113.5"),)), [network()])
    (problem,) = [p for p in result.problems if "MACVLAN_BRIDGE_IP=203.0.113.5 lies in none"
                  in p.message]
    assert problem.kind == kind


def test_container_holding_the_host_address_is_not_routed():
    lan = network(endpoints=[endpoint("thief", "198.51.100.2"), endpoint("ok", "198.51.100.130")])
    result = compute(networks=[lan])
    assert set(result.routes) == {net("198.51.100.130/32")}
    (problem,) = result.problems
    assert problem.kind == "warning", "Docker's doing: costs that container its route only"
    assert "thief" in problem.message and "198.51.100.2" in problem.message
    assert "--aux-address" in problem.message


def test_container_holding_the_configured_shim_address_is_a_warning():
    """Docker handed it out: a restart must not stop the service on it (exit 78)."""
    lan = network(endpoints=[endpoint("thief", "198.51.100.60")])
    result = compute(Config(bridge_ips=(ip("198.51.100.60"),)), [lan])
    assert not result.routes and not errors(result)
    assert any("thief" in p.message and "MACVLAN_BRIDGE_IP" in p.message
               for p in result.problems if p.kind == "warning")


def test_ipv6_gets_a_stable_generated_address_never_the_hosts():
    lan = network(subnets=("198.51.100.0/24", "2001:db8:1::/64"),
                  endpoints=[endpoint("web", "198.51.100.130", "2001:db8:1::2")])
    h = host(addresses=(("eth0", "198.51.100.2/24"), ("eth0", "2001:db8:1::1:2/64")))
    first, again = compute(networks=[lan], h=h), compute(networks=[lan], h=h)
    v6 = [a for a in first.shims["mvr-eth0"].addresses if a.version == 6]
    assert len(v6) == 1 and v6[0].network.prefixlen == 128
    assert v6[0].ip in net("2001:db8:1::/64")
    assert v6[0].ip not in (ip("2001:db8:1::1:2"), ip("2001:db8:1::2"))
    assert first.shims == again.shims
    assert first.routes[net("2001:db8:1::2/128")].src == v6[0].ip


def test_stable_ipv6_avoids_taken_addresses():
    subnet = net("2001:db8::/125")
    taken = set()
    for _ in range(2):
        got = desired.stable_ipv6(MACHINE, "eth0", subnet, taken)
        assert got in subnet and got not in taken
        taken.add(got)
    assert desired.stable_ipv6(MACHINE, "eth0", net("2001:db8::/127"), set()) is None


def test_stable_mac_is_local_unicast_and_per_parent():
    mac = desired.stable_mac(MACHINE, "eth0")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert mac == desired.stable_mac(MACHINE, "eth0") != desired.stable_mac(MACHINE, "eth1")
    assert desired.stable_mac("", "eth0") is None


def test_one_shim_per_parent_two_parents():
    lan = network("lan", "eth0", endpoints=[endpoint("a", "198.51.100.130")])
    iot = network("iot", "eth0.10", ("203.0.113.0/24",), endpoints=[endpoint("b", "203.0.113.9")])
    h = host(links=("eth0", "eth0.10"),
             addresses=(("eth0", "198.51.100.2/24"), ("eth0.10", "203.0.113.2/24")))
    result = compute(networks=[lan, iot], h=h)
    assert set(result.shims) == {"mvr-eth0", "mvr-eth0.10"}
    assert result.routes[net("203.0.113.9/32")].shim == "mvr-eth0.10"
    assert not result.problems


def test_long_parent_names_give_valid_stable_shim_names():
    name = desired.default_shim_name("enp0s31f6.1000")
    assert len(name.encode()) <= 15 and name.startswith("mvr-")
    assert name == desired.default_shim_name("enp0s31f6.1000")
    assert name != desired.default_shim_name("enp0s31f6.1001")
    assert desired.default_shim_name("eth0") == "mvr-eth0"


def test_one_interface_name_for_two_parents_keeps_it_where_it_is():
    lan = network("lan", "eth0")
    iot = network("iot", "eth1", ("203.0.113.0/24",))
    h = host(links=("eth0", "eth1"), shims=(("shim0", "eth1"),),
             addresses=(("eth0", "198.51.100.2/24"), ("eth1", "203.0.113.2/24")))
    result = compute(Config(interface_names=((None, "shim0"),)), [lan, iot], h)
    assert set(result.shims) == {"shim0", "mvr-eth0"}
    assert result.shims["shim0"].parent == "eth1"
    assert [p.kind for p in result.problems] == ["warning"]
    assert "eth0=mvr-eth0 eth1=shim0" in result.problems[0].message


def test_two_parents_never_share_a_shim_name():
    lan = network("lan", "eth0")
    iot = network("iot", "eth0.10", ("203.0.113.0/24",))
    h = host(links=("eth0", "eth0.10"),
             addresses=(("eth0", "198.51.100.2/24"), ("eth0.10", "203.0.113.2/24")))
    result = compute(Config(interface_names=(("eth0.10", "mvr-eth0"),)), [lan, iot], h)
    assert any("would both get the shim name mvr-eth0" in m for m in errors(result))
    assert len(result.shims) == 1


def test_missing_parent_is_a_warning_also_when_the_network_is_named():
    """The host's doing (a VLAN link not there yet at boot), not the configuration's."""
    named = compute(Config(networks=(Selector("lan"),)), [network(parent="eth9")])
    assert not errors(named)
    (problem,) = named.problems
    assert "eth9" in problem.message and "does not exist" in problem.message
    assert problem.kind == "warning"
    assert not named.shims
    found = compute(networks=[network(parent="eth9"), network("ok", endpoints=[
        endpoint("web", "198.51.100.130")])])
    assert not errors(found) and [p.kind for p in found.problems] == ["warning"]
    assert net("198.51.100.130/32") in found.routes


def test_parent_down_is_waiting_not_error():
    h = host()
    h = h.__class__(links=(h.links[0].__class__(index=2, name="eth0", up=False),),
                    addresses=h.addresses, machine_id=MACHINE)
    result = compute(networks=[network()], h=h)
    assert [p.kind for p in result.problems] == ["waiting"]


def test_additional_routes_go_to_the_shim_whose_subnet_holds_them():
    cfg = Config(additional_routes=(net("198.51.100.64/26"), net("203.0.113.7/32")))
    result = compute(cfg, [network()])
    assert result.routes[net("198.51.100.64/26")].shim == "mvr-eth0"
    # Outside every subnet but only one shim: still routed through it.
    assert result.routes[net("203.0.113.7/32")].src == ip("198.51.100.2")


@pytest.mark.parametrize("selectors, kind", [((Selector("lan"),), "error"), ((), "warning")])
def test_additional_route_without_family_is_reported(selectors, kind):
    """An error only when the networks are named: serving every network, the network
    the entry was written for may have been removed since."""
    result = compute(Config(networks=selectors, additional_routes=(net("2001:db8:9::/64"),)),
                     [network()])
    (problem,) = [p for p in result.problems
                  if "no managed network has an IPv6 subnet" in p.message]
    assert problem.kind == kind


def test_host_addresses_on_our_shims_do_not_count_as_host_addresses():
    h = host(shims=(("mvr-eth0", "eth0"),))
    h = h.__class__(links=h.links,
                    addresses=h.addresses + (Address("mvr-eth0", iface("198.51.100.250/32")),),
                    machine_id=MACHINE)
    lan = network(endpoints=[endpoint("web", "198.51.100.250")])
    result = compute(Config(bridge_ips=(ip("198.51.100.251"),)), [lan], h)
    assert net("198.51.100.250/32") in result.routes


def test_select_by_name_compose_label_id_and_label():
    nets = [network("lan"), network("proj_iot", labels=(("com.docker.compose.network", "iot"),)),
            network("other", labels=(("router", "yes"),)), network("br", driver="bridge")]
    pick = lambda *texts: desired.select_networks(  # noqa: E731
        [Selector(t) if not t.startswith("label=") else Selector(t, *t[6:].split("=", 1))
         for t in texts], nets)
    assert [n.name for n in pick()[0]] == ["lan", "proj_iot", "other"]
    assert [n.name for n in pick("iot")[0]] == ["proj_iot"]
    assert [n.name for n in pick("label=router=yes")[0]] == ["other"]
    assert [n.name for n in pick(nets[0].id[:12])[0]] == ["lan"]
    chosen, problems = pick("nope", "br")
    assert chosen == []
    assert "Docker has no network" in problems[0].message and "lan" in problems[0].message
    assert "bridge driver" in problems[1].message


def test_every_route_lies_in_a_managed_subnet_or_additional_routes():
    lan = network(endpoints=[endpoint("a", "198.51.100.130"), endpoint("b", None, "2001:db8::5")])
    result = compute(networks=[lan])
    assert list(result.routes) == [net("198.51.100.130/32")]


def test_shim_address_equal_to_the_gateway_is_an_error():
    lan = network(gateways=frozenset({ip("198.51.100.1")}))
    result = compute(Config(bridge_ips=(ip("198.51.100.1"),)), [lan])
    assert any("MACVLAN_BRIDGE_IP=198.51.100.1 is the gateway of network lan" in m
               for m in errors(result))
    assert "mvr-eth0" not in result.shims


def test_shim_address_in_dockers_pool_warns_unless_reserved():
    unreserved = compute(Config(bridge_ips=(ip("198.51.100.250"),)), [network()])
    assert [p.kind for p in unreserved.problems] == ["warning"]
    assert "--aux-address shim=198.51.100.250" in unreserved.problems[0].message
    reserved = compute(Config(bridge_ips=(ip("198.51.100.250"),)),
                       [network(aux_addresses=frozenset({ip("198.51.100.250")}))])
    assert not reserved.problems
    whole_subnet = compute(networks=[network(ip_ranges=())])
    assert "the host's address 198.51.100.2" in whole_subnet.problems[0].message


def test_a_shim_name_that_is_a_parent_is_refused():
    """MACVLAN_BRIDGE_INTERFACE_NAME=eth1 with networks on eth0 and eth1: never touch eth1."""
    result = compute(Config(interface_names=(("eth0", "eth1"),)),
                     [network(), network("iot", parent="eth1", subnets=("203.0.113.0/24",))],
                     host(links=("eth0", "eth1"),
                          addresses=(("eth0", "198.51.100.2/24"), ("eth1", "203.0.113.2/24"))))
    assert "eth1" not in result.shims
    assert any("eth1" in m and "parent interface" in m for m in errors(result))


@pytest.mark.parametrize("engine, says, never", [
    ("Docker", "--aux-address", "podman network create"),
    ("Podman", "--ip-range that leaves it out", "docker network create")])
def test_advice_on_reserving_an_address_is_in_the_engine_s_own_words(engine, says, never):
    """Podman has no --aux-address: its users are told what Podman has."""
    pool = compute(Config(bridge_ips=(ip("198.51.100.250"),)), [network(engine=engine)])
    taken = compute(networks=[network(engine=engine,
                                      endpoints=[endpoint("web", "198.51.100.2")])])
    no_address = compute(networks=[network(engine=engine, subnets=("203.0.113.0/24",))])
    ipvlan = compute(networks=[network(engine=engine, driver="ipvlan", ipvlan_mode="l2",
                                       ipvlan_flag="bridge")])
    messages = [p.message for result in (pool, taken, no_address, ipvlan)
                for p in result.problems if "off it" in p.message]
    assert len(messages) == 4, messages
    assert all(says in m and never not in m for m in messages), messages
    _, (missing,) = desired.select_networks([Selector("nope")], [network()], engine)
    assert f"{engine} has no network" in missing.message


def test_the_shim_keeps_its_address_while_the_host_has_none_on_the_parent():
    """A network manager reconnecting the parent takes the host's address away for a
    moment: the shim keeps its copy and every route stays; the host's next address is
    the shim's again."""
    lan = network(endpoints=[endpoint("web", "198.51.100.130")])
    shim = desired.default_shim_name("eth0")
    before = compute(networks=[lan], h=host(shims=[(shim, "eth0")], addresses=(
        ("eth0", "198.51.100.2/24"), (shim, "198.51.100.2/32"))))
    gone = compute(networks=[lan], h=host(shims=[(shim, "eth0")], addresses=(
        (shim, "198.51.100.2/32"),)))
    assert gone.shims == before.shims and gone.routes == before.routes
    assert [p.kind for p in gone.problems] == ["waiting"]
    assert f"{shim} keeps its address 198.51.100.2" in gone.problems[0].message
    moved = compute(networks=[lan], h=host(shims=[(shim, "eth0")], addresses=(
        ("eth0", "198.51.100.7/24"), (shim, "198.51.100.2/32"))))
    assert {str(a) for a in moved.shims[shim].addresses} == {"198.51.100.7/32"}
    assert moved.routes[net("198.51.100.130/32")].src == ip("198.51.100.7")
    never_had_one = compute(networks=[lan], h=host(shims=[(shim, "eth0")], addresses=()))
    assert never_had_one.routes == {} and "is skipped" in never_had_one.problems[0].message
