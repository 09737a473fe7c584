"""VLAN parents: a VLAN link Docker creates (`-o parent=vlanp0.10`, missing until the network
is created) and one the user made (vlanp0.20, from systemd-networkd, with an address).

Base link vlanp0: a dummy that systemd-networkd creates at every boot (files written here
in boot1; RequiredForOnline=no, so the boot does not wait for it). Docker recreates
vlanp0.10 when it starts, for its network.

boot1: both networks routed and reachable both ways; a flap of each VLAN link and of the
base link is repaired.
boot2: both routed and reachable again with nobody acting; the Docker network on vlanp0.10
removed: its shim goes, Docker removes the VLAN link, and macvlan-router never ran a
command on it (the journal); the network on vlanp0.20 removed and the service stopped: the
user's VLAN link is exactly as it was (index, state, addresses, MAC, MTU).
"""

import re
import sys
import time
from pathlib import Path

import guestlib as g

BASE = "vlanp0"
DOCKER_VLAN = f"{BASE}.10"      # created (and removed) by Docker
USER_VLAN = f"{BASE}.20"        # made by the user, through systemd-networkd
NETWORKD = Path("/etc/systemd/network")
FILES = {
    "30-vlanp0.netdev": f"[NetDev]\nName={BASE}\nKind=dummy\n",
    "30-vlanp0.network": (f"[Match]\nName={BASE}\n\n[Link]\nRequiredForOnline=no\n\n"
                          f"[Network]\nLinkLocalAddressing=no\nVLAN={USER_VLAN}\n"),
    "30-vlanp0.20.netdev": f"[NetDev]\nName={USER_VLAN}\nKind=vlan\n\n[VLAN]\nId=20\n",
    "30-vlanp0.20.network": (f"[Match]\nName={USER_VLAN}\n\n[Link]\nRequiredForOnline=no\n\n"
                             "[Network]\nLinkLocalAddressing=no\nAddress=198.51.100.130/26\n"),
}
# name: (parent, subnet, ip range, shim or host address, container, its address)
NETS = {
    "vlan10net": (DOCKER_VLAN, "198.51.100.64/26", "198.51.100.96/27", "198.51.100.66",
                  "vl-c10", "198.51.100.100"),
    "vlan20net": (USER_VLAN, "198.51.100.128/26", "198.51.100.160/27", "198.51.100.130",
                  "vl-c20", "198.51.100.170"),
}


def shim(parent):
    return g.SHIM_PREFIX + parent


def routed(net):
    parent, _, _, _, _, ip = NETS[net]
    return g.routed(shim(parent), ip)


def reachable(net):
    _, _, _, host, c, ip = NETS[net]
    return g.reach_both_ways(c, (ip,), (host,))


def user_link_state():
    """What must not change on the user's VLAN link."""
    info = g.link(USER_VLAN)
    if not info:
        return None
    return {"ifindex": info["ifindex"], "flags": sorted(info["flags"]),
            "operstate": info["operstate"], "mtu": info["mtu"], "address": info["address"],
            "vlan_id": info.get("linkinfo", {}).get("info_data", {}).get("id"),
            "addresses": sorted(g.addresses(USER_VLAN))}


def boot1(r):
    with r.check("vlan-base-links") as c:
        for name, text in FILES.items():
            (NETWORKD / name).write_text(text)
        g.run("networkctl", "reload")
        g.wait_until(lambda: "198.51.100.130" in g.addresses(USER_VLAN), g.SETTLE,
                     desc=f"systemd-networkd to make {BASE} and {USER_VLAN} with its address")
        if g.link(DOCKER_VLAN):
            raise g.CheckError(f"{DOCKER_VLAN} exists before Docker was asked to make it")
        # The Docker-made VLAN has no host address to reuse: give its shim one.
        g.config_add("MACVLAN_BRIDGE_IP", NETS["vlan10net"][3])
        c.detail = f"{BASE}, {USER_VLAN} up; {DOCKER_VLAN} absent"
    for net, (parent, subnet, ip_range, host, cname, ip) in NETS.items():
        with r.check(f"{net}-routed-and-reachable") as c:
            g.docker("network", "create", "-d", "macvlan", "-o", f"parent={parent}",
                     "--subnet", subnet, "--ip-range", ip_range, net)
            vlan = g.link(parent)
            if not vlan or vlan.get("linkinfo", {}).get("info_kind") != "vlan":
                raise g.CheckError(f"{parent} is not a VLAN link: {vlan}")
            g.container(cname, net, ip)
            g.wait_until(lambda: routed(net), g.SETTLE, desc=f"{ip} via {shim(parent)}")
            reachable(net)
            c.detail = f"{ip} via {shim(parent)}; host <-> {cname} both ways"
    for what in (DOCKER_VLAN, USER_VLAN, BASE):
        with r.check(f"flap-{what}-repaired") as c:
            g.run("ip", "link", "set", what, "down")
            t0 = time.monotonic()
            g.run("ip", "link", "set", what, "up")
            nets = [n for n in NETS if what in (BASE, NETS[n][0])]
            g.wait_until(lambda: all(routed(n) and g.link(shim(NETS[n][0])) for n in nets),
                         g.REPAIR, desc=f"routes of {', '.join(nets)} after flapping {what}")
            took = time.monotonic() - t0
            for n in nets:
                reachable(n)
            c.detail = f"{', '.join(nets)} routed {took:.2f}s after `ip link set {what} up`"


def touched(link_name):
    """Commands macvlan-router logged that act on link_name itself (naming it as the
    `link` of a new shim, or inside the shim's own name, is not acting on it)."""
    out = []
    for line in g.journal("-u", "macvlan-router", "-o", "cat").splitlines():
        if not re.search(r"\b(ip|sysctl)\b", line):
            continue
        rest = line.replace(shim(link_name), "").replace(f"link {link_name} ", "")
        if re.search(rf"(?<![\w.-]){re.escape(link_name)}(?![\w.-])", rest):
            out.append(line)
    return out


def stale_bridge_ip(r):
    """MACVLAN_BRIDGE_IP still names the removed network's shim address (every network is
    served): a restart must still start, with a warning; then the address is taken out."""
    address = NETS["vlan10net"][3]
    with r.check("restart-with-stale-bridge-ip") as c:
        g.run("systemctl", "restart", "macvlan-router", timeout=g.SETTLE)
        g.wait_until(lambda: routed("vlan20net"), g.SETTLE, desc="vlan20net routed again")
        warned = [line for line in g.journal("-b", "-u", "macvlan-router", "-o", "cat",
                                             "-n", "200").splitlines()
                  if f"MACVLAN_BRIDGE_IP={address} lies in none" in line]
        assert warned, f"no warning naming MACVLAN_BRIDGE_IP={address}"
        state = g.unit_show("macvlan-router", "ActiveState")["ActiveState"]
        assert state == "active", f"macvlan-router.service is {state}"
        c.detail = f"active after a restart; warned: {warned[-1]}"
    with r.check("bridge-ip-removed") as c:
        g.config_remove("MACVLAN_BRIDGE_IP", address)
        g.wait_until(lambda: routed("vlan20net"), g.SETTLE, desc="vlan20net routed")
        c.detail = "reloaded; vlan20net routed"


def boot2(r):
    for net, (parent, _, _, _, _, ip) in NETS.items():
        with r.check(f"{net}-back-after-reboot") as c:
            g.wait_until(lambda: routed(net), g.SETTLE, desc=f"{ip} via {shim(parent)}")
            reachable(net)
            c.detail = f"{ip} via {shim(parent)}; reachable both ways"
    with r.check("docker-vlan-network-removed") as c:
        g.docker("rm", "-f", NETS["vlan10net"][4])
        g.docker("network", "rm", "vlan10net")
        g.wait_until(lambda: not g.link(shim(DOCKER_VLAN)), g.REPAIR,
                     desc=f"{shim(DOCKER_VLAN)} to go with its network")
        g.wait_until(lambda: not g.link(DOCKER_VLAN), g.SETTLE,
                     desc=f"Docker to remove {DOCKER_VLAN}")
        acted = touched(DOCKER_VLAN)
        if acted:
            raise g.CheckError(f"macvlan-router acted on Docker's {DOCKER_VLAN}: {acted}")
        c.detail = (f"{shim(DOCKER_VLAN)} gone, {DOCKER_VLAN} removed by Docker; the journal "
                    f"shows no command of ours on {DOCKER_VLAN}")
    stale_bridge_ip(r)
    with r.check("user-vlan-untouched") as c:
        before = user_link_state()
        g.docker("rm", "-f", NETS["vlan20net"][4])
        g.docker("network", "rm", "vlan20net")
        g.wait_until(lambda: not g.link(shim(USER_VLAN)), g.REPAIR,
                     desc=f"{shim(USER_VLAN)} to go with its network")
        after_network = user_link_state()
        g.run("systemctl", "stop", "macvlan-router", timeout=g.SETTLE)
        after_service = user_link_state()
        g.run("systemctl", "start", "macvlan-router", timeout=g.SETTLE)
        if not (before == after_network == after_service):
            raise g.CheckError(f"{USER_VLAN} changed: {before} -> {after_network} (network "
                               f"removed) -> {after_service} (service stopped)")
        acted = touched(USER_VLAN)
        if acted:
            raise g.CheckError(f"macvlan-router acted on the user's {USER_VLAN}: {acted}")
        c.detail = f"{USER_VLAN} as it was: {after_service}"


if __name__ == "__main__":
    sys.exit(g.main("check_vlan", boot1, boot2))
