"""The daemon's loop and the reconciler, with fake edges: a Docker that can fail, a model
kernel (factories.apply_model), a clock that moves only when the loop waits."""

import dataclasses
import queue

from macvlan_router import daemon as daemon_mod
from macvlan_router.config import Config, Selector
from macvlan_router.docker_source import CONTAINER_CHANGED, REFRESH_ALL, Listing
from macvlan_router.errors import EX_CONFIG, EX_OK, DockerUnavailable
from macvlan_router.model import Address
from macvlan_router.notify import Watchdog
from macvlan_router.reconcile import Reconciler

from .factories import apply_model, endpoint, host, iface, network, route

C1, C2 = "198.51.100.130", "198.51.100.131"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Triggers:
    """A trigger queue whose blocking get() lets the fake clock run to its timeout."""

    def __init__(self, clock):
        self.clock, self.items = clock, []

    def put(self, item):
        self.items.append(item)

    def empty(self):
        return not self.items

    def get(self, timeout):
        if self.items:
            return self.items.pop(0)
        self.clock.now += timeout
        raise queue.Empty

    def get_nowait(self):
        return self.get(0)


class FakeDocker:
    network_events = True
    engine = "Docker"

    def __init__(self, *networks):
        self.networks = {n.id: n for n in networks}
        self.failing = {}      # "list" or a network id -> how many more calls fail
        self.calls = 0

    def _maybe_fail(self, key):
        self.calls += 1
        if self.failing.get(key, 0):
            self.failing[key] -= 1
            raise DockerUnavailable(f"Docker answered 500 for {key}")

    def list_networks(self):
        self._maybe_fail("list")
        return Listing(tuple(dataclasses.replace(n, endpoints=()) for n in self.networks.values()))

    def inspect(self, network_id):
        self._maybe_fail(network_id)
        return self.networks.get(network_id), ()


class FakeNetlink:
    own = None

    def __init__(self, h):
        self.host, self.applied = h, []

    def read(self):
        return self.host

    def neighbours(self, _links):
        return self.host.neighbours

    def apply(self, actions, _host, _why):
        self.host = apply_model(self.host, actions)
        self.applied.extend(actions)
        return 0


class Notifier:
    watchdog_interval = None

    def __init__(self):
        self.sent = []

    def ready(self, status):
        self.sent.append(("READY", status))

    def status(self, status):
        self.sent.append(("STATUS", status))

    def reloading(self):
        self.sent.append(("RELOADING", ""))

    def stopping(self):
        self.sent.append(("STOPPING", ""))


class Idle:
    def start(self):
        pass

    def stop(self):
        pass


def make(docker, h=None, config=Config()):
    clock = Clock()
    netlink = FakeNetlink(h or host())
    triggers = Triggers(clock)
    d = daemon_mod.Daemon("/etc/default/macvlan-router", lambda: config,
                          Reconciler(config, docker, netlink),
                          Notifier(), Watchdog(Notifier(), clock), triggers, Idle(), Idle(),
                          "unix:///run/docker.sock", clock=clock)
    return d, netlink, clock


def connected(d):
    d.triggers.put((daemon_mod.DOCKER, REFRESH_ALL))


def owned(netlink):
    return {str(r.dst) for r in netlink.host.routes if r.owned}


def leftovers():
    """A host as an earlier run left it: shim up with its address, one route."""
    h = host(shims=(("mvr-eth0", "eth0"),),
             routes=(route(f"{C1}/32", "mvr-eth0", "198.51.100.2"),))
    return dataclasses.replace(h, addresses=h.addresses + (
        Address("mvr-eth0", iface("198.51.100.2/32")),))


def lan(*names_and_ips):
    return network("lan", endpoints=[endpoint(n, a) for n, a in names_and_ips])


def test_a_fresh_start_routes_and_says_ready():
    d, netlink, _ = make(FakeDocker(lan(("web", C1))))
    connected(d)
    assert d.step() is None
    assert owned(netlink) == {f"{C1}/32"}
    assert d.notifier.sent[0][0] == "READY" and "1 route" in d.notifier.sent[0][1]


def test_start_over_leftovers_with_a_failing_read_changes_nothing():
    docker = FakeDocker(lan(("web", C1)))
    docker.failing[next(iter(docker.networks))] = 3
    d, netlink, clock = make(docker, leftovers())
    connected(d)
    d.step()
    assert netlink.applied == [], "nothing may change before Docker's view is complete"
    kind, status = d.notifier.sent[-1]
    assert kind == "READY" and "answers badly" in status and "0 routes" not in status
    for _ in range(10):
        d.step()
    assert docker.failing[next(iter(docker.networks))] == 0
    assert owned(netlink) == {f"{C1}/32"} and netlink.applied == [], "adopted as it was"
    assert d.phase is daemon_mod.SERVING


def connect_while_the_read_fails():
    """A daemon serving `web`; then `new` connects and the next read of its network fails."""
    docker = FakeDocker(lan(("web", C1)))
    d, netlink, clock = make(docker)
    connected(d)
    d.step()
    net_id = next(iter(docker.networks))
    docker.networks[net_id] = lan(("web", C1), ("new", C2))
    docker.failing[net_id] = 1
    d.triggers.put((daemon_mod.DOCKER, net_id))
    return d, netlink, clock


def test_a_failed_refresh_is_retried_without_any_other_event():
    d, netlink, clock = connect_while_the_read_fails()
    start = clock.now
    d.step()
    assert f"{C2}/32" not in owned(netlink)
    d.step()   # no trigger: the loop waits until the retry is due
    assert f"{C2}/32" in owned(netlink)
    assert clock.now - start <= 1.5, "retried within about a second"


def test_a_host_repair_does_not_cancel_the_docker_retry():
    d, netlink, _ = connect_while_the_read_fails()
    d.step()
    d.triggers.put((daemon_mod.HOST, None))
    d.step()
    assert d.docker_retry.due is not None, "only a Docker read that answered resets it"
    d.step()
    assert f"{C2}/32" in owned(netlink)


def test_the_retry_backs_off_to_a_few_seconds_while_the_engine_fails():
    docker = FakeDocker(lan(("web", C1)))
    docker.failing["list"] = 100
    d, _, clock = make(docker)
    connected(d)
    times = []
    for _ in range(8):
        d.step()
        times.append(clock.now)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) <= 4.0 and gaps[0] <= 1.0


def test_a_configuration_error_stops_on_a_complete_view_before_any_change():
    d, netlink, _ = make(FakeDocker(lan(("web", C1))), leftovers(),
                         Config(networks=(Selector("nope"),)))
    connected(d)
    assert d.step() == EX_CONFIG
    assert netlink.applied == []


def test_no_judgement_on_an_incomplete_list():
    docker = FakeDocker(lan(("web", C1)))
    docker.failing["list"] = 1
    d, netlink, _ = make(docker, config=Config(networks=(Selector("lan"),)))
    connected(d)
    assert d.step() is None
    assert d.step() is None and owned(netlink) == {f"{C1}/32"}


def test_the_same_address_on_two_networks_is_docker_s_doing_not_a_stop():
    other = network("other", parent="eth1", endpoints=[endpoint("twin", C1)])
    d, netlink, _ = make(FakeDocker(lan(("web", C1)), other), host(links=("eth0", "eth1")))
    connected(d)
    assert d.step() is None
    assert owned(netlink) == {f"{C1}/32"}


def test_docker_lost_keeps_routes_and_says_so():
    d, netlink, _ = make(FakeDocker(lan(("web", C1))))
    connected(d)
    d.step()
    d.triggers.put((daemon_mod.LOST, "lost the event stream"))
    d.step()
    assert owned(netlink) == {f"{C1}/32"}
    assert d.notifier.sent[-1] == ("STATUS", "waiting for Docker at unix:///run/docker.sock")


def test_a_container_gone_loses_its_route_once_read():
    docker = FakeDocker(lan(("web", C1), ("old", C2)))
    d, netlink, _ = make(docker)
    connected(d)
    d.step()
    net_id = next(iter(docker.networks))
    docker.networks[net_id] = lan(("web", C1))
    d.triggers.put((daemon_mod.DOCKER, net_id))
    d.step()
    assert owned(netlink) == {f"{C1}/32"}


def test_the_watchdog_lease_runs_out_only_when_not_renewed():
    clock = Clock()
    watchdog = Watchdog(Notifier(), clock)
    watchdog.renew(5)
    clock.now += 4
    assert watchdog.alive()
    clock.now += 2
    assert not watchdog.alive()


def test_stop_ends_the_loop():
    d, netlink, _ = make(FakeDocker(lan(("web", C1))))
    connected(d)
    d.step()
    d.triggers.put((daemon_mod.STOP, None))
    assert d.step() == EX_OK


def test_an_unreadable_list_record_does_not_block_the_start():
    """Docker keeps sending a record without a Name: serve the rest, delete nothing, and
    do not judge the configuration (the record could be the network it names)."""
    docker = FakeDocker(lan(("web", C1)))
    listing = docker.list_networks
    docker.list_networks = lambda: Listing(listing().networks, (), 1)
    d, netlink, _ = make(docker, leftovers_plus(f"{C2}/32"),
                         Config(networks=(Selector("lan"), Selector("gone"))))
    connected(d)
    assert d.step() is None
    assert owned(netlink) == {f"{C1}/32", f"{C2}/32"}, "added what it knows, deleted nothing"
    assert d.notifier.sent[0][0] == "READY"


def leftovers_plus(dst):
    h = leftovers()
    return dataclasses.replace(h, routes=h.routes + (route(dst, "mvr-eth0", "198.51.100.2"),))


def test_a_container_start_or_die_costs_no_docker_call_on_docker():
    docker = FakeDocker(lan(("web", C1)))
    d, netlink, _ = make(docker)
    connected(d)
    d.step()
    calls, applied = docker.calls, len(netlink.applied)
    d.triggers.put((daemon_mod.DOCKER, CONTAINER_CHANGED))
    d.step()
    assert docker.calls == calls and len(netlink.applied) == applied


def test_an_engine_without_network_events_reads_the_networks_on_a_container_event():
    docker = FakeDocker(lan(("web", C1)))
    docker.network_events = False
    d, netlink, _ = make(docker)
    connected(d)
    d.step()
    net_id = next(iter(docker.networks))
    docker.networks[net_id] = lan(("web", C1), ("new", C2))
    d.triggers.put((daemon_mod.DOCKER, CONTAINER_CHANGED))
    d.step()
    assert owned(netlink) == {f"{C1}/32", f"{C2}/32"}
