"""ipvlan networks where this machine's kernel has no ipvlan module: what must hold without
it. (An ipvlan shim that works is tested in the VM: tests/vm/guest/check_ipvlan.py.)

- a macvlan and an ipvlan network on one parent: reported, and the macvlan routes stay;
- an ipvlan network the kernel cannot serve: an error that says what to do, and nothing
  else is lost."""

import pytest

from lab import LABEL, LAN1, SHIM0, SHIM1, assert_no_traceback, holds_for, wait_until

pytestmark = pytest.mark.integration

C4 = "198.51.100.130"
D4 = "203.0.113.130"
SHIM_IP1 = "203.0.113.4"   # MACVLAN_BRIDGE_IP for the ipvlan network on lan1


def ipvlan_network(engine, name, lan, parent=None):
    """docker network create -d ipvlan (Docker's default mode, l2) with `lan`'s subnet, on
    `lan`'s parent or on `parent`."""
    engine.cli("network", "create", "-d", "ipvlan", "--label", f"{LABEL}=1",
               "--subnet", lan["subnet"], "--gateway", lan["gateway"],
               "--ip-range", lan["ip_range"], "--aux-address", f"host={lan['host']}",
               "--aux-address", f"peer={lan['peer_ip']}",
               "-o", f"parent={parent or lan['parent']}", name)
    return name


def test_macvlan_and_ipvlan_on_one_parent_are_reported_and_macvlan_routes_stay(lab, engine):
    engine.network("mac", parent="lan0")
    engine.container("c1", "mac", ip=C4)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc=f"route {C4} via {SHIM0}")
    lab.wait_ping(C4)

    # Docker refuses two networks with one subnet: this one has lan1's.
    ipvlan_network(engine, "ipnet", LAN1, parent="lan0")
    wait_until(lambda: "different kinds of shim" in d.stderr, timeout=15,
               desc="the daemon reporting the parent asked for two kinds")
    report = next(line for line in d.stderr.splitlines() if "different kinds" in line)
    for words in ("lan0", "ipvlan l2: ipnet", "macvlan: mac", "only the macvlan networks",
                  "leave ipnet out of MACVLAN_DOCKER_NETWORK"):
        assert words in report, report
    # The route and the shim stay as they were, throughout.
    holds_for(lambda: lab.route_via(C4, SHIM0), duration=2.0, desc=f"route {C4} kept")
    assert lab.link(SHIM0)["linkinfo"]["info_kind"] == "macvlan"
    lab.wait_ping(C4)
    status = lab.status_json(config={})
    assert "different kinds of shim" in str(status), status
    assert d.alive()
    assert_no_traceback(d.stderr)


def test_ipvlan_without_the_kernel_module_says_what_to_do_and_costs_nothing_else(lab, engine):
    rc = lab.ipc("link", "add", "probe0", "link", "lan1", "type", "ipvlan", check=False)
    if rc.returncode == 0:
        lab.ipc("link", "del", "probe0")
        pytest.skip("this kernel has ipvlan: the VM test covers a working ipvlan shim")
    engine.network("mac", parent="lan0")
    engine.container("c1", "mac", ip=C4)
    ipvlan_network(engine, "ipnet", LAN1)
    d = lab.daemon({"MACVLAN_BRIDGE_IP": SHIM_IP1})

    wait_until(lambda: lab.route_via(C4, SHIM0), desc=f"route {C4} via {SHIM0}")
    lab.wait_ping(C4)
    wait_until(lambda: "this kernel cannot make ipvlan links" in d.stderr,
               desc="the error naming the missing module")
    error = next(line for line in d.stderr.splitlines() if "cannot make ipvlan" in line)
    for words in (f"ip link add {SHIM1} link lan1 type ipvlan mode l2", "modprobe ipvlan",
                  "MACVLAN_DOCKER_NETWORK"):
        assert words in error, error
    # Only the creation is reported: the changes on the shim it did not make are skipped.
    assert f"dev {SHIM1}" not in d.stderr, d.stderr
    assert lab.link(SHIM1) is None
    assert not [r for r in lab.owned_routes() if r["dev"] != SHIM0]
    # The retries cost the macvlan network nothing.
    holds_for(lambda: lab.route_via(C4, SHIM0), duration=2.0, desc=f"route {C4} kept")
    engine.container("c2", "mac", ip="198.51.100.131")
    wait_until(lambda: lab.route_via("198.51.100.131", SHIM0), desc="a new container routed")
    assert LAN1["host"] not in {r["dst"] for r in lab.owned_routes()}
    # Retried every few seconds, said once.
    assert d.stderr.count("cannot make ipvlan links") == 1, d.stderr
    assert d.alive()
    assert_no_traceback(d.stderr)
