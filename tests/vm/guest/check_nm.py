"""NetworkManager beside systemd-networkd: a macvlan network whose parent NM manages, and NM
reconnecting that parent.

Parent nmp0: one end of a veth pair (a stand-in for a NIC: NM did not create it, so NM's
disconnect does not delete it) that systemd-networkd makes at boot from files this check
writes in boot1; networkd has no .network for nmp0 and only brings the other end, nmpeer0,
up (so nmp0 has carrier). NetworkManager configures nmp0 from the keyfile profile vm-nmp0
(198.51.100.226/27, 2001:db8:c::2/64). The image lets NM manage no link but nmp0 and the
shims (tests/vm/vm_host.py, NM_PARENT): that NM leaves the shims alone must come from the
package's NM drop-in. Network nmnet, container vm-nm1 (--restart=always).

boot1: the drop-in is in NM's configuration, and every shim unmanaged although NM started
before the package came (the postinst has NM re-read its configuration); NM lists this
check's shim as unmanaged; the container routed and reachable both ways; NM reconnects
nmp0 (`nmcli device disconnect` + `connect`, then `nmcli connection down` + `up`) under a
50 ms poll of the shim and both routes, `ip monitor` and a 50 ms ping: the shim and the
routes never go (NM takes the host's address off nmp0 meanwhile, which the shim's IPv4
address copies); reach afterwards.
boot2: NM connected nmp0 at boot, the routes are back with nobody acting, reach works, the
shim is still unmanaged.
"""

import ipaddress
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import guestlib as g

PARENT = "nmp0"                     # tests/vm/vm_host.py NM_PARENT: NM manages only this
PEER_END = "nmpeer0"
PROFILE = "vm-nmp0"
SHIM = g.SHIM_PREFIX + PARENT
NET = "nmnet"
C = "vm-nm1"
HOST4 = "198.51.100.226"
C4 = "198.51.100.240"
C6 = "2001:db8:c::240"
NM_DROPIN = Path("/usr/lib/NetworkManager/conf.d/macvlan-router.conf")
NETWORKD = Path("/etc/systemd/network")
NETWORKD_FILES = {
    "30-nmp0.netdev": f"[NetDev]\nName={PARENT}\nKind=veth\n\n[Peer]\nName={PEER_END}\n",
    "30-nmpeer0.network": (f"[Match]\nName={PEER_END}\n\n[Link]\nRequiredForOnline=no\n\n"
                           "[Network]\nLinkLocalAddressing=no\nConfigureWithoutCarrier=yes\n"),
}
KEYFILE = Path("/etc/NetworkManager/system-connections") / f"{PROFILE}.nmconnection"
KEYFILE_TEXT = f"""[connection]
id={PROFILE}
uuid=5d3c0a4e-8f7b-4c1e-9a51-6b2f0d7e3c11
type=ethernet
interface-name={PARENT}
autoconnect=true

[ethernet]

[ipv4]
method=manual
address1={HOST4}/27

[ipv6]
method=manual
address1=2001:db8:c::2/64
"""
RECONNECTS = {
    "device": (("nmcli", "device", "disconnect", PARENT),
               ("nmcli", "--wait", "60", "device", "connect", PARENT)),
    "connection": (("nmcli", "connection", "down", PROFILE),
                   ("nmcli", "--wait", "60", "connection", "up", PROFILE)),
}


def routed():
    return g.routed(SHIM, C4, C6)


def reachable():
    return g.reach_both_ways(C, (C4, C6), (HOST4,))


def nm_state(dev):
    p = g.run("nmcli", "-g", "GENERAL.STATE", "device", "show", dev, check=False)
    return p.stdout.strip() if p.returncode == 0 else f"unknown to NM: {p.stderr.strip()}"


def nm_devices():
    """{device: state} as `nmcli device` lists them."""
    out = g.run("nmcli", "-t", "-f", "DEVICE,STATE", "device").stdout
    return dict(line.rsplit(":", 1) for line in out.splitlines() if ":" in line)


def nm_manages_only_parent():
    """Every link but nmp0 (and lo, which NM may keep as it finds it) is unmanaged."""
    devices = nm_devices()
    others = {d: s for d, s in devices.items() if d not in (PARENT, "lo")
              and s != "unmanaged"}
    if others or not devices.get(PARENT, "").startswith("connected"):
        raise g.CheckError(f"NM should manage {PARENT} alone: {devices}")
    return f"{PARENT} {devices[PARENT]}, the other {len(devices) - 1} unmanaged"


# --------------------------------------------------------------------------- measuring

def _route4_key(addr):
    """/proc/net/route's destination field of addr: its bytes as a little-endian word."""
    return "%08X" % struct.unpack("<I", socket.inet_aton(addr))[0]


class Gone:
    """While an event happens: every 50 ms, whether the shim is up with carrier and whether
    each route to the container is there, read from /sys and /proc (no process per poll,
    so the poll keeps its pace under emulation). Bounded by `limit` seconds."""

    INTERVAL = 0.05
    ITEMS = ("shim", f"{C4}/32", f"{C6}/128")

    def __init__(self, limit=180):
        self.limit = limit
        self.samples = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        return False

    def _run(self):
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.samples.append((time.monotonic(), self.present()))
            self.stop.wait(self.INTERVAL)

    @staticmethod
    def present():
        seen = set()
        base = Path("/sys/class/net") / SHIM
        try:
            if int((base / "flags").read_text(), 16) & 1 and \
                    (base / "carrier").read_text().strip() == "1":
                seen.add("shim")
        except OSError:       # no shim, or down (reading carrier of a down link: EINVAL)
            pass
        key4 = _route4_key(C4)
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            f = line.split()
            if f[0] == SHIM and f[1] == key4 and f[7] == "FFFFFFFF":
                seen.add(f"{C4}/32")
        key6 = ipaddress.IPv6Address(C6).packed.hex()
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            f = line.split()
            if f[0] == key6 and f[1] == "80" and f[-1] == SHIM:
                seen.add(f"{C6}/128")
        return seen

    def gaps(self, item):
        """[(start, end)] of the times item was missing (end None: still missing)."""
        out, start = [], None
        for t, seen in self.samples:
            if item not in seen and start is None:
                start = t
            elif item in seen and start is not None:
                out.append((start, t))
                start = None
        if start is not None:
            out.append((start, None))
        return out


def reconnect(r, name, down, up):
    down_text, up_text = " ".join(down), "nmcli " + " ".join(up[3:])
    with r.check(f"nm-reconnect-{name}") as c:
        with g.Watch(C4) as w, Gone() as gone:
            since = f"--since=@{int(time.time())}"
            t_down = time.monotonic()
            g.run(*down, timeout=g.SETTLE)
            g.run(*up, timeout=g.SETTLE)
            t_up = time.monotonic()
            g.wait_until(lambda: nm_state(PARENT).startswith("100"), g.SETTLE,
                         desc=f"NM to connect {PARENT} again")
            g.wait_until(lambda: g.link(SHIM) and routed(), g.REPAIR,
                         desc=f"{SHIM} and the routes back after `{up_text}`")
            w.settle(2)
        end = gone.samples[-1][0]
        parts, went = [], []
        for item in Gone.ITEMS:
            gaps = gone.gaps(item)
            longest = max(((e or end) - s for s, e in gaps), default=0.0)
            if gaps:
                went.append(item)
            parts.append(f"{item} gone {len(gaps)}x (longest {longest:.2f}s)")
        deleted = w.deleted(f"{C4} dev {SHIM}")
        if deleted:
            went.append(f"{C4} (ip monitor: {deleted[0]!r})")
        reachable()
        # Who took what away: the kernel's view, and what the daemon did meanwhile.
        acted = [x for x in g.journal("-u", "macvlan-router", "-o", "cat", since).splitlines()
                 if SHIM in x and x.startswith(("ip ", "sysctl "))]
        c.detail = (f"`{down_text}` + `{up_text}` took {t_up - t_down:.2f}s; "
                    + "; ".join(parts) + f"; ping {C4}: {w.summary()}; polled "
                    f"{len(gone.samples)}x in {end - gone.samples[0][0]:.1f}s; ip monitor: "
                    f"route {C4} deleted {len(deleted)}x, shim address "
                    f"{HOST4} deleted {len(w.deleted(f': {SHIM} ', f'inet {HOST4}/32'))}x, "
                    f"parent's {len(w.deleted(f': {PARENT} ', f'inet {HOST4}/27'))}x; "
                    "macvlan-router ran "
                    f"{len(acted)} commands on {SHIM}: {acted[:4]}")
        if went:
            raise g.CheckError(f"{', '.join(went)} went while NM reconnected {PARENT}: "
                               f"{c.detail}")


# --------------------------------------------------------------------------- phases

def setup(r):
    with r.check("nm-dropin-in-config") as c:
        if not NM_DROPIN.is_file():
            raise g.CheckError(f"{NM_DROPIN} is not installed by the package")
        conf = g.run("NetworkManager", "--print-config").stdout
        line = next((x for x in conf.splitlines() if x.startswith("unmanaged-devices=")), "")
        if "interface-name:mvr-*" not in line:
            raise g.CheckError(f"NetworkManager --print-config lacks the shims: {line!r}")
        c.detail = f"{NM_DROPIN}; NetworkManager --print-config: {line}"
    # NM reads its configuration when it starts, and it ran before the package came:
    # the postinst has it re-read the configuration (without, the shims were NM's,
    # "connected (externally)", until `nmcli general reload conf`).
    with r.check("nm-shims-unmanaged-after-install") as c:
        g.wait_until(lambda: all(s == "unmanaged" for d, s in nm_devices().items()
                                 if d.startswith(g.SHIM_PREFIX)), 30,
                     desc="NM to list every mvr-* shim as unmanaged")
        c.detail = " ".join(f"{d}={s!r}" for d, s in sorted(nm_devices().items())
                            if d.startswith(g.SHIM_PREFIX))
    with r.check("nm-parent-by-profile") as c:
        KEYFILE.write_text(KEYFILE_TEXT)
        KEYFILE.chmod(0o600)
        g.run("nmcli", "connection", "load", KEYFILE)
        for name, text in NETWORKD_FILES.items():
            (NETWORKD / name).write_text(text)
        g.run("networkctl", "reload")
        g.wait_until(lambda: nm_state(PARENT).startswith("100") and HOST4 in
                     g.addresses(PARENT), g.SETTLE,
                     desc=f"NM to connect {PARENT} with {HOST4} (profile {PROFILE})")
        c.detail = nm_manages_only_parent()
    with r.check("nm-container-routed") as c:
        g.docker("network", "create", "-d", "macvlan", "-o", f"parent={PARENT}",
                 "--subnet", "198.51.100.224/27", "--gateway", "198.51.100.225",
                 "--ip-range", "198.51.100.240/28", "--aux-address", f"host={HOST4}",
                 "--ipv6", "--subnet", "2001:db8:c::/64", "--gateway", "2001:db8:c::1", NET)
        g.container(C, NET, C4, "--ip6", C6)
        t0 = time.monotonic()
        g.wait_until(routed, g.SETTLE, desc=f"routes to {C4} and {C6} via {SHIM}")
        c.detail = f"{C4} and {C6} via {SHIM} {time.monotonic() - t0:.1f}s after docker run"
    with r.check("nm-shim-unmanaged") as c:
        g.wait_until(lambda: "unmanaged" in nm_state(SHIM), g.SETTLE,
                     desc=f"NM to list {SHIM} as unmanaged")
        c.detail = f"nmcli: {SHIM} {nm_state(SHIM)}"
    with r.check("nm-reach-both-ways") as c:
        c.detail = reachable()


def after_reboot(r):
    with r.check("nm-parent-connected-after-reboot") as c:
        g.wait_until(lambda: nm_state(PARENT).startswith("100"), g.SETTLE,
                     desc=f"NM to connect {PARENT}")
        c.detail = nm_manages_only_parent()
    g.back_after_reboot(r, "nm-", routed, reachable, C4, f"{C4} and {C6} via {SHIM}",
                        lambda: f"nmcli device show {SHIM}: {nm_state(SHIM)}")


def boot1(r):
    setup(r)
    if not r.failed:
        for name, (down, up) in RECONNECTS.items():
            reconnect(r, name, down, up)


def boot2(r):
    after_reboot(r)


if __name__ == "__main__":
    sys.exit(g.main("check_nm", boot1, boot2))
