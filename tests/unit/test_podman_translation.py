"""Podman's answers into model values (podman.py, and how docker_source.to_network and
classify() take them). The records are what podman 4.3.1 with netavark answered in the lab."""

import copy

import pytest

from macvlan_router import desired, podman
from macvlan_router.config import Config
from macvlan_router.docker_source import (
    CONTAINER_CHANGED, REFRESH_ALL, REFRESH_ENDPOINTS, classify, to_network)
from macvlan_router.model import Route

from .factories import endpoint, host, iface, net, network

NET_ID = "9adecdbe135bc1a636a70e8300bb96ef26a0f56cf0f28e5f0a3af5216e82a6a1"
CID = "fa180a31f909b9547f714f38bbdcef5371a4fc4db10e0cf6f051eb0944e8ab9d"
CREATED = "7edc974f526daad057f0652104481c147fae1a37c033fcc44d080fa923776a82"

LIBPOD = {
    "name": "lan", "id": NET_ID, "driver": "macvlan", "network_interface": "lan0",
    "created": "2026-11-28T06:00:04.086037317Z",
    "subnets": [{"subnet": "198.51.100.0/24", "gateway": "198.51.100.1",
                 "lease_range": {"start_ip": "198.51.100.128", "end_ip": "198.51.100.255"}}],
    "ipv6_enabled": False, "internal": False, "dns_enabled": True,
    "ipam_options": {"driver": "host-local"},
}
# The compat inspect's Containers: CIDR addresses, no EndpointID, and a container that is
# created but not started has no address.
CONTAINERS = {
    CID: {"Name": "c1", "EndpointID": "", "MacAddress": "d6:55:20:44:e7:52",
          "IPv4Address": "198.51.100.130/24", "IPv6Address": ""},
    CREATED: {"Name": "cr1", "EndpointID": "", "MacAddress": "", "IPv4Address": "",
              "IPv6Address": ""},
}
VERSION = {"Platform": {"Name": "linux/amd64/debian-12"}, "Components": [
    {"Name": "Podman Engine", "Version": "4.3.1",
     "Details": {"APIVersion": "4.3.1", "MinAPIVersion": "4.0.0"}},
    {"Name": "Conmon", "Version": "conmon version 2.1.6"}]}


def translated(record=None, containers=None):
    return to_network(podman.docker_shaped(copy.deepcopy(record or LIBPOD),
                                           copy.deepcopy(containers)), {}, "Podman")


@pytest.mark.parametrize("version, prefix", [
    (VERSION, "/v4.3.1/libpod"),
    ({"Components": [{"Name": "Podman Engine", "Details": {"APIVersion": "../x"}}]},
     "/v4.0.0/libpod"),
    ({"Components": [{"Name": "Podman Engine"}]}, "/v4.0.0/libpod"),
    ({"Components": [{"Name": "Engine", "Version": "20.10.24"}], "ApiVersion": "1.41"}, None),
    ({"ApiVersion": "1.41"}, None),
    (None, None), ({"Components": "x"}, None), ({"Components": [None, 3]}, None),
])
def test_the_engine_is_recognised_from_its_version_answer(version, prefix):
    assert podman.libpod_prefix(version) == prefix


def test_the_parent_and_lease_range_come_from_the_libpod_record():
    network, problems = translated(containers=CONTAINERS)
    assert not problems
    assert network.engine == "Podman", "its messages give Podman's advice"
    assert network.parent == "lan0" and not network.default_route_parent
    assert [str(s) for s in network.subnets] == ["198.51.100.0/24"]
    assert [str(r) for r in network.ip_ranges] == ["198.51.100.128/25"]
    assert [str(g) for g in network.gateways] == ["198.51.100.1"]
    assert [(e.container_name, str(e.ipv4) if e.ipv4 else None)
            for e in network.endpoints] == [("cr1", None), ("c1", "198.51.100.130")]


def test_a_listing_has_no_endpoints():
    network, _ = translated()
    assert network.endpoints == ()


def test_a_lease_range_that_is_not_a_prefix_becomes_the_prefixes_covering_it():
    record = copy.deepcopy(LIBPOD)
    record["subnets"][0]["lease_range"] = {"start_ip": "198.51.100.129"}
    network, problems = translated(record)
    assert not problems
    assert [str(r) for r in network.ip_ranges] == [
        "198.51.100.129/32", "198.51.100.130/31", "198.51.100.132/30", "198.51.100.136/29",
        "198.51.100.144/28", "198.51.100.160/27", "198.51.100.192/26"]


@pytest.mark.parametrize("lease", [{"start_ip": "nonsense"}, ["x"], {"end_ip": "203.0.113.9"}])
def test_a_bad_lease_range_is_left_out_with_a_warning(lease):
    record = copy.deepcopy(LIBPOD)
    record["subnets"][0]["lease_range"] = lease
    network, problems = translated(record)
    assert network.ip_ranges == () and [str(s) for s in network.subnets] == ["198.51.100.0/24"]
    (problem,) = problems
    assert problem.kind == "warning" and "Podman reports IPRange" in problem.message


def test_a_blank_parent_is_the_default_route_interface():
    record = {k: v for k, v in LIBPOD.items() if k != "network_interface"}
    network, problems = translated(record)
    assert network.parent is None and not problems
    assert podman.default_route_parent(record)
    assert not podman.default_route_parent(LIBPOD)
    assert not podman.default_route_parent(dict(LIBPOD, network_interface=7)), \
        "a bad parent is not a blank one"


def test_a_dhcp_network_takes_its_subnets_from_its_containers_addresses():
    record = dict(LIBPOD, ipam_options={"driver": "dhcp"})
    del record["subnets"]
    containers = {
        CID: {"Name": "c1", "IPv4Address": "198.51.100.77/24", "IPv6Address": "2001:db8:1::9/64"},
        CREATED: {"Name": "c2", "IPv4Address": "198.51.100.78/24", "IPv6Address": ""},
        "d" * 64: {"Name": "odd", "IPv4Address": "garbage"},
    }
    network, problems = translated(record, containers)
    assert network.dhcp and not translated()[0].dhcp
    assert [str(s) for s in network.subnets] == ["198.51.100.0/24", "2001:db8:1::/64"]
    assert sorted(str(e.ipv4) for e in network.endpoints if e.ipv4) == [
        "198.51.100.77", "198.51.100.78"]
    (problem,) = problems
    assert "odd" in problem.message and "IPv4Address" in problem.message


@pytest.mark.parametrize("field, value", [("subnets", "x"), ("subnets", [None]),
                                          ("labels", ["a"]), ("network_interface", 5)])
def test_a_bad_libpod_field_is_reported_by_name(field, value):
    network, problems = translated(dict(LIBPOD, **{field: value}))
    assert network is not None and problems
    assert all("Podman reports" in p.message for p in problems)


@pytest.mark.parametrize("record", [None, [], "x"])
def test_a_libpod_record_that_is_not_an_object(record):
    network, problems = to_network(podman.docker_shaped(record), {}, "Podman")
    assert network is None and "Podman returned" in problems[0].message


def test_secondary_addresses_come_from_the_container_record():
    record = {"NetworkSettings": {"Networks": {"multi": {
        "IPAddress": "203.0.113.2", "IPPrefixLen": 25,
        "SecondaryIPAddresses": [{"Addr": "203.0.113.130", "PrefixLength": 25}],
        "GlobalIPv6Address": "2001:db8:2::2", "SecondaryIPv6Addresses": None}}}}
    assert podman.secondary_addresses(record, "multi") == [("IPv4Address", "203.0.113.130")]
    assert podman.secondary_addresses(record, "other") == []
    assert podman.secondary_addresses({"NetworkSettings": "x"}, "multi") == []


def test_several_subnets_of_a_family_mean_more_addresses_than_containers_shows():
    assert podman.several_per_family((net("203.0.113.0/25"), net("203.0.113.128/25")))
    assert not podman.several_per_family((net("203.0.113.0/25"), net("2001:db8::/64")))


@pytest.mark.parametrize("event, scope", [
    # podman network connect/disconnect: the container is the actor
    ({"Type": "network", "Action": "connect", "Actor": {"ID": CID, "Attributes": {
        "name": "c4"}}}, REFRESH_ENDPOINTS),
    ({"Type": "network", "Action": "disconnect", "Actor": {"ID": CID, "Attributes": {
        "name": "c4", "network": "lan"}}}, REFRESH_ENDPOINTS),
    ({"Type": "network", "Action": "remove", "Actor": {"ID": NET_ID}}, REFRESH_ALL),
    ({"Type": "container", "Action": "start", "Actor": {"ID": CID}}, REFRESH_ALL),
    ({"Type": "container", "Action": "die", "Actor": {"ID": CID}}, REFRESH_ENDPOINTS),
    ({"Type": "container", "Action": "cleanup", "Actor": {"ID": CID}}, REFRESH_ENDPOINTS),
    ({"Type": "container", "Action": "remove", "Actor": {"ID": CID}}, None),
])
def test_classify_podman_events(event, scope):
    assert classify(event, on_podman=True) == scope


def test_docker_events_keep_their_meaning():
    connect = {"Type": "network", "Action": "connect", "Actor": {"ID": NET_ID}}
    assert classify(connect) == NET_ID
    assert classify({"Type": "container", "Action": "start"}) == CONTAINER_CHANGED


def default_route(dev, dst="0.0.0.0/0", metric=0):
    return Route(dst=net(dst), ifname=dev, proto=3, priority=metric)


def test_the_default_route_interface_is_the_first_ipv4_one_else_ipv6():
    h = host(links=("eth0", "wlan0"), routes=(
        default_route("wlan0", "::/0"), Route(dst=net("0.0.0.0/0"), ifname=None, proto=3),
        default_route("eth0", metric=100), default_route("wlan0", metric=600)))
    assert h.default_route_interface() == "eth0"
    assert host(routes=(default_route("wlan0", "::/0"),)).default_route_interface() == "wlan0"
    assert host().default_route_interface() is None


def test_a_network_without_parent_is_served_on_the_default_route_interface():
    lan = network(parent=None, default_route_parent=True,
                  endpoints=[endpoint("web", "198.51.100.130")])
    result = desired.compute(Config(), [lan], host(routes=(default_route("eth0"),)))
    assert result.shims["mvr-eth0"].addresses == {iface("198.51.100.2/32")}
    assert result.routes[net("198.51.100.130/32")].shim == "mvr-eth0"
    assert [m.network.parent for m in result.networks] == ["eth0"]


def test_without_a_default_route_such_a_network_is_skipped_with_a_warning():
    lan = network(parent=None, default_route_parent=True,
                  endpoints=[endpoint("web", "198.51.100.130")])
    result = desired.compute(Config(), [lan], host())
    assert not result.shims and not result.routes
    (problem,) = result.problems
    assert problem.kind == "warning" and "default route" in problem.message


def test_the_host_address_in_a_dhcp_network_is_not_an_allocation_risk():
    """The LAN's DHCP server, not the engine, hands out the addresses there: the host's
    own address reused by the shim is no more at risk than on the LAN itself."""
    allocated = network(ip_ranges=(), endpoints=[endpoint("web", "198.51.100.130")])
    warned = desired.compute(Config(), [allocated], host())
    assert any("allocates" in p.message for p in warned.problems)
    leased = desired.compute(Config(), [network(ip_ranges=(), dhcp=True,
                                                endpoints=[endpoint("web", "198.51.100.130")])],
                             host())
    assert not leased.problems and net("198.51.100.130/32") in leased.routes


def test_a_docker_network_without_parent_stays_unserved():
    lan = network(parent=None, endpoints=[endpoint("web", "198.51.100.130")])
    result = desired.compute(Config(), [lan], host(routes=(default_route("eth0"),)))
    assert not result.shims and not result.routes


@pytest.mark.parametrize("options, mode", [
    ({"mode": "l3"}, "l3"), ({"mode": "l3s"}, "l3s"), ({}, "l2"), (None, "l2")])
def test_an_ipvlan_network_keeps_the_mode_netavark_was_given(options, mode):
    """A shim in another mode would switch the containers' mode: the record's own mode is
    used, and l2 (netavark's and Docker's default) only when it names none."""
    record = dict(LIBPOD, driver="ipvlan", options=options)
    network, problems = translated(record)
    assert (network.driver, network.ipvlan_mode) == ("ipvlan", mode), problems


@pytest.mark.parametrize("options, mode", [
    ({"mode": "private"}, "private"), ({"mode": "bridge"}, "bridge"), ({}, "bridge")])
def test_a_macvlan_networks_mode_is_its_macvlan_mode(options, mode):
    network, _ = translated(dict(LIBPOD, options=options))
    assert (network.macvlan_mode, network.ipvlan_mode) == (mode, None)
