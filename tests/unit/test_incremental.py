"""The incremental path equals a full recompute (hypothesis): desired.compute with the
Memo kept across events against a fresh one, the plan scoped to what changed against a
full plan, and the daemon's host snapshot, kept from its own changes (plan.after) and
from netlink's route notifications without a dump, against the model kernel."""

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from macvlan_router import daemon as daemon_mod
from macvlan_router import desired, plan
from macvlan_router.config import Config
from macvlan_router.model import Address

from .factories import apply_model, endpoint, host, iface, network
from .test_daemon import FakeDocker, make

# Two networks share a subnet on different parents (overlapping destinations), and the
# pool holds the subnet's edges and the host's addresses (refused or skipped routes).
NETWORKS = {
    "lan0": dict(parent="eth0", subnets=("198.51.100.0/24",)),
    "lan1": dict(parent="eth1", subnets=("198.51.100.0/24",)),
    "lan2": dict(parent="eth2", subnets=("203.0.113.0/24", "2001:db8:2::/64")),
}
POOL = ("198.51.100.0", "198.51.100.2", "198.51.100.130", "198.51.100.131",
        "198.51.100.255", "203.0.113.130", "203.0.113.131", "203.0.113.2")
V6 = (None, "2001:db8:2::1:5", "2001:db8:2::1:6")
NAMES = ("a", "b", "c", "d")
HOST = host(links=("eth0", "eth1", "eth2"),
            addresses=(("eth0", "198.51.100.2/24"), ("eth1", "198.51.100.3/24"),
                       ("eth2", "203.0.113.2/24")))

connects = st.tuples(st.just("connect"), st.sampled_from(sorted(NETWORKS)),
                     st.sampled_from(NAMES), st.sampled_from(POOL), st.sampled_from(V6))
disconnects = st.tuples(st.just("disconnect"), st.sampled_from(sorted(NETWORKS)),
                        st.sampled_from(NAMES))
removals = st.tuples(st.just("remove"), st.sampled_from(sorted(NETWORKS)))
host_changes = st.tuples(st.just("host address"), st.sampled_from(POOL))
events = st.lists(st.one_of(connects, disconnects, removals, host_changes), max_size=25)


def build(state):
    return [network(name, endpoints=[endpoint(n, v4, v6) for n, (v4, v6) in
                                     sorted(state[name].items())], **NETWORKS[name])
            for name in sorted(state)]


def step(state, objects, h, event):
    """Apply one event to the state; networks it did not touch keep their objects, as
    view.View keeps them."""
    kind = event[0]
    if kind == "host address":
        extra = Address("eth2", iface(f"{event[1]}/32"))
        addresses = tuple(a for a in h.addresses if a != extra)
        h = dataclasses.replace(h, addresses=addresses if len(addresses) < len(h.addresses)
                                else addresses + (extra,))
        return objects, h
    name = event[1]
    if kind == "connect":
        state.setdefault(name, {})[event[2]] = (event[3], event[4])
    elif kind == "disconnect":
        state.get(name, {}).pop(event[2], None)
    else:
        state.pop(name, None)
    objects = {n: objects.get(n) for n in state}
    if name in state:
        objects[name] = build({name: state[name]})[0]
    return objects, h


def full_value(want):
    """Everything a Desired says, including the RouteSpec fields equality skips."""
    return (want.shims, {dst: (spec, spec.network, spec.container_id, spec.container_name)
                         for dst, spec in want.routes.items()},
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
def test_a_plan_scoped_to_what_changed_is_the_full_plan(sequence):
    """Each plan is carried out on the model kernel, and the next one looks only at the
    destinations Docker's view or the last plan changed (unless the host changed under
    it): the same actions, problems and counts as a plan from scratch."""
    memo, state, objects, h = desired.Memo(), {}, {}, HOST
    previous, touched = None, frozenset()
    for event in sequence:
        objects, changed_host = step(state, objects, h, event)
        if changed_host is not h:
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
                    d.reconciler.news.route(False, dataclasses.replace(
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
