"""Event-driven behaviour, network selection and the routes the daemon adds or keeps."""

import subprocess
import time

import pytest

from lab import (LAN0, SHIM0, SHIM1, assert_no_traceback, holds_for, run, wait_until)

pytestmark = pytest.mark.integration

C4 = "198.51.100.130"
C4B = "198.51.100.131"
C4C = "198.51.100.132"
D4 = "203.0.113.130"


def test_container_started_later_gets_route_stopped_loses_it(lab, engine):
    engine.network("lan")
    # RESYNC_INTERVAL at its maximum: only events can explain what follows
    d = lab.daemon({"RESYNC_INTERVAL": "86400"})
    engine.container("c1", "lan", ip=C4)
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route for a container started later")
    lab.wait_ping(C4)

    engine.cli("stop", "-t", "5", "c1")
    wait_until(lambda: lab.route(C4) is None, desc="route gone after docker stop")

    engine.cli("start", "c1")
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route back after docker start")
    lab.wait_ping(C4)

    engine.cli("network", "disconnect", "lan", "c1")
    wait_until(lambda: lab.route(C4) is None, desc="route gone after network disconnect")
    engine.cli("network", "connect", "--ip", C4B, "lan", "c1")
    wait_until(lambda: lab.route_via(C4B, SHIM0), desc="route after network connect")
    lab.wait_ping(C4B)

    engine.cli("rm", "-f", "c1")
    wait_until(lambda: lab.route(C4B) is None, desc="route gone after docker rm -f")
    assert d.alive()
    assert_no_traceback(d.stderr)


def test_network_created_after_start(lab, engine):
    """Unset MACVLAN_DOCKER_NETWORK means every macvlan network, including later ones."""
    d = lab.daemon({"RESYNC_INTERVAL": "86400"})
    assert lab.macvlan_links() == []
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route on a network created later")
    lab.wait_ping(C4)
    engine.wait_ping_from("c1", LAN0["host"])
    assert_no_traceback(d.stderr)


def test_routes_that_should_stay_are_never_removed(lab, engine):
    """The seed deletes and re-adds every route on every cycle; we never remove a route
    that should stay, whatever happens around it (resyncs every second, other containers
    coming and going)."""
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    engine.container("c2", "lan", ip=C4B)
    lab.daemon({"RESYNC_INTERVAL": "1"})
    wait_until(lambda: lab.route_via(C4, SHIM0) and lab.route_via(C4B, SHIM0),
               desc="two routes")
    mon = subprocess.Popen(["ip", "-n", lab.T, "monitor", "route"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.3)  # let the monitor subscribe
        engine.container("c3", "lan", ip=C4C)
        wait_until(lambda: lab.route_via(C4C, SHIM0), desc="third route")
        engine.cli("rm", "-f", "c3")
        wait_until(lambda: lab.route(C4C) is None, desc="third route gone")
        holds_for(lambda: lab.route_via(C4, SHIM0) and lab.route_via(C4B, SHIM0),
                  duration=2.5, desc="routes of running containers")
    finally:
        mon.terminate()
        out, _ = mon.communicate(timeout=10)
    deleted = [ln for ln in out.splitlines() if ln.startswith("Deleted")
               and (f"{C4} " in ln or f"{C4B} " in ln)]
    assert not deleted, "routes that should stay were deleted:\n" + "\n".join(deleted)
    assert f"{C4C} " in out, f"the monitor saw nothing; the check above proves nothing:\n{out}"


def test_additional_routes(lab, engine):
    """ADDITIONAL_ROUTES go via the shim, prefixes kept as written; proven by pinging a
    VIP that a container holds."""
    engine.network("lan")
    engine.container("c1", "lan", ip=C4, cap_add=["NET_ADMIN"])
    rc, out = engine.exec("c1", "ip", "addr", "add", "198.51.100.225/32", "dev", "eth0")
    assert rc == 0, out
    rc, out = engine.exec("c1", "ip", "addr", "add", "203.0.113.200/32", "dev", "eth0")
    assert rc == 0, out
    assert not lab.ping("198.51.100.225")
    lab.daemon({"ADDITIONAL_ROUTES": "198.51.100.224/28 203.0.113.200"})
    wait_until(lambda: lab.route_via("198.51.100.224/28", SHIM0)
               and lab.route_via("203.0.113.200", SHIM0), desc="additional routes")
    assert lab.route("198.51.100.225") is None, "the prefix must be kept as written"
    lab.wait_ping("198.51.100.225")
    lab.wait_ping("203.0.113.200")
    lab.wait_ping(C4)


def test_compose_prefixed_network_name(lab, engine):
    engine.network("proj_lan", labels={"com.docker.compose.network": "lan",
                                       "com.docker.compose.project": "proj"})
    engine.container("c1", "proj_lan", ip=C4)
    d = lab.daemon({"MACVLAN_DOCKER_NETWORK": "lan"})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route for a Compose network")
    lab.wait_ping(C4)
    assert_no_traceback(d.stderr)


def test_config_only_network(lab, engine):
    engine.network("cfg", parent="lan1", config_only=True)
    engine.network("net", config_from="cfg")
    engine.container("c1", "net", ip=D4)
    d = lab.daemon({"MACVLAN_DOCKER_NETWORK": "net"})
    wait_until(lambda: lab.route_via(D4, SHIM1), desc="route for a --config-from network")
    assert lab.link(SHIM1)["link"] == "lan1"
    lab.wait_ping(D4)
    engine.wait_ping_from("c1", "203.0.113.2")
    assert_no_traceback(d.stderr)


@pytest.mark.parametrize("how", ["name", "id", "label", "label-value"])
def test_network_selection(lab, engine, how):
    """Only the selected network is managed: its container gets a route, the other's not."""
    engine.network("net0", parent="lan0", labels={"mvr.route": "yes"})
    engine.network("net1", parent="lan1", labels={"mvr.route": "no"})
    engine.container("c0", "net0", ip=C4)
    engine.container("c1", "net1", ip=D4)
    selector = {"name": "net0",
                "id": engine.client.networks.get("net0").id,
                "label": "label=mvr.route=yes",
                "label-value": "label=mvr.route=yes"}[how]
    if how == "label":
        # label=KEY alone matches both networks: select on a key only net0 has
        engine.cli("rm", "-f", "c1")
        engine.cli("network", "rm", "net1")
        engine.network("net1", parent="lan1")
        engine.container("c1", "net1", ip=D4)
        selector = "label=mvr.route"
    lab.daemon({"MACVLAN_DOCKER_NETWORK": selector, "RESYNC_INTERVAL": "1"})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route on the selected network")
    holds_for(lambda: lab.route(D4) is None and lab.link(SHIM1) is None, duration=2,
              desc="nothing for the network that was not selected")


def test_an_address_back_with_another_mac_is_reached_at_once(lab, engine):
    """A container's address comes back on another MAC (recreated with a pinned MAC, or by
    another engine): the host's neighbour entry for it on the shim still names the old MAC
    and would black-hole the host's packets until the kernel probes again; the daemon
    deletes it once the new route is in place."""
    old_mac, new_mac = "02:00:5e:00:53:01", "02:00:5e:00:53:02"
    engine.network("lan")
    d = lab.daemon({"RESYNC_INTERVAL": "86400"})

    def entry():
        out = run(["ip", "-n", lab.T, "neigh", "show", C4, "dev", SHIM0]).stdout
        return out.split("lladdr")[1].split()[0] if "lladdr" in out else None

    engine.container("c1", "lan", ip=C4, extra=["--mac-address", old_mac])
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route for the first container")
    lab.wait_ping(C4)
    assert entry() == old_mac, "the host has no entry for the first container's MAC"
    engine.cli("rm", "-f", "c1")
    wait_until(lambda: lab.route(C4) is None, desc="route gone with the first container")
    assert entry() == old_mac, "the kernel dropped the entry itself: this proves nothing"

    engine.container("c2", "lan", ip=C4, extra=["--mac-address", new_mac])
    wait_until(lambda: lab.route_via(C4, SHIM0) and entry() != old_mac,
               desc="route for the second container, and the old MAC's entry gone")
    assert lab.ping(C4), "the host cannot reach the container at its new MAC"
    assert entry() == new_mac
    assert f"ip neigh del {C4} dev {SHIM0}" in d.stderr
    assert_no_traceback(d.stderr)


def test_routes_stay_while_the_host_s_address_leaves_the_parent_and_moves(lab, engine):
    """NetworkManager takes the host's address off the parent while it reconnects it
    (measured in a Debian 13 VM): the shim keeps its copy, so no route goes; a new host
    address moves the routes to it before the old one is deleted (the kernel deletes the
    routes whose source goes)."""
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    lab.daemon({"RESYNC_INTERVAL": "86400"})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route for the container")
    host_address = f"{LAN0['host']}/24"
    mon = subprocess.Popen(["ip", "-n", lab.T, "monitor", "route"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.3)  # let the monitor subscribe
        run(["ip", "-n", lab.T, "addr", "del", host_address, "dev", "lan0"])
        holds_for(lambda: lab.route_via(C4, SHIM0), duration=2, desc="route, host address gone")
        run(["ip", "-n", lab.T, "addr", "add", host_address, "dev", "lan0"])
        lab.wait_ping(C4)
        run(["ip", "-n", lab.T, "addr", "del", host_address, "dev", "lan0"])
        run(["ip", "-n", lab.T, "addr", "add", "198.51.100.7/24", "dev", "lan0"])
        wait_until(lambda: (lab.route(C4) or {}).get("prefsrc") == "198.51.100.7",
                   desc="the route's source moved to the host's new address")
        lab.wait_ping(C4)
    finally:
        mon.terminate()
        out, _ = mon.communicate(timeout=10)
    deleted = [ln for ln in out.splitlines() if ln.startswith("Deleted") and f"{C4} " in ln]
    assert not deleted, "the container's route went:\n" + "\n".join(deleted)
    assert "198.51.100.7" in out, f"the monitor saw nothing; this proves nothing:\n{out}"
