"""Docker's view (macvlan_router/view.py): replaced only by reads that answered, and the
protection it gives routes while it is not complete."""

from macvlan_router import plan
from macvlan_router.config import Selector
from macvlan_router.docker_source import Listing
from macvlan_router.model import Desired, Problem
from macvlan_router.view import View

from .factories import endpoint, host, iface, net, network, route

LAN = network("lan", endpoints=[endpoint("web", "198.51.100.130")])
IOT = network("iot", parent="eth1", subnets=("203.0.113.0/24",),
              endpoints=[endpoint("cam", "203.0.113.140")])
LISTED = Listing((network("lan"), network("iot", parent="eth1", subnets=("203.0.113.0/24",))))


def read(*networks):
    view = View().after_list(LISTED, ())
    for n in networks:
        view = view.after_inspect(n.id, n)
    return view


def test_never_listed_protects_everything():
    protection = View().protection()
    assert protection.total and protection.covers(net("203.0.113.9/32"))
    assert not View().complete


def test_listed_but_not_inspected_is_incomplete_and_protects_those_subnets():
    view = View().after_list(LISTED, ())
    assert not view.complete
    assert view.protection().covers(net("198.51.100.130/32"))
    assert not view.problems(), "not read yet is no problem worth a warning"


def test_complete_after_every_inspect():
    view = read(LAN, IOT)
    assert view.complete and not view.protection().prefixes
    assert [n.name for n in view.networks()] == ["iot", "lan"]


def test_a_failed_inspect_keeps_the_last_endpoints_and_protects_the_subnet():
    view = read(LAN, IOT).after_failed_inspect(LAN.id, "HTTP 500")
    assert not view.complete
    (lan,) = [n for n in view.networks() if n.name == "lan"]
    assert lan.endpoints == LAN.endpoints
    protection = view.protection()
    assert protection.covers(net("198.51.100.131/32"))
    assert not protection.covers(net("203.0.113.141/32"))
    assert any("HTTP 500" in p.message and p.kind == "warning" for p in view.problems())


def test_a_later_good_inspect_clears_staleness():
    view = read(LAN, IOT).after_failed_inspect(LAN.id, "x").after_inspect(LAN.id, LAN)
    assert view.complete


def test_an_unreadable_list_record_protects_everything():
    view = View().after_list(Listing(LISTED.networks, (Problem("odd", kind="warning"),), 1), ())
    assert view.protection().total


def test_a_network_read_with_bad_fields_protects_its_subnets():
    view = read(IOT).after_inspect(LAN.id, LAN, [Problem("bad", "lan", "warning")])
    assert view.complete, "a bad field is Docker's doing, not a reason to wait"
    assert view.protection().covers(net("198.51.100.7/32"))


def test_a_network_docker_removed_leaves_the_view():
    view = read(LAN, IOT).after_inspect(LAN.id, None)
    assert [n.name for n in view.networks()] == ["iot"] and view.complete
    relisted = view.after_list(Listing((IOT,)), ())
    assert [n.name for n in relisted.networks()] == ["iot"]


def test_selection_follows_the_configuration():
    view = View().after_list(LISTED, (Selector("iot"),))
    assert [r.network.name for r in view.records.values()] == ["iot"]
    missing = View().after_list(LISTED, (Selector("nope"),))
    assert any("nope" in p.message for p in missing.problems())


def test_plan_keeps_protected_routes_shims_and_addresses():
    """Adopted at start over a failed read: nothing of ours may go."""
    h = host(shims=(("mvr-eth0", "eth0"),),
             routes=(route("198.51.100.130/32", "mvr-eth0", "198.51.100.2"),))
    h = h.__class__(links=h.links, routes=h.routes, machine_id=h.machine_id,
                    addresses=h.addresses + (
                        h.addresses[0].__class__("mvr-eth0", iface("198.51.100.2/32")),))
    result = plan.compute(Desired(), h, View().protection())
    assert result.actions == () and result.kept == 2, "the shim and its route"
    assert any(p.kind == "waiting" and "keeping 2" in p.message for p in result.problems)
    unprotected = plan.compute(Desired(), h)
    assert [type(a).__name__ for a in unprotected.actions] == ["LinkDel"]


def test_plan_deletes_outside_the_protected_subnets():
    h = host(links=("eth0", "eth1"), shims=(("mvr-eth0", "eth0"),),
             routes=(route("198.51.100.130/32", "mvr-eth0", "198.51.100.2"),
                     route("198.51.100.200/32", "mvr-eth0", "198.51.100.2")))
    view = read(LAN, IOT).after_failed_inspect(IOT.id, "timeout")
    want = Desired(shims={}, routes={})
    result = plan.compute(want, h, view.protection())
    assert [type(a).__name__ for a in result.actions] == ["LinkDel"], \
        "lan was read fine: its shim, not wanted, goes"
    kept = plan.compute(want, h, read(LAN, IOT).after_failed_inspect(LAN.id, "t").protection())
    assert kept.actions == ()


def test_a_listed_network_whose_driver_cannot_be_read_keeps_its_routes():
    """It is served by no one (not known to be macvlan or ipvlan), but its routes and shim
    stay until Docker reports it correctly: a garbled field is no `docker network rm`."""
    from macvlan_router.docker_source import to_network
    raw = {"Id": "d" * 64, "Name": "lan", "Driver": 7, "Options": {"parent": "eth0"},
           "IPAM": {"Config": [{"Subnet": "198.51.100.0/24"}]}}
    network, problems = to_network(raw, {})
    view = View().after_list(Listing((network,), tuple(problems)), ())
    assert view.protection().covers(net("198.51.100.130/32"))
