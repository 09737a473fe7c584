"""The point of the daemon: the host reaches its macvlan containers and they reach it,
proven by pinging through the shim in a namespace with a real dockerd."""

import ipaddress
import json
import re

import pytest

from lab import (LAN0, LAN1, PROTO_NAMES, SHIM0, SHIM1, assert_no_traceback, run,
                 shim_addr, wait_until)

pytestmark = pytest.mark.integration

C4 = "198.51.100.130"
C6 = "2001:db8:1::1:10"
D4 = "203.0.113.130"


def test_lab_control_no_reach_without_daemon(lab, engine):
    """Control: without the daemon the host cannot reach a macvlan container (while the
    LAN peer can), so the reachability tests below can fail."""
    engine.network("lan", v6=True)
    engine.container("c1", "lan", ip=C4, ip6=C6)
    lab.wait_ping(C4, ns=lab.P)
    lab.wait_ping(C6, ns=lab.P)
    assert not lab.ping(C4)
    assert not lab.ping(C6)
    assert not engine.ping_from("c1", LAN0["host"])


def test_zero_config_ipv4_both_ways(lab, engine):
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    d = lab.daemon({})

    wait_until(lambda: lab.route_via(C4, SHIM0), desc=f"route {C4} via {SHIM0}")
    lab.wait_ping(C4)
    engine.wait_ping_from("c1", LAN0["host"])

    # the shim: a bridge-mode macvlan child of lan0 marked as ours
    shim = lab.link(SHIM0)
    info = shim["linkinfo"]
    assert info["info_kind"] == "macvlan"
    assert info["info_data"]["mode"] == "bridge"
    assert shim.get("link") == "lan0"
    assert shim.get("ifalias") == "macvlan-router"
    assert lab.sysctl(f"net.ipv4.conf.{SHIM0}.arp_filter") == "1"

    # zero-config IPv4: the host's own parent address, /32, no prefix route
    addrs = lab.global_addrs(SHIM0, 4)
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [(LAN0["host"], 32)], addrs
    assert "noprefixroute" in addrs[0]["flags"], addrs
    assert not [r for r in lab.routes(4) if r.get("dev") == SHIM0 and "/" in r["dst"]], \
        "a prefix route appeared on the shim"

    # the route: /32, our protocol, scope link, the shim's address as source
    r = lab.route_via(C4, SHIM0)
    assert r["scope"] in ("253", "link"), r
    assert r.get("prefsrc") == LAN0["host"], r
    # the parent is untouched
    assert [a["local"] for a in lab.global_addrs("lan0", 4)] == [LAN0["host"]]
    assert lab.route(LAN0["subnet"])["dev"] == "lan0"

    # every change is logged like the ip command it equals
    log = d.stderr
    assert re.search(rf"ip link add {SHIM0} link lan0 .*type macvlan", log), log
    assert re.search(rf"ip route \w+ {re.escape(C4)}(/32)? dev {SHIM0}", log), log
    assert_no_traceback(log, "daemon stderr")

    rc, out, err = lab.mvr("check", config={})
    assert rc == 0, (out, err)


def test_lan_peer_sees_host_address_only_at_parent_mac(lab, engine):
    """The shim reuses the host's IPv4 address; arp_filter keeps a LAN peer from learning
    it at the shim's MAC (no ARP flux), and the LAN still reaches the container."""
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)
    lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route via shim")
    lan0_mac = lab.link("lan0")["address"].lower()
    shim_mac = lab.link(SHIM0)["address"].lower()
    assert lan0_mac != shim_mac
    p = run(["/bin/busybox", "arping", "-c", "3", "-w", "3", "-I", "peer0", LAN0["host"]],
            netns=lab.P, check=False, timeout=20)
    macs = {m.lower() for m in re.findall(r"\[([0-9A-Fa-f:]{17})\]", p.stdout)}
    assert macs == {lan0_mac}, f"ARP replies for {LAN0['host']}: {p.stdout}"
    lab.wait_ping(C4, ns=lab.P)
    lab.wait_ping(LAN0["host"], ns=lab.P)


def test_ipv6_both_ways(lab, engine):
    engine.network("lan", v6=True)
    engine.container("c1", "lan", ip=C4, ip6=C6)
    d = lab.daemon({})

    wait_until(lambda: lab.route_via(C6, SHIM0), desc=f"route {C6} via {SHIM0}")
    a = shim_addr(lab, SHIM0, 6)
    shim6 = a["local"]
    assert ipaddress.ip_address(shim6) in ipaddress.ip_network(LAN0["subnet6"])
    assert shim6 != LAN0["host6"], "the shim must not reuse the host's IPv6 address"
    assert a["prefixlen"] == 128 and "noprefixroute" in a["flags"], a
    assert not [r for r in lab.routes(6) if r.get("dev") == SHIM0
                and r["dst"] == LAN0["subnet6"]], "a prefix route appeared on the shim"
    r = lab.route_via(C6, SHIM0)
    assert r.get("prefsrc") == shim6, r

    lab.wait_ping(C6, timeout=15)
    engine.wait_ping_from("c1", shim6, timeout=15)
    # IPv4 works at the same time
    lab.wait_ping(C4)
    engine.wait_ping_from("c1", LAN0["host"])
    # the generated address is stable: status reports it, a restart gives the same one
    d.stop()
    d2 = lab.daemon({})
    wait_until(lambda: lab.route_via(C6, SHIM0), desc="route after restart")
    assert shim_addr(lab, SHIM0, 6)["local"] == shim6
    assert_no_traceback(d2.stderr)


def test_explicit_bridge_ips(lab, engine):
    shim4, shim6 = "198.51.100.10", "2001:db8:1::10"
    engine.network("lan", v6=True, extra=["--aux-address", f"shim={shim4}",
                                          "--aux-address", f"shim6={shim6}"])
    engine.container("c1", "lan", ip=C4, ip6=C6)
    lab.daemon({"MACVLAN_BRIDGE_IP": shim4, "MACVLAN_BRIDGE_IP6": shim6})
    wait_until(lambda: lab.route_via(C4, SHIM0) and lab.route_via(C6, SHIM0),
               desc="routes via shim")
    assert [a["local"] for a in lab.global_addrs(SHIM0, 4)] == [shim4]
    assert shim_addr(lab, SHIM0, 6)["local"] == shim6
    assert lab.route_via(C4, SHIM0).get("prefsrc") == shim4
    assert lab.route_via(C6, SHIM0).get("prefsrc") == shim6
    lab.wait_ping(C4)
    lab.wait_ping(C6, timeout=15)
    engine.wait_ping_from("c1", shim4)
    engine.wait_ping_from("c1", shim6, timeout=15)


def test_two_networks_on_two_parents(lab, engine):
    engine.network("net0", parent="lan0")
    engine.network("net1", parent="lan1", v6=True)
    engine.container("c0", "net0", ip=C4)
    engine.container("c1", "net1", ip=D4, ip6="2001:db8:2::1:10")
    d = lab.daemon({"MACVLAN_DOCKER_NETWORK": "net0 net1"})
    wait_until(lambda: lab.route_via(C4, SHIM0) and lab.route_via(D4, SHIM1)
               and lab.route_via("2001:db8:2::1:10", SHIM1), desc="routes via both shims")
    assert lab.link(SHIM0)["link"] == "lan0"
    assert lab.link(SHIM1)["link"] == "lan1"
    assert [a["local"] for a in lab.global_addrs(SHIM1, 4)] == [LAN1["host"]]
    lab.wait_ping(C4)
    lab.wait_ping(D4)
    lab.wait_ping("2001:db8:2::1:10", timeout=15)
    engine.wait_ping_from("c0", LAN0["host"])
    engine.wait_ping_from("c1", LAN1["host"])
    engine.wait_ping_from("c1", shim_addr(lab, SHIM1, 6)["local"], timeout=15)
    # exactly one shim per parent, nothing crossed
    assert {ln["ifname"] for ln in lab.macvlan_links()} == {SHIM0, SHIM1}
    assert lab.route(C4)["dev"] == SHIM0 and lab.route(D4)["dev"] == SHIM1
    assert_no_traceback(d.stderr)


@pytest.mark.parametrize("names", ["myshim", "lan0=shim-a lan1=shim-b"])
def test_interface_name(lab, engine, names):
    engine.network("net0", parent="lan0")
    engine.network("net1", parent="lan1")
    engine.container("c0", "net0", ip=C4)
    engine.container("c1", "net1", ip=D4)
    if "=" in names:
        want0, want1 = "shim-a", "shim-b"
        cfg = {"MACVLAN_BRIDGE_INTERFACE_NAME": names}
    else:
        want0, want1 = names, None
        cfg = {"MACVLAN_BRIDGE_INTERFACE_NAME": names, "MACVLAN_DOCKER_NETWORK": "net0"}
    lab.daemon(cfg)
    wait_until(lambda: lab.route_via(C4, want0), desc=f"route via {want0}")
    lab.wait_ping(C4)
    if want1:
        wait_until(lambda: lab.route_via(D4, want1), desc=f"route via {want1}")
        lab.wait_ping(D4)
        assert {ln["ifname"] for ln in lab.macvlan_links()} == {want0, want1}
    else:
        assert {ln["ifname"] for ln in lab.macvlan_links()} == {want0}
        assert lab.route(D4) is None


def test_status_json(lab, engine):
    engine.network("lan", v6=True)
    engine.container("c1", "lan", ip=C4, ip6=C6)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0) and lab.route_via(C6, SHIM0),
               desc="routes via shim")
    shim6 = shim_addr(lab, SHIM0, 6)["local"]
    status = lab.status_json(config={})
    text = json.dumps(status)
    for needle in (SHIM0, C4, C6, LAN0["host"], shim6, "lan"):
        assert needle in text, f"{needle} missing from status --json: {text}"
    assert [(s["name"], s["kind"], s["mode"]) for s in status["shims"]] == \
        [(SHIM0, "macvlan", "bridge")], status["shims"]
    rc, out, err = lab.mvr("status", config={})
    assert rc == 0 and f"shim {SHIM0} (macvlan bridge) on" in out, (rc, out, err)
    rc, out, err = lab.mvr("check", config={})
    assert rc == 0 and f"shim {SHIM0} (macvlan bridge) on" in out, (rc, out, err)
    # STATUS= tells what is managed
    d.wait_notify(lambda m: m.startswith("STATUS=") and SHIM0 in m,
                  desc="STATUS= naming the shim")


def test_owned_routes_carry_protocol(lab, engine):
    engine.network("lan", v6=True)
    engine.container("c1", "lan", ip=C4, ip6=C6)
    engine.container("c2", "lan", ip="198.51.100.131", ip6="2001:db8:1::1:11")
    lab.daemon({})
    want = {C4, C6, "198.51.100.131", "2001:db8:1::1:11"}
    wait_until(lambda: all(lab.route_via(a, SHIM0) for a in want), desc="4 routes")
    owned = lab.owned_routes()
    assert {r["dst"] for r in owned} == want, owned
    assert all(str(r.get("protocol")) in PROTO_NAMES and r["dev"] == SHIM0 for r in owned)


def test_zero_config_without_host_address_skips_that_network(lab, engine):
    """Zero-config IPv4 reuses the host's address in the network's subnet; where the host
    has none, the daemon says so and skips that network, and the others still work."""
    lab.ipc("addr", "flush", "dev", "lan1", "scope", "global")
    engine.network("net0", parent="lan0")
    engine.network("net1", parent="lan1")
    engine.container("c0", "net0", ip=C4)
    engine.container("c1", "net1", ip=D4)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route on the network that works")
    lab.wait_ping(C4)
    wait_until(lambda: "net1" in d.stderr and "203.0.113" in d.stderr,
               desc="a message naming the skipped network and its subnet")
    assert lab.route(D4) is None
    assert not [a for a in (lab.global_addrs(SHIM1, 4) if lab.link(SHIM1) else [])], \
        "no address to reuse, so none may appear on the shim"
    assert d.alive()
    assert_no_traceback(d.stderr)
