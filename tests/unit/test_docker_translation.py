"""Docker's answers into model values (docker_source.to_network, classify): a bad field
costs only itself, never a traceback."""

import pytest

from macvlan_router.docker_source import CONTAINER_CHANGED, REFRESH_ALL, REFRESH_ENDPOINTS, \
    classify, to_network

NET_ID = "a" * 64
GOOD_CID = "b" * 64
BAD_CID = "c" * 64


def record(**changes):
    raw = {
        "Id": NET_ID, "Name": "lan", "Driver": "macvlan",
        "Options": {"parent": "eth0"},
        "IPAM": {"Config": [{"Subnet": "198.51.100.0/24", "Gateway": "198.51.100.1",
                             "AuxiliaryAddresses": {"host": "198.51.100.2"}}]},
        "Labels": {"k": "v"},
        "Containers": {
            GOOD_CID: {"Name": "web", "IPv4Address": "198.51.100.130/24",
                       "IPv6Address": ""},
            BAD_CID: {"Name": "odd", "IPv4Address": "198.51.100.131/24"},
        },
    }
    raw.update(changes)
    return raw


def test_a_good_record():
    network, problems = to_network(record(), {})
    assert not problems
    assert network.parent == "eth0" and [str(s) for s in network.subnets] == ["198.51.100.0/24"]
    assert [(e.container_name, str(e.ipv4)) for e in network.endpoints] == [
        ("web", "198.51.100.130"), ("odd", "198.51.100.131")]


@pytest.mark.parametrize("address", ["garbage", "198.51.100.140/99", "300.1.1.1",
                                     "2001:db8::1/64", 42])
def test_a_bad_endpoint_address_costs_that_address_only(address):
    raw = record()
    raw["Containers"][BAD_CID]["IPv4Address"] = address
    network, problems = to_network(raw, {})
    web, odd = network.endpoints
    assert str(web.ipv4) == "198.51.100.130" and odd.ipv4 is None
    (problem,) = problems
    assert problem.kind == "warning" and problem.network == "lan"
    assert all(word in problem.message for word in ("odd", "lan", "IPv4Address"))


def test_a_null_container_entry_is_skipped():
    raw = record()
    raw["Containers"][BAD_CID] = None
    network, problems = to_network(raw, {})
    assert [e.container_name for e in network.endpoints] == ["web"]
    assert "Containers[" in problems[0].message


@pytest.mark.parametrize("field", ["Id", "Name"])
@pytest.mark.parametrize("value", [None, "", 7])
def test_a_record_without_identity_is_not_a_network(field, value):
    network, problems = to_network(record(**{field: value}), {})
    assert network is None
    assert field in problems[0].message and problems[0].kind == "warning"


@pytest.mark.parametrize("key, value", [("Subnet", "198.51.100.0/33"), ("Subnet", 5),
                                        ("Gateway", "not-an-address")])
def test_a_bad_subnet_or_gateway_is_left_out_with_a_warning(key, value):
    raw = record()
    raw["IPAM"]["Config"][0][key] = value
    network, problems = to_network(raw, {})
    assert network is not None and any(key in p.message for p in problems)


@pytest.mark.parametrize("key, value", [("Labels", ["a", "b"]), ("Options", "x"),
                                        ("Containers", ["x"]), ("IPAM", 3),
                                        ("ConfigFrom", "x"), ("Driver", 3), ("Driver", ""),
                                        ("Driver", None)])
def test_a_field_of_the_wrong_type_is_ignored_with_a_warning(key, value):
    network, problems = to_network(record(**{key: value}), {})
    assert network is not None and problems and key in problems[0].message


@pytest.mark.parametrize("raw", [None, [], "x", 3])
def test_a_record_that_is_not_an_object(raw):
    network, problems = to_network(raw, {})
    assert network is None and problems


def test_config_from_is_followed():
    base = {"Name": "base", "Options": {"parent": "eth0.10"},
            "IPAM": {"Config": [{"Subnet": "203.0.113.0/24"}]}}
    network, _ = to_network(record(ConfigFrom={"Network": "base"}, Options={}, IPAM={}),
                            {"base": base})
    assert network.parent == "eth0.10" and str(network.subnets[0]) == "203.0.113.0/24"


@pytest.mark.parametrize("event, scope", [
    ({"Type": "network", "Action": "connect", "Actor": {"ID": NET_ID}}, NET_ID),
    ({"Type": "network", "Action": "disconnect", "Actor": {"ID": NET_ID}}, NET_ID),
    ({"Type": "network", "Action": "connect", "Actor": {}}, REFRESH_ENDPOINTS),
    ({"Type": "network", "Action": "create", "Actor": {"ID": NET_ID}}, REFRESH_ALL),
    ({"Type": "network", "Action": "destroy", "Actor": {"ID": NET_ID}}, REFRESH_ALL),
    ({"Type": "container", "Action": "start"}, CONTAINER_CHANGED),
    ({"Type": "container", "Action": "die"}, CONTAINER_CHANGED),
    ({"Type": "container", "Action": "create"}, None),
    ({"Type": "container", "Action": "exec_start: sh"}, None),
])
def test_classify(event, scope):
    assert classify(event) == scope


@pytest.mark.parametrize("event", [None, [], "x", {"Type": 3}, {"Actor": "x", "Type": "network",
                                                                "Action": "connect"}])
def test_classify_survives_odd_events(event):
    classify(event)


def test_an_unchanged_endpoint_record_keeps_its_translation():
    known = {}
    first, _ = to_network(record(), {}, known=known)
    again = record()
    again["Containers"][GOOD_CID] = dict(again["Containers"][GOOD_CID])  # a new decode
    del again["Containers"][BAD_CID]
    second, _ = to_network(again, {}, known=known)
    assert second.endpoints[0] is first.endpoints[0]
    assert set(known) == {GOOD_CID}, "a container gone is forgotten"
    again["Containers"][GOOD_CID]["IPv4Address"] = "198.51.100.140/24"
    third, _ = to_network(again, {}, known=known)
    assert str(third.endpoints[0].ipv4) == "198.51.100.140"
    again["Containers"][GOOD_CID] = dict(again["Containers"][GOOD_CID],
                                         MacAddress="02:42:c6:33:64:8c")
    fourth, _ = to_network(again, {}, known=known)
    assert fourth.endpoints[0].mac == "02:42:c6:33:64:8c", "a new MAC is a change"


def test_a_record_with_a_bad_field_warns_on_every_read():
    known = {}
    raw = record()
    raw["Containers"][BAD_CID]["IPv6Address"] = "not an address"
    assert len(to_network(raw, {}, known=known)[1]) == 1
    assert len(to_network(raw, {}, known=known)[1]) == 1


def test_the_mac_is_read_and_a_bad_one_left_out():
    raw = record()
    raw["Containers"][GOOD_CID]["MacAddress"] = "02:42:C6:33:64:82"
    raw["Containers"][BAD_CID]["MacAddress"] = "not-a-mac"
    network, problems = to_network(raw, {})
    assert [e.mac for e in network.endpoints] == ["02:42:c6:33:64:82", None]
    assert len(problems) == 1 and "MacAddress" in problems[0].message


@pytest.mark.parametrize("options, mode", [
    ({"parent": "eth0"}, "bridge"), ({"parent": "eth0", "macvlan_mode": ""}, "bridge"),
    ({"parent": "eth0", "macvlan_mode": "passthru"}, "passthru")])
def test_a_macvlan_network_has_its_macvlan_mode(options, mode):
    network, _ = to_network(record(Options=options), {})
    assert network.macvlan_mode == mode
