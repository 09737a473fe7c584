"""The host snapshot kept from netlink notifications (model.Host.with_notified): it
follows links, addresses and routes as the kernel reports them, and gives up (None: read
the host again) where a notification cannot tell the whole change."""

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from macvlan_router import daemon as daemon_mod
from macvlan_router.config import Config
from macvlan_router import desired, plan
from macvlan_router.model import Address, Host, Link

from .factories import iface, network, endpoint, host, net, route
from .test_daemon import FakeDocker, make

ETH0 = Link(index=2, name="eth0")


def address(index, text, **flags):
    return Address(index, iface(text), **flags)


def test_a_link_that_changes_but_stays_up_is_replaced_in_place():
    h = Host(links=(ETH0, Link(index=3, name="eth1")))
    moved = dataclasses.replace(ETH0, mac="02:00:00:00:00:09")
    assert h.with_notified([("link", True, moved)]).links == (moved, h.links[1])


def test_a_link_coming_up_is_followed():
    vlan = Link(index=9, name="eth0.5", up=False)
    h = Host(links=(ETH0, vlan)).with_notified([("link", True, dataclasses.replace(
        vlan, up=True))])
    assert h.link("eth0.5").up


def test_what_a_notification_cannot_tell_means_reading_again():
    h = Host(links=(ETH0,), routes=(route("198.51.100.0/24", "eth0", None, proto=2),))
    # Down: the kernel drops the link's IPv4 routes without a notification.
    assert h.with_notified([("link", True, dataclasses.replace(ETH0, up=False))]) is None
    assert h.with_notified([("link", False, ETH0)]) is None, "deleted"
    assert h.with_notified([("link", True, dataclasses.replace(ETH0, name="lan"))]) is None
    assert h.with_notified([("link", True, Link(index=7, name="eth1"))]) is None, \
        "a new link: its addresses may have come before the daemon watched it"
    assert h.with_notified([("address", True, address(5, "198.51.100.9/24"))]) is None, \
        "an index the snapshot lacks"


def test_addresses_follow_by_interface_and_prefix():
    h = Host(links=(ETH0,), addresses=(Address("eth0", iface("198.51.100.2/24")),))
    added = h.with_notified([("address", True, address(2, "2001:db8::2/64", tentative=True))])
    assert added.addresses_of("eth0")[1] == Address("eth0", iface("2001:db8::2/64"),
                                                    tentative=True)
    ready = added.with_notified([("address", True, address(2, "2001:db8::2/64"))])
    assert [a.tentative for a in ready.addresses_of("eth0")] == [False, False]
    gone = ready.with_notified([("address", False, address(2, "198.51.100.2/24"))])
    assert [str(a.interface) for a in gone.addresses] == ["2001:db8::2/64"]


def test_a_snapshot_that_keeps_its_routes_keeps_their_index():
    h = Host(links=(ETH0,), routes=(route("198.51.100.9/32", "eth0", "198.51.100.2"),))
    index = h.route_index
    after = h.with_notified([("address", True, address(2, "198.51.100.2/24"))])
    assert after.route_index is index


# A model kernel: links by index (name, up) and addresses; every change it makes is also
# the notification netlink sends for it.
NAMES = ("eth0", "eth1", "vlan5")
ops = st.lists(st.one_of(
    st.tuples(st.just("link"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("unlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("address"), st.sampled_from(NAMES),
              st.sampled_from(("198.51.100.2/24", "198.51.100.3/32", "2001:db8::2/64")),
              st.booleans(), st.booleans())), max_size=20)


def kernel_step(links, addresses, op, next_index):
    """The kernel after `op`, and the notifications it sends (None: the op is refused)."""
    by_name = {link.name: link for link in links.values()}
    if op[0] == "link":
        before = by_name.get(op[1])
        link = Link(index=before.index if before else next_index, name=op[1], up=op[2])
        links[link.index] = link
        return [("link", True, link)]
    link = by_name.get(op[1])
    if link is None:
        return None
    if op[0] == "unlink":
        del links[link.index]
        told = [("address", False, dataclasses.replace(a, ifname=link.index))
                for a in addresses if a.ifname == link.name]
        addresses[:] = [a for a in addresses if a.ifname != link.name]
        return told + [("link", False, link)]
    entry = Address(link.name, iface(op[2]), tentative=op[4])
    key = (link.name, entry.interface)
    addresses[:] = [a for a in addresses if (a.ifname, a.interface) != key]
    if op[3]:
        addresses.append(entry)
    return [("address", op[3], dataclasses.replace(entry, ifname=link.index))]


@settings(max_examples=200, deadline=None)
@given(ops)
def test_the_snapshot_follows_the_kernel_or_says_it_cannot(sequence):
    links, addresses = {2: ETH0}, []
    snapshot = Host(links=(ETH0,))
    for position, op in enumerate(sequence):
        told = kernel_step(links, addresses, op, next_index=10 + position)
        if told is None:
            continue
        snapshot = snapshot.with_notified(told)
        if snapshot is None:
            # What the daemon does then: read the whole host.
            snapshot = Host(links=tuple(links.values()), addresses=tuple(addresses))
        assert sorted(snapshot.links, key=lambda link: link.index) == sorted(
            links.values(), key=lambda link: link.index)
        assert sorted(snapshot.addresses, key=str) == sorted(addresses, key=str)


def test_the_daemon_folds_an_address_notification_without_reading_the_host():
    """The host takes an address a container holds: the daemon learns it from the
    notification alone, drops that container's route, and agrees with a full reconcile."""
    lan = network("lan", parent="eth0", endpoints=[endpoint("a", "198.51.100.130"),
                                                   endpoint("b", "198.51.100.131")])
    docker = FakeDocker(lan)
    d, netlink, _ = make(docker, host())
    d.triggers.put((daemon_mod.DOCKER, "all"))
    d.step()
    assert {str(r.dst) for r in netlink.host.routes if r.owned} == {
        "198.51.100.130/32", "198.51.100.131/32"}
    assert d.triggers.items == [(daemon_mod.HOST, None)], \
        "the new shim and parent are watched now: once more, on a fresh read"
    d.step()
    d.reconciler.warm()  # as the idle loop does
    reads = []
    netlink.read = lambda: reads.append(1) or netlink.host
    taken = Address("eth0", iface("198.51.100.131/32"))
    netlink.host = dataclasses.replace(netlink.host,
                                       addresses=netlink.host.addresses + (taken,))
    d.reconciler.news.add("address", True, dataclasses.replace(
        taken, ifname=netlink.host.link("eth0").index))
    d.triggers.put((daemon_mod.HOST, None))
    d.step()
    assert not reads, "folded, not read"
    assert {str(r.dst) for r in netlink.host.routes if r.owned} == {"198.51.100.130/32"}
    assert sorted(d.reconciler._host.addresses, key=str) == sorted(netlink.host.addresses,
                                                                   key=str)
    fresh = desired.compute(Config(), [lan], netlink.host)
    assert plan.compute(fresh, netlink.host).actions == ()
    assert net("198.51.100.131/32") not in fresh.routes


def test_a_parent_made_before_anyone_watched_it_is_read_when_its_network_comes():
    """Its link and address notifications came while no network named it, so the
    snapshot never took them: the network's arrival makes the daemon read the host again
    and serve it at once, not at the next event or resync."""
    docker = FakeDocker()
    d, netlink, _ = make(docker, host(links=("eth0",)))
    d.triggers.put((daemon_mod.DOCKER, "all"))
    d.step()
    d.reconciler.warm()
    netlink.host = host(links=("eth0", "eth1"), addresses=(
        ("eth0", "198.51.100.2/24"), ("eth1", "203.0.113.2/24")))
    lan = network("lan", parent="eth1", subnets=("203.0.113.0/24",),
                  endpoints=[endpoint("a", "203.0.113.130")])
    docker.networks[lan.id] = lan
    d.triggers.put((daemon_mod.DOCKER, "all"))
    for _ in range(3):
        if d.triggers.empty():
            break
        d.step()
    assert {str(r.dst) for r in netlink.host.routes if r.owned} == {"203.0.113.130/32"}
