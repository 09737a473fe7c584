"""The incremental path equals a full recompute (hypothesis): desired.compute with the
Memo kept across events against a fresh one, the plan scoped to what changed against a
full plan, and the daemon's host snapshot, kept from its own changes (plan.after) and
from netlink's route notifications without a dump, against the model kernel. The events
include what Podman brought: containers' MACs and the shims' neighbour entries (NeighDel),
and a network without a parent that follows the host's default route."""

import dataclasses
import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st

from macvlan_router import daemon as daemon_mod
from macvlan_router import desired, plan
from macvlan_router.config import Config
from macvlan_router.model import Address, Neighbour, Route

from .factories import apply_model, endpoint, host, iface, network
from .test_daemon import FakeDocker, make

# Two networks share a subnet on different parents (overlapping destinations), and the
# pool holds the subnet's edges and the host's addresses (refused or skipped routes).
NETWORKS = {
    "lan0": dict(parent="eth0", subnets=("198.51.100.0/24",)),
    "lan1": dict(parent="eth1", subnets=("198.51.100.0/24",)),
    "lan2": dict(parent="eth2", subnets=("203.0.113.0/24", "2001:db8:2::/64")),
    "lan3": dict(parent=None, default_route_parent=True, subnets=("198.51.100.0/24",)),
}
POOL = ("198.51.100.0", "198.51.100.2", "198.51.100.130", "198.51.100.131",
        "198.51.100.255", "203.0.113.130", "203.0.113.131", "203.0.113.2")
V6 = (None, "2001:db8:2::1:5", "2001:db8:2::1:6")
NAMES = ("a", "b", "c", "d")
MACS = (None, "02:00:00:00:00:01", "02:00:00:00:00:02")
SHIMS = tuple(desired.default_shim_name(parent) for parent in ("eth0", "eth1", "eth2"))
HOST = host(links=("eth0", "eth1", "eth2"),
            addresses=(("eth0", "198.51.100.2/24"), ("eth1", "198.51.100.3/24"),
                       ("eth2", "203.0.113.2/24")))

connects = st.tuples(st.just("connect"), st.sampled_from(sorted(NETWORKS)),
                     st.sampled_from(NAMES), st.sampled_from(POOL), st.sampled_from(V6),
                     st.sampled_from(MACS))
disconnects = st.tuples(st.just("disconnect"), st.sampled_from(sorted(NETWORKS)),
                        st.sampled_from(NAMES))
removals = st.tuples(st.just("remove"), st.sampled_from(sorted(NETWORKS)))
# A network read again without a change: a new object with the same endpoint objects.
rereads = st.tuples(st.just("reread"), st.sampled_from(sorted(NETWORKS)))
host_changes = st.tuples(st.just("host address"), st.sampled_from(POOL))
default_routes = st.tuples(st.just("default route"),
                           st.sampled_from((None, "eth0", "eth1", "eth2")))
# Where containers are most often: a stale entry there is a NeighDel.
neighbours = st.tuples(st.just("neighbour"), st.sampled_from(SHIMS),
                       st.sampled_from(("198.51.100.130", "198.51.100.131", "203.0.113.130")),
                       st.sampled_from(MACS[1:]))
events = st.lists(st.one_of(connects, disconnects, removals, rereads, host_changes,
                            default_routes, neighbours), max_size=25)


def build(state):
    return [network(name, endpoints=[endpoint(n, v4, v6, mac) for n, (v4, v6, mac) in
                                     sorted(state[name].items())], **NETWORKS[name])
            for name in sorted(state)]


def step(state, objects, h, event):
    """Apply one event to the state; networks it did not touch keep their objects, as
    view.View keeps them, and a network read again keeps the objects of the endpoints
    that did not change, as docker_source keeps them."""
    kind = event[0]
    if kind == "host address":
        extra = Address("eth2", iface(f"{event[1]}/32"))
        addresses = tuple(a for a in h.addresses if a != extra)
        h = dataclasses.replace(h, addresses=addresses if len(addresses) < len(h.addresses)
                                else addresses + (extra,))
        return objects, h
    if kind == "default route":
        routes = tuple(r for r in h.routes if r.dst.prefixlen != 0)
        if event[1] is not None:
            routes += (Route(dst=ipaddress.ip_network("0.0.0.0/0"), ifname=event[1], proto=3,
                             gateways=(ipaddress.ip_address("203.0.113.1"),)),)
        return objects, dataclasses.replace(h, routes=routes)
    if kind == "neighbour":
        entry = Neighbour(event[1], ipaddress.ip_address(event[2]), event[3])
        kept = tuple(n for n in h.neighbours if (n.ifname, n.ip) != (entry.ifname, entry.ip))
        return objects, h.with_neighbours(kept + (entry,) * (len(kept) == len(h.neighbours)))
    name = event[1]
    if kind == "connect":
        state.setdefault(name, {})[event[2]] = (event[3], event[4], event[5])
    elif kind == "disconnect":
        state.get(name, {}).pop(event[2], None)
    elif kind == "remove":
        state.pop(name, None)
    objects = {n: objects.get(n) for n in state}
    if name in state:
        fresh = build({name: state[name]})[0]
        before = {e: e for e in objects[name].endpoints} if objects[name] else {}
        objects[name] = dataclasses.replace(fresh, endpoints=tuple(
            before.get(e, e) for e in fresh.endpoints))
    return objects, h


def full_value(want):
    """Everything a Desired says, including the RouteSpec fields equality skips."""
    return (want.shims, {dst: (spec, spec.network, spec.container_id, spec.container_name,
                               spec.mac) for dst, spec in want.routes.items()},
            want.networks, want.problems)


@settings(max_examples=300, deadline=None)
@given(events)
def test_the_memo_gives_what_a_full_computation_gives(sequence):
    memo, state, objects, h = desired.Memo(), {}, {}, HOST
    config = Config()
    for event in sequence:
        objects, h = step(state, objects, h, event)
        networks = sorted(objects.values(), key=lambda n: n.name)
        incremental = desired.compute(config, networks, h, memo)
        assert full_value(incremental) == full_value(desired.compute(config, networks, h))


def plan_value(p):
    return p.actions, p.problems, p.pending, p.kept


@settings(max_examples=300, deadline=None)
@given(events)
@example([("connect", "lan0", "a", "198.51.100.130", None, MACS[1]),
          ("connect", "lan0", "b", "198.51.100.131", None, None),
          ("neighbour", SHIMS[0], "198.51.100.130", MACS[2])])
def test_a_plan_scoped_to_what_changed_is_the_full_plan(sequence):
    """Each plan is carried out on the model kernel, and the next one looks only at the
    destinations Docker's view or the last plan changed (unless the host changed under
    it): the same actions, problems and counts as a plan from scratch."""
    memo, state, objects, h = desired.Memo(), {}, {}, HOST
    previous, touched = None, frozenset()
    for event in sequence:
        objects, changed_host = step(state, objects, h, event)
        if event[0] == "neighbour":
            # As Reconciler.assess: new neighbour entries keep the snapshot, and the plan
            # looks again at their destinations.
            moved = set(changed_host.neighbours) ^ set(h.neighbours)
            h, touched = changed_host, touched | {ipaddress.ip_network(n.ip) for n in moved}
        elif event[0] == "host address":
            # As Reconciler.host_changed: an address notification keeps the last plan,
            # whose inputs (the shims, their addresses) the next one compares.
            h = changed_host
        elif changed_host is not h:
            h, previous = changed_host, None
        want = desired.compute(Config(), sorted(objects.values(), key=lambda n: n.name), h,
                               memo)
        scope = None if want.changed is None else want.changed | touched
        scoped = plan.compute(want, h, previous=previous, scope=scope)
        assert plan_value(scoped) == plan_value(plan.compute(want, h))
        after = plan.after(h, scoped.actions)
        if after is None:
            h, previous = apply_model(h, scoped.actions), None
        else:
            assert sorted(after.routes, key=str) == sorted(
                apply_model(h, scoped.actions).routes, key=str)
            h, previous = after, scoped
        touched = frozenset(a.spec.dst if isinstance(a, plan.RouteReplace) else a.route.dst
                            for a in scoped.actions if isinstance(a, (plan.RouteReplace,
                                                                      plan.RouteDel)))


def test_a_changed_network_reuses_the_routes_of_the_endpoints_it_kept():
    memo = desired.Memo()
    first = network("lan0", parent="eth0", endpoints=[endpoint("a", "198.51.100.130")])
    desired.compute(Config(), [first], HOST, memo)
    kept = memo.networks[first.id].steps[first.endpoints[0].container_id][1]
    second = dataclasses.replace(first, endpoints=first.endpoints + (
        endpoint("b", "198.51.100.131"),))
    want = desired.compute(Config(), [second], HOST, memo)
    assert memo.networks[second.id].steps[first.endpoints[0].container_id][1] is kept
    assert len(want.routes) == 2


lan_events = st.lists(st.one_of(
    st.tuples(st.just("connect"), st.sampled_from(NAMES),
              st.sampled_from(("198.51.100.130", "198.51.100.131", "198.51.100.140"))),
    st.tuples(st.just("disconnect"), st.sampled_from(NAMES)),
    st.tuples(st.just("route lost"), st.booleans())), max_size=20)


@settings(max_examples=100, deadline=None)
@given(lan_events)
def test_the_daemon_s_snapshot_after_its_own_changes_is_the_kernel_s(sequence):
    """Through the daemon's loop: after every event the snapshot it keeps without a dump
    equals the (model) kernel, and a full reconcile from scratch finds nothing to do."""
    lan = network("lan", parent="eth0")
    docker = FakeDocker(lan)
    d, netlink, _ = make(docker)
    d.triggers.put((daemon_mod.DOCKER, "all"))
    d.step()
    assert d.host_retry.failures == 0 and d.phase is daemon_mod.SERVING
    members = {}
    for event in sequence:
        if event[0] == "route lost":
            # Someone else deletes one of our routes; the monitor reports it, as a route
            # notification (folded into the snapshot) or as "something changed" (a dump).
            gone = [r for r in netlink.host.routes if r.owned][:1]
            netlink.host = dataclasses.replace(netlink.host, routes=tuple(
                r for r in netlink.host.routes if r not in gone))
            if event[1]:
                for route in gone:
                    d.reconciler.news.add("route", False, dataclasses.replace(
                        route, ifname=netlink.host.link(route.ifname).index))
            d.triggers.put((daemon_mod.HOST, None))
        else:
            if event[0] == "connect":
                members[event[1]] = event[2]
            else:
                members.pop(event[1], None)
            docker.networks[lan.id] = dataclasses.replace(lan, endpoints=tuple(
                endpoint(n, a) for n, a in sorted(members.items())))
            d.triggers.put((daemon_mod.DOCKER, lan.id))
        d.step()
        assert d.host_retry.failures == 0, "every apply went through"
        snapshot = d.reconciler._host
        if event[0] != "route lost" or event[1]:
            assert snapshot is not None, "route changes, ours or notified, need no dump"
            assert sorted(snapshot.routes, key=str) == sorted(netlink.host.routes, key=str)
        fresh = desired.compute(Config(), [docker.networks[lan.id]], netlink.host)
        assert plan.compute(fresh, netlink.host).actions == ()


def test_a_default_route_notification_moves_a_network_without_parent_at_once():
    """The daemon's loop: the default route moves to another interface and the monitor
    reports it as a route notification; the network that names no parent follows it
    (its memoised routes and the snapshot are not reused), as a full reconcile would."""
    def default_route(dev):
        return Route(dst=ipaddress.ip_network("0.0.0.0/0"), ifname=dev, proto=3,
                     gateways=(ipaddress.ip_address("203.0.113.1"),))
    lan = network("lan", parent=None, default_route_parent=True,
                  endpoints=[endpoint("a", "198.51.100.130")])
    docker = FakeDocker(lan)
    start = dataclasses.replace(HOST, routes=(default_route("eth0"),))
    d, netlink, _ = make(docker, start)
    d.triggers.put((daemon_mod.DOCKER, "all"))
    d.step()
    shims = {r.ifname for r in netlink.host.routes if r.owned}
    assert shims == {desired.default_shim_name("eth0")}
    moved = default_route("eth1")
    netlink.host = dataclasses.replace(netlink.host, routes=tuple(
        r for r in netlink.host.routes if r.dst.prefixlen) + (moved,))
    d.reconciler.news.add("route", True, dataclasses.replace(
        moved, ifname=netlink.host.link("eth1").index))
    d.triggers.put((daemon_mod.HOST, None))
    d.step()
    shims = {r.ifname for r in netlink.host.routes if r.owned}
    assert shims == {desired.default_shim_name("eth1")}
    fresh = desired.compute(Config(), [lan], netlink.host)
    assert plan.compute(fresh, netlink.host).actions == ()


def test_neighbours_are_read_for_a_plan_that_may_need_a_neigh_del_only():
    """A connect whose container's MAC is known reads the entries on its shim once its
    route is in place (a stale one there is a NeighDel); a disconnect reads none; the
    outcome is the full one."""
    lan = network("lan", parent="eth0")
    docker = FakeDocker(lan)
    d, netlink, _ = make(docker)
    d.triggers.put((daemon_mod.DOCKER, "all"))
    d.step()
    d.reconciler.warm()
    # A pass with nothing to do: its plan is the one the next ones are scoped by.
    d.triggers.put((daemon_mod.DOCKER, lan.id))
    d.step()
    read = []
    kernel_neighbours = netlink.neighbours
    netlink.neighbours = lambda links: read.append(
        ({link.name for link in links}, list(netlink.applied))) or kernel_neighbours(links)
    shim = desired.default_shim_name("eth0")
    stale = Neighbour(shim, ipaddress.ip_address("198.51.100.130"), MACS[2])
    netlink.host = netlink.host.with_neighbours((stale,))

    docker.networks[lan.id] = dataclasses.replace(lan, endpoints=(
        endpoint("a", "198.51.100.130", mac=MACS[1]),))
    d.triggers.put((daemon_mod.DOCKER, lan.id))
    d.step()
    assert [shims for shims, _ in read] == [{shim}]
    assert any(isinstance(a, plan.RouteReplace) for a in read[0][1]), \
        "the route was added before the neighbour entries were read"
    assert plan.NeighDel(shim, stale.ip) in netlink.applied

    del read[:]
    docker.networks[lan.id] = lan
    d.triggers.put((daemon_mod.DOCKER, lan.id))
    d.step()
    assert read == [], "a disconnect needs no neighbour entry"
    fresh = desired.compute(Config(), [lan], netlink.host)
    assert plan.compute(fresh, netlink.host).actions == ()
