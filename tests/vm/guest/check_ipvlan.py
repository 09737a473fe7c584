"""An ipvlan L2 network served with an ipvlan shim, on Debian's stock kernel (this is where
the ipvlan module exists; the machine running the suite may lack it).

Parent ipvp0: one end of a veth pair that systemd-networkd makes at boot from files this
check writes in boot1 (203.0.113.2/24 on ipvp0); the other end, ipvpeer0, plays a LAN peer
(203.0.113.3) from a network namespace in boot1. Network vmipnet (Docker's ipvlan driver,
default mode l2), container vm-ip1 (--restart=always). An ipvlan shim never reuses the
host's address (README.md, "ipvlan networks"): MACVLAN_BRIDGE_IP=203.0.113.4 gives it one.

boot1: the shim is an ipvlan l2 child with its own address and the route; host and
container reach each other; the host's own traffic from the LAN peer still arrives on
ipvp0 (a socket bound to it, as a DHCP client's is, gets it); the shim deleted is repaired.
boot2: after the reboot the shim and route are back with nobody acting, and reach works.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import guestlib as g

PARENT = "ipvp0"
PEER_END = "ipvpeer0"
PEER_NS = "ipvlanpeer"
SHIM = g.SHIM_PREFIX + PARENT
NET = "vmipnet"
C = "vm-ip1"
HOST4 = "203.0.113.2"
PEER4 = "203.0.113.3"
SHIM4 = "203.0.113.4"
C4 = "203.0.113.130"
NETWORKD = Path("/etc/systemd/network")
NETWORKD_FILES = {
    "30-ipvp0.netdev": f"[NetDev]\nName={PARENT}\nKind=veth\n\n[Peer]\nName={PEER_END}\n",
    "30-ipvp0.network": (f"[Match]\nName={PARENT}\n\n[Network]\nAddress={HOST4}/24\n"
                         "LinkLocalAddressing=no\nConfigureWithoutCarrier=yes\n"),
    "30-ipvpeer0.network": (f"[Match]\nName={PEER_END}\n\n[Network]\n"
                            "LinkLocalAddressing=no\nConfigureWithoutCarrier=yes\n"),
}
CONFIG = Path("/etc/default/macvlan-router")
SETTING = f"MACVLAN_BRIDGE_IP={SHIM4}"
UDP_PORT = 6868


def routed():
    return g.routed(SHIM, C4)


def shim_is_ipvlan_l2():
    link = g.link(SHIM)
    info = (link or {}).get("linkinfo", {})
    return link if info.get("info_kind") == "ipvlan" \
        and info.get("info_data", {}).get("mode") == "l2" else None


def reachable():
    return g.reach_both_ways(C, (C4,), (SHIM4, HOST4))


def route_source():
    p = g.run("ip", "-j", "route", "show", f"{C4}/32", "dev", SHIM)
    found = json.loads(p.stdout or "[]")
    return found[0].get("prefsrc") if found else None


def setup(r):
    with r.check("ipvlan-parent-by-networkd") as c:
        for name, text in NETWORKD_FILES.items():
            (NETWORKD / name).write_text(text)
        g.run("networkctl", "reload")
        g.wait_until(lambda: HOST4 in g.addresses(PARENT), g.SETTLE,
                     desc=f"networkd to make {PARENT} with {HOST4}")
        c.detail = f"{PARENT} {HOST4}/24, the other end {PEER_END}"
    with r.check("ipvlan-container-routed") as c:
        g.busybox_image()
        # The network first: MACVLAN_BRIDGE_IP must lie in a managed network's subnet.
        g.docker("network", "create", "-d", "ipvlan", "-o", f"parent={PARENT}",
                 "--subnet", "203.0.113.0/24", "--gateway", "203.0.113.1",
                 "--ip-range", "203.0.113.128/25", "--aux-address", f"host={HOST4}",
                 "--aux-address", f"peer={PEER4}", "--aux-address", f"shim={SHIM4}", NET)
        text = CONFIG.read_text()
        if SETTING not in text:
            CONFIG.write_text(text.rstrip("\n") + f"\n{SETTING}\n")
        g.run("systemctl", "reload", "macvlan-router")
        g.docker("run", "-d", "--name", C, "--restart=always", "--network", NET,
                 "--ip", C4, g.IMAGE, "sleep", "1000000")
        t0 = time.monotonic()
        g.wait_until(routed, g.SETTLE, desc=f"route to {C4} via {SHIM}")
        c.detail = f"{C4} via {SHIM} {time.monotonic() - t0:.1f}s after docker run"
    with r.check("ipvlan-shim-kind-and-address") as c:
        link = shim_is_ipvlan_l2()
        if not link:
            raise g.CheckError(f"{SHIM} is not an ipvlan l2 link: {g.link(SHIM)}")
        if link.get("ifalias") != "macvlan-router":
            raise g.CheckError(f"{SHIM} lacks the alias macvlan-router: {link}")
        own = [a for a in g.addresses(SHIM) if not a.startswith("fe80:")]
        if own != [SHIM4] or route_source() != SHIM4:
            raise g.CheckError(f"{SHIM} has {own}, route source {route_source()}; "
                               f"want {SHIM4} only (and the kernel's link-local one)")
        c.detail = f"{SHIM}: ipvlan mode l2 on {PARENT}, {SHIM4}/32, route src {SHIM4}"
    with r.check("ipvlan-reach-both-ways") as c:
        c.detail = reachable()


def bound_socket_gets(dev):
    """A datagram from the LAN peer to the host's address, received by a UDP socket bound
    to `dev`: where ipvlan delivered it."""
    listener = subprocess.Popen(
        [sys.executable, "-c",
         "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
         f"s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'{dev}'); "
         f"s.bind(('0.0.0.0', {UDP_PORT})); s.settimeout(10); print('ready', flush=True); "
         "print(s.recvfrom(64)[0].decode(), flush=True)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if listener.stdout.readline().strip() != "ready":
            raise g.CheckError(f"the listener on {dev} did not start: {listener.stderr.read()}")
        g.run("ip", "netns", "exec", PEER_NS, sys.executable, "-c",
              "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              f"[s.sendto(b'hello', ('{HOST4}', {UDP_PORT})) for _ in range(3)]")
        out, _ = listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate(timeout=10)
    return out.strip() == "hello"


def rx_packets(dev):
    return int(Path(f"/sys/class/net/{dev}/statistics/rx_packets").read_text())


def host_traffic(r):
    """Why the shim has an address of its own: the host's traffic stays on the parent."""
    with r.check("ipvlan-host-traffic-stays-on-parent") as c:
        g.run("ip", "netns", "add", PEER_NS)
        try:
            g.run("ip", "link", "set", PEER_END, "netns", PEER_NS)
            # No IPv6 chatter: the shim gets the LAN's broadcasts and multicasts anyway, and
            # its counter should show only those besides what ipvlan hands it by address.
            g.run("ip", "netns", "exec", PEER_NS, "sysctl", "-qw",
                  f"net.ipv6.conf.{PEER_END}.disable_ipv6=1")
            g.run("ip", "-n", PEER_NS, "address", "add", f"{PEER4}/24", "dev", PEER_END)
            g.run("ip", "-n", PEER_NS, "link", "set", PEER_END, "up")
            before = rx_packets(SHIM)
            answered = sum(g.run("ip", "netns", "exec", PEER_NS, "busybox", "ping", "-c", "1",
                                 "-W", "2", HOST4, check=False).returncode == 0
                           for _ in range(5))
            on_shim = rx_packets(SHIM) - before
            bound = bound_socket_gets(PARENT)
            lan_to_container = g.run("ip", "netns", "exec", PEER_NS, "busybox", "ping", "-c",
                                     "1", "-W", "2", C4, check=False).returncode == 0
        finally:
            # Back first: deleting the namespace would delete the veth pair, parent and all.
            g.run("ip", "-n", PEER_NS, "link", "set", PEER_END, "netns", "1", check=False)
            g.run("ip", "netns", "del", PEER_NS, check=False)
        c.detail = (f"LAN peer -> {HOST4}: {answered}/5 answered, {on_shim} packets arrived "
                    f"on {SHIM}; a UDP socket bound to {PARENT} got the peer's datagram: "
                    f"{bound}; LAN peer -> {C4}: {lan_to_container}")
        if answered < 4 or not bound or not lan_to_container or on_shim >= 5:
            raise g.CheckError(c.detail)
    g.wait_until(lambda: g.link(PEER_END), g.SETTLE, desc=f"{PEER_END} back")
    g.run("ip", "link", "set", PEER_END, "up")


def repaired(r):
    with r.check("ipvlan-shim-repaired-after-deletion") as c:
        g.run("ip", "link", "del", SHIM)
        t0 = time.monotonic()
        g.wait_until(lambda: shim_is_ipvlan_l2() and routed(), g.REPAIR,
                     desc=f"{SHIM} (ipvlan l2) and the route to {C4} back")
        took = time.monotonic() - t0
        reachable()
        c.detail = f"{SHIM} and the route back {took:.2f}s after ip link del {SHIM}"


def after_reboot(r):
    with r.check("ipvlan-routes-back-after-reboot") as c:
        g.wait_until(lambda: shim_is_ipvlan_l2() and routed(), g.SETTLE,
                     desc=f"{SHIM} (ipvlan l2) and the route to {C4}")
        c.detail = g.route_added_this_boot(C4)
    with r.check("ipvlan-reach-both-ways-after-reboot") as c:
        c.detail = reachable()


def boot1(r):
    setup(r)
    if not r.failed:
        host_traffic(r)
        repaired(r)


def boot2(r):
    after_reboot(r)


if __name__ == "__main__":
    sys.exit(g.main("check_ipvlan", boot1, boot2))
