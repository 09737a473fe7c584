"""Which netlink notifications are worth a reconcile (netlink.ChangeFilter)."""

from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_DELROUTE, RTM_NEWADDR,
                                   RTM_NEWLINK, RTM_NEWROUTE)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from macvlan_router import netlink
from macvlan_router.model import ROUTE_PROTO
from macvlan_router.netlink import Change, ChangeFilter, OwnChanges, Watched

from .factories import net

WATCHED = Watched(frozenset({"mvr-eth0", "eth0"}), frozenset({7, 2}))


def relevant(change, watched=WATCHED, seen=()):
    f = ChangeFilter()
    for earlier in seen:
        f.relevant(earlier, watched)
    return f.relevant(change, watched)


def test_our_route_deleted_is_a_change():
    assert relevant(Change(RTM_DELROUTE, proto=ROUTE_PROTO, host_route=True))


def test_our_own_route_deletion_is_not_a_change_but_a_second_one_is():
    own = OwnChanges()
    watched = WATCHED._replace(own=own)
    gone = Change(RTM_DELROUTE, proto=ROUTE_PROTO, host_route=True, dst=net("198.51.100.9/32"))
    own.expect(gone.dst)
    f = ChangeFilter()
    assert not f.relevant(gone, watched), "the daemon's own deletion costs no reconcile"
    assert f.relevant(gone, watched), "the same route deleted again is someone else's doing"


def test_a_cancelled_deletion_is_no_longer_expected():
    own = OwnChanges()
    gone = Change(RTM_DELROUTE, proto=ROUTE_PROTO, host_route=True, dst=net("198.51.100.9/32"))
    own.expect(gone.dst)
    own.cancel(gone.dst)
    assert relevant(gone, WATCHED._replace(own=own))
    own.expect(gone.dst)
    own.forget()
    assert relevant(gone, WATCHED._replace(own=own))


def test_an_expectation_whose_notification_never_came_lapses():
    now = [100.0]
    own = OwnChanges(clock=lambda: now[0])
    gone = Change(RTM_DELROUTE, proto=ROUTE_PROTO, host_route=True, dst=net("198.51.100.9/32"))
    own.expect(gone.dst)
    now[0] += OwnChanges.EXPECTED_FOR + 1
    assert relevant(gone, WATCHED._replace(own=own)), "someone else's deletion, later"


def test_our_own_route_added_is_not():
    assert not relevant(Change(RTM_NEWROUTE, proto=ROUTE_PROTO, host_route=True))


def test_a_foreign_host_route_matters_either_way():
    assert relevant(Change(RTM_NEWROUTE, proto=4, host_route=True))
    assert relevant(Change(RTM_DELROUTE, proto=4, host_route=True))
    assert not relevant(Change(RTM_NEWROUTE, proto=4, host_route=False))


def test_other_tables_do_not_matter():
    assert not relevant(Change(RTM_DELROUTE, table=255, proto=ROUTE_PROTO, host_route=True))


def test_a_watched_link_deleted_or_changed_matters_once():
    up = Change(RTM_NEWLINK, 7, "mvr-eth0", (1, 2, "macvlan-router", "aa"))
    assert relevant(up)
    assert not relevant(up, seen=[up]), "the same state again is no change"
    assert relevant(Change(RTM_NEWLINK, 7, "mvr-eth0", (0, 2, "macvlan-router", "aa")),
                    seen=[up])
    assert relevant(Change(RTM_DELLINK, 7, "mvr-eth0"))


def test_container_links_do_not_matter():
    assert not relevant(Change(RTM_NEWLINK, 40, "veth1234", (1, 2, None, "bb")))
    assert not relevant(Change(RTM_DELLINK, 40, "veth1234"))


def test_addresses_matter_on_watched_links_only():
    assert relevant(Change(RTM_NEWADDR, 7)) and relevant(Change(RTM_DELADDR, 2))
    assert not relevant(Change(RTM_DELADDR, 40))


def test_before_the_first_reconcile_everything_matters():
    assert relevant(Change(RTM_DELADDR, 40), watched=None)
    assert relevant(Change(RTM_NEWLINK, 40, "veth1234", ()), watched=None)


def test_forget_makes_a_link_new_again():
    f = ChangeFilter()
    up = Change(RTM_NEWLINK, 7, "mvr-eth0", (1,))
    assert f.relevant(up, WATCHED) and not f.relevant(up, WATCHED)
    f.forget()
    assert f.relevant(up, WATCHED)


def test_a_foreign_default_route_change_matters():
    """It moves the host's default gateways and the parent of a network that names none."""
    assert relevant(Change(RTM_NEWROUTE, proto=4, default_route=True))
    assert relevant(Change(RTM_DELROUTE, proto=3, default_route=True))


# The monitor's pre-filter (netlink.worth_decoding) on the bytes the kernel sends:
# messages encoded by pyroute2, decoded as the monitor does.
def encoded(kind, msg, attrs, **fields):
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = list(attrs)
    msg["header"]["type"] = kind
    msg.encode()
    return bytes(msg.data[:msg["header"]["length"]])


def links():
    return st.builds(lambda kind, index, name, flags: encoded(
        kind, ifinfmsg(), [("IFLA_IFNAME", name), ("IFLA_IFALIAS", "x")], index=index,
        flags=flags), st.sampled_from((RTM_NEWLINK, RTM_DELLINK)), st.sampled_from((2, 7, 40)),
        st.sampled_from(("eth0", "mvr-eth0", "veth1234")), st.sampled_from((0, 1, 0x10001)))


def addresses():
    return st.builds(lambda kind, index: encoded(
        kind, ifaddrmsg(), [("IFA_ADDRESS", "198.51.100.2")], family=2, prefixlen=24,
        index=index), st.sampled_from((RTM_NEWADDR, RTM_DELADDR)), st.sampled_from((2, 7, 40)))


def routes():
    """Default, subnet and host routes, in main, local and a table above 255."""
    return st.builds(lambda kind, v4, size, table, proto: encoded(
        kind, rtmsg(), [("RTA_DST", "198.51.100.0" if v4 else "2001:db8::"),
                        ("RTA_OIF", 7)] + ([("RTA_TABLE", table)] if table > 255 else []),
        family=2 if v4 else 10, dst_len=(0, 24 if v4 else 64, 32 if v4 else 128)[size],
        table=252 if table > 255 else table, proto=proto),
        st.sampled_from((RTM_NEWROUTE, RTM_DELROUTE)), st.booleans(), st.sampled_from((0, 1, 2)),
        st.sampled_from((254, 255, 1000)), st.sampled_from((2, 4, ROUTE_PROTO)))


@settings(max_examples=300, deadline=None)
@given(st.one_of(links(), addresses(), routes()), st.sampled_from((None, WATCHED)))
def test_the_monitor_decodes_every_message_the_filter_may_want(data, watched):
    (kind, offset, length), = netlink._messages(data)
    msg, = MarshalRtnl().parse(data)
    if ChangeFilter().relevant(Change.of(msg), watched):
        assert netlink.worth_decoding(kind, data, offset, length, watched)


def test_the_monitor_skips_container_links_and_our_own_routes_undecoded():
    veth = encoded(RTM_NEWLINK, ifinfmsg(), [("IFLA_IFNAME", "veth1234")], index=40)
    ours = encoded(RTM_NEWROUTE, rtmsg(), [("RTA_DST", "198.51.100.9")], family=2,
                   dst_len=32, table=254, proto=ROUTE_PROTO)
    parent = encoded(RTM_NEWLINK, ifinfmsg(), [("IFLA_IFNAME", "eth0")], index=99)
    both = veth + ours + parent
    found = [netlink.worth_decoding(kind, both, offset, length, WATCHED)
             for kind, offset, length in netlink._messages(both)]
    assert found == [False, False, True], "a watched name is decoded at a new index too"
