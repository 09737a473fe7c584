"""Repairs: whatever happens to the shim, the parent, a route, dockerd or the network, the
daemon puts things back by itself. RESYNC_INTERVAL is left at its default (60 s), far
beyond the deadlines here, so only the event paths can pass these tests. The issue asks
for "within a second"; the deadlines are generous so a loaded CI machine does not flake,
and each test prints how long the repair took."""

import time

import pytest

from lab import LAN0, SHIM0, assert_no_traceback, wait_until

pytestmark = pytest.mark.integration

C4 = "198.51.100.130"
C4B = "198.51.100.131"
DEADLINE = 10


@pytest.fixture
def running(lab, engine):
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route via shim")
    lab.wait_ping(C4)
    yield d
    assert d.alive(), f"daemon died:\n{d.stderr}"
    assert_no_traceback(d.stderr)


def _repaired(lab, engine, what, t0):
    wait_until(lambda: lab.link(SHIM0) and lab.route_via(C4, SHIM0), timeout=DEADLINE,
               desc=f"shim and route back after {what}")
    print(f"{what}: route back after {time.monotonic() - t0:.3f}s")
    lab.wait_ping(C4)
    engine.wait_ping_from("c1", LAN0["host"])


def test_shim_deleted(lab, engine, running):
    t0 = time.monotonic()
    lab.ipc("link", "del", SHIM0)
    _repaired(lab, engine, "ip link del shim", t0)
    assert lab.link(SHIM0)["ifalias"] == "macvlan-router"
    assert lab.sysctl(f"net.ipv4.conf.{SHIM0}.arp_filter") == "1"


def test_parent_down_up(lab, engine, running):
    """The shim follows the parent's carrier; when it comes back everything works.
    (The kernel keeps the routes, marked linkdown; `ip link set dev lan0 down/up` is what
    a link flap or a NetworkManager rescan does.)"""
    lab.parent_down(C4)
    t0 = time.monotonic()
    lab.ipc("link", "set", "lan0", "up")
    _repaired(lab, engine, "parent down/up", t0)


def test_shim_down(lab, engine, running):
    t0 = time.monotonic()
    lab.ipc("link", "set", SHIM0, "down")
    wait_until(lambda: "UP" in lab.link(SHIM0)["flags"], timeout=DEADLINE,
               desc="shim up again")
    _repaired(lab, engine, "ip link set shim down", t0)


def test_route_deleted(lab, engine, running):
    t0 = time.monotonic()
    lab.ipc("route", "del", f"{C4}/32", "dev", SHIM0, "proto", "210")
    _repaired(lab, engine, "ip route del", t0)


def test_shim_address_deleted(lab, engine, running):
    t0 = time.monotonic()
    lab.ipc("addr", "del", f"{LAN0['host']}/32", "dev", SHIM0)
    wait_until(lambda: [a["local"] for a in lab.global_addrs(SHIM0, 4)] == [LAN0["host"]],
               timeout=DEADLINE, desc="shim address back")
    _repaired(lab, engine, "ip addr del on the shim", t0)


def test_dockerd_restarted(lab, engine, running):
    """dockerd goes away (its containers stop with it) and comes back with the same
    directories: the daemon survives, drops the dead container's route, reconnects and
    routes a new container."""
    d = running
    engine.stop()
    time.sleep(1)
    assert d.alive(), f"daemon died when dockerd stopped:\n{d.stderr}"
    engine.start()
    t0 = time.monotonic()
    engine.container("c2", "lan", ip=C4B)
    wait_until(lambda: lab.route_via(C4B, SHIM0), timeout=30,
               desc="route for a new container after dockerd restarted")
    print(f"dockerd restart: new route after {time.monotonic() - t0:.3f}s")
    lab.wait_ping(C4B)
    engine.wait_ping_from("c2", LAN0["host"])
    # c1 died with dockerd and stays stopped: its route must go
    wait_until(lambda: lab.route(C4) is None, timeout=DEADLINE,
               desc="stale route of the container that died with dockerd")


def test_network_removed_and_created_again(lab, engine, running):
    engine.cli("rm", "-f", "c1")
    engine.cli("network", "rm", "lan")
    wait_until(lambda: lab.route(C4) is None, timeout=DEADLINE, desc="route gone")
    engine.network("lan")
    t0 = time.monotonic()
    engine.container("c1", "lan", ip=C4)
    _repaired(lab, engine, "network removed and created again", t0)


def test_parent_down_up_ipv6(lab, engine):
    c6 = "2001:db8:1::1:10"
    engine.network("lan", v6=True)
    engine.container("c1", "lan", ip=C4, ip6=c6)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(c6, SHIM0), desc="IPv6 route via shim")
    lab.wait_ping(c6, timeout=15)
    lab.ipc("link", "set", "lan0", "down")
    time.sleep(0.5)
    lab.ipc("link", "set", "lan0", "up")
    wait_until(lambda: lab.route_via(c6, SHIM0) and lab.route_via(C4, SHIM0),
               timeout=DEADLINE, desc="routes after parent down/up")
    lab.wait_ping(c6, timeout=15)
    lab.wait_ping(C4)
    shim6 = [a["local"] for a in lab.global_addrs(SHIM0, 6)]
    assert shim6, "the shim lost its IPv6 address"
    engine.wait_ping_from("c1", shim6[0], timeout=15)
    assert d.alive()
    assert_no_traceback(d.stderr)
