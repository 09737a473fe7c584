"""Start, stop, adopt, clean up, reload; ownership of routes and links; sd_notify."""

import signal
import time

import pytest

from lab import (LAN0, SHIM0, assert_no_traceback, holds_for, shim_addr, wait_until,
                 write_config)

pytestmark = pytest.mark.integration

C4 = "198.51.100.130"
C4B = "198.51.100.131"
C6 = "2001:db8:1::1:10"


def _baseline_intact(lab):
    """The parent keeps its addresses and routes."""
    assert [a["local"] for a in lab.global_addrs("lan0", 4)] == [LAN0["host"]]
    assert lab.route(LAN0["subnet"])["dev"] == "lan0"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_teardown_on_signal(lab, engine, sig):
    engine.network("lan", v6=True)
    engine.container("c1", "lan", ip=C4, ip6=C6)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0) and lab.route_via(C6, SHIM0), desc="routes")
    rc = d.stop(sig=sig)
    assert rc == 0, d.stderr
    assert "STOPPING=1" in d.notified(), d.notified()
    assert lab.link(SHIM0) is None, "shim left behind"
    assert lab.owned_routes() == [], lab.owned_routes()
    _baseline_intact(lab)
    assert_no_traceback(d.stderr)


def test_no_cleanup_on_exit_then_cleanup_command(lab, engine):
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    d = lab.daemon({"CLEANUP_ON_EXIT": "false"})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route")
    assert d.stop() == 0
    assert lab.link(SHIM0) is not None and lab.route_via(C4, SHIM0), \
        "CLEANUP_ON_EXIT=false must leave the shim and routes"
    rc, out, err = lab.mvr("cleanup", config={})
    assert rc == 0, (out, err)
    assert lab.link(SHIM0) is None
    assert lab.owned_routes() == []
    _baseline_intact(lab)
    # idempotent
    rc, out, err = lab.mvr("cleanup", config={})
    assert rc == 0, (out, err)
    assert_no_traceback(err)


def test_adoption_after_sigkill(lab, engine):
    engine.network("lan", v6=True)
    engine.container("c1", "lan", ip=C4, ip6=C6)
    engine.container("c2", "lan", ip=C4B)
    d1 = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0) and lab.route_via(C6, SHIM0)
               and lab.route_via(C4B, SHIM0), desc="routes")
    shim6 = shim_addr(lab, SHIM0, 6)["local"]
    d1.kill()
    assert lab.link(SHIM0) is not None, "SIGKILL cannot clean up: leftovers expected"
    shim_index = lab.link(SHIM0)["ifindex"]
    # while no daemon runs, c2 goes away: its route is now stale
    engine.cli("rm", "-f", "c2")

    d2 = lab.daemon({})
    assert d2.alive()
    wait_until(lambda: lab.route(C4B) is None, desc="stale route removed on adoption")
    assert lab.route_via(C4, SHIM0) and lab.route_via(C6, SHIM0)
    assert [ln["ifname"] for ln in lab.macvlan_links()] == [SHIM0]
    assert lab.link(SHIM0)["ifindex"] == shim_index, "the shim should be adopted, not rebuilt"
    assert shim_addr(lab, SHIM0, 6)["local"] == shim6
    lab.wait_ping(C4)
    lab.wait_ping(C6, timeout=15)
    engine.wait_ping_from("c1", LAN0["host"])
    engine.container("c3", "lan", ip="198.51.100.132")
    wait_until(lambda: lab.route_via("198.51.100.132", SHIM0), desc="new route after adoption")
    err = d2.stderr
    assert_no_traceback(err)
    for bad in ("File exists", "EEXIST", "cannot "):
        assert bad not in err, f"{bad!r} in the log of a daemon adopting leftovers:\n{err}"


def test_foreign_routes_on_the_shim_left_alone(lab, engine):
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    d = lab.daemon({"RESYNC_INTERVAL": "1"})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route")
    # someone else's routes on our shim: outside and inside the managed subnet
    lab.ipc("route", "add", "203.0.113.77/32", "dev", SHIM0)
    lab.ipc("route", "add", "198.51.100.200/32", "dev", SHIM0, "proto", "static")

    def foreign_there():
        a, b = lab.route("203.0.113.77"), lab.route("198.51.100.200")
        # ip -j leaves out "protocol" for proto boot (3), the default of `ip route add`
        return (a and a["dev"] == SHIM0 and a.get("protocol", "3") in ("3", "boot")
                and b and b["dev"] == SHIM0 and b.get("protocol") in ("4", "static"))

    # make it reconcile: events, a repair, and resyncs every second
    engine.container("c2", "lan", ip=C4B)
    wait_until(lambda: lab.route_via(C4B, SHIM0), desc="route for c2")
    lab.ipc("route", "del", f"{C4}/32", "dev", SHIM0, "proto", "210")
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route repaired")
    engine.cli("rm", "-f", "c2")
    wait_until(lambda: lab.route(C4B) is None, desc="route for c2 gone")
    holds_for(foreign_there, duration=2.5, desc="foreign routes on the shim")
    assert d.alive()
    assert_no_traceback(d.stderr)


def test_cleanup_removes_only_what_it_owns(lab, engine):
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route")
    d.kill()
    # foreign things: a route on the parent, a macvlan link of someone else with a route
    lab.ipc("route", "add", "203.0.113.78/32", "dev", "lan0")
    lab.ipc("link", "add", "other0", "link", "lan0", "type", "macvlan", "mode", "bridge")
    lab.ipc("link", "set", "other0", "up")
    lab.ipc("route", "add", "203.0.113.79/32", "dev", "other0")
    rc, out, err = lab.mvr("cleanup", config={})
    assert rc == 0, (out, err)
    assert lab.link(SHIM0) is None
    assert lab.owned_routes() == []
    assert lab.link("other0") is not None, "cleanup removed a link it does not own"
    assert lab.route("203.0.113.78")["dev"] == "lan0"
    assert lab.route("203.0.113.79")["dev"] == "other0"
    _baseline_intact(lab)
    assert_no_traceback(err)


def test_daemon_leaves_foreign_macvlan_link(lab, engine):
    """A macvlan link on the same parent that is not ours is never touched or adopted."""
    lab.ipc("link", "add", "other0", "link", "lan0", "type", "macvlan", "mode", "bridge")
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route")
    assert d.stop() == 0
    assert lab.link("other0") is not None


def test_sighup_reload(lab, engine):
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route")
    write_config(d.config, {"ADDITIONAL_ROUTES": "198.51.100.224/28"})
    d.send_signal(signal.SIGHUP)
    d.wait_notify("RELOADING=1")
    wait_until(lambda: d.count("READY=1") >= 2, desc="READY=1 after reload")
    wait_until(lambda: lab.route_via("198.51.100.224/28", SHIM0), desc="route after reload")

    # an invalid config on reload: logged, old one kept, daemon alive
    write_config(d.config, {"MACVLAN_BRIDGE_IP": "198.51.100.300"})
    d.send_signal(signal.SIGHUP)
    wait_until(lambda: d.count("RELOADING=1") >= 2, desc="second RELOADING=1")
    wait_until(lambda: "198.51.100.300" in d.stderr, desc="the bad value in the log")
    holds_for(lambda: d.alive() and lab.route_via(C4, SHIM0)
              and lab.route_via("198.51.100.224/28", SHIM0), duration=2,
              desc="daemon alive with the old configuration")
    assert_no_traceback(d.stderr)


def test_watchdog(lab, engine):
    d = lab.daemon({}, env={"WATCHDOG_USEC": "1000000"})
    wait_until(lambda: d.count("WATCHDOG=1") >= 3, timeout=10, desc="3 WATCHDOG=1 pings")


def test_docker_unreachable(lab, engine):
    """`check` exits 69; `run` waits (alive, READY=1, STATUS says so) and works once
    dockerd is there."""
    rc, out, err = lab.mvr("check", config={}, docker_host=f"unix://{lab.dir}/nothing.sock")
    assert rc == 69, (rc, out, err)
    assert "docker" in (out + err).lower()
    assert_no_traceback(err)

    engine.stop()
    d = lab.daemon({}, ready=False)
    d.wait_notify(lambda m: m.startswith("STATUS=") and "waiting for docker" in m.lower(),
                  desc="STATUS=waiting for Docker")
    d.wait_ready()
    holds_for(d.alive, duration=3, desc="daemon alive while Docker is unreachable")
    engine.start()
    engine.network("lan")
    t0 = time.monotonic()
    engine.container("c1", "lan", ip=C4)
    wait_until(lambda: lab.route_via(C4, SHIM0), timeout=60,
               desc="route once dockerd is up")
    print(f"route {time.monotonic() - t0:.2f}s after the container started")
    lab.wait_ping(C4)
    assert_no_traceback(d.stderr)


def test_ex_noperm_without_cap_net_admin(lab, engine):
    """Without CAP_NET_ADMIN the daemon says so and exits 77."""
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    wrap = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--"]
    d = lab.daemon({}, start=True, ready=False, wrap=wrap)
    rc = d.wait_exit(timeout=30)
    assert rc == 77, (rc, d.stderr)
    assert "CAP_NET_ADMIN" in d.stderr or "permission" in d.stderr.lower(), d.stderr
    assert_no_traceback(d.stderr)
    assert lab.link(SHIM0) is None
