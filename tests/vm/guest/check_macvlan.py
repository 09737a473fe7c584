"""What only a real boot shows, on a macvlan network whose parent systemd-networkd manages.

Parent vmlan0: a dummy link that systemd-networkd creates at boot (baked into the image,
198.51.100.2/26, 2001:db8:a::2/64); macvlan children in bridge mode reach each other on any
parent, so the shim and the container do. Network vmnet, container vm-c1 (--restart=always).

boot1: the service (installed just now) routes the container and both ping each other;
`systemctl restart docker` and a parent flap are repaired; `networkctl reload`,
`networkctl reconfigure vmlan0` and `systemctl restart systemd-networkd` leave the shim and
its route alone with the package's .network file, and what they do without it is measured
(against a user's .network that matches the shim).
boot2: the service came up at boot after docker.service and network-online.target, and the
route and reachability are back with nobody acting.
"""

import re
import sys
import time
from pathlib import Path

import guestlib as g

PARENT = "vmlan0"
SHIM = g.SHIM_PREFIX + PARENT
NET = "vmnet"
C = "vm-c1"
HOST4 = "198.51.100.2"
C4 = "198.51.100.40"
C6 = "2001:db8:a::40"
OURS = Path("/usr/lib/systemd/network/00-macvlan-router.network")
MASK = Path("/etc/systemd/network") / OURS.name
# A user's file that would take the shim: it matches every macvlan link.
USER_FILE = Path("/etc/systemd/network/50-vmtest-macvlan.network")
USER_TEXT = "[Match]\nKind=macvlan\n\n[Network]\nLinkLocalAddressing=no\n"
NETWORKD_ACTIONS = {
    "reload": ["networkctl", "reload"],
    "reconfigure": ["networkctl", "reconfigure", PARENT],
    "restart": ["systemctl", "restart", "systemd-networkd"],
}


def routed():
    return g.routed(SHIM, C4, C6)


def reachable():
    return g.reach_both_ways(C, (C4, C6), (HOST4,))


def repaired_after(t0, what):
    g.wait_until(lambda: g.link(SHIM) and routed(), g.REPAIR,
                 desc=f"{SHIM} and the routes of {C} back after {what}")
    return time.monotonic() - t0


def setup(r):
    with r.check("service-active-after-install") as c:
        g.wait_until(lambda: g.unit_show("macvlan-router", "ActiveState")["ActiveState"]
                     == "active", g.SETTLE, desc="macvlan-router.service active")
        c.detail = g.run("dpkg-query", "-W", "macvlan-router").stdout.strip()
    with r.check("container-routed") as c:
        g.docker("network", "create", "-d", "macvlan", "-o", f"parent={PARENT}",
                 "--subnet", "198.51.100.0/26", "--gateway", "198.51.100.1",
                 "--ip-range", "198.51.100.32/27", "--ipv6", "--subnet", "2001:db8:a::/64",
                 "--gateway", "2001:db8:a::1", NET)
        g.container(C, NET, C4, "--ip6", C6)
        t0 = time.monotonic()
        g.wait_until(routed, g.SETTLE, desc=f"routes to {C4} and {C6} via {SHIM}")
        c.detail = f"{C4} and {C6} via {SHIM} {time.monotonic() - t0:.1f}s after docker run"
    with r.check("reach-both-ways") as c:
        c.detail = reachable()


def docker_restart(r):
    with r.check("docker-restart-repaired") as c:
        g.run("systemctl", "restart", "docker", timeout=g.SETTLE)
        g.wait_until(lambda: g.docker("inspect", "-f", "{{.State.Running}}", C,
                                      check=False).stdout.strip() == "true",
                     g.SETTLE, desc=f"docker to start {C} again")
        took = repaired_after(time.monotonic(), "systemctl restart docker")
        reachable()
        c.detail = f"routes there {took:.2f}s after {C} ran again"


def parent_flap(r):
    with r.check("parent-flap-repaired") as c:
        with g.Watch(C4) as w:
            g.run("ip", "link", "set", PARENT, "down")
            t0 = time.monotonic()
            g.run("ip", "link", "set", PARENT, "up")
            took = repaired_after(t0, f"ip link set {PARENT} down/up")
            w.settle()
        reachable()
        gone = len(w.deleted(f"{C4} dev {SHIM}"))
        c.detail = f"routes back {took:.2f}s after the flap; {w.summary()}; route deleted {gone}x"
        if w.longest > g.REPAIR:
            raise g.CheckError(f"{w.summary()}: longer than {g.REPAIR:.0f}s")


def networkd_actions(r, label):
    """Each networkd action under a ping: the shim and routes must be back within REPAIR;
    returns {action: Watch}."""
    watches = {}
    for name, argv in NETWORKD_ACTIONS.items():
        with r.check(f"networkd-{name}-{label}") as c:
            with g.Watch(C4) as w:
                t0 = time.monotonic()
                g.run(*argv, timeout=g.SETTLE)
                # networkd works after the command returns: watch for a while.
                w.settle(5)
                took = repaired_after(t0, " ".join(argv))
            gone = len(w.deleted(f"{C4} dev {SHIM}"))
            addr_gone = len(w.deleted(SHIM, f"inet {HOST4}"))
            watches[name] = w
            c.detail = (f"{w.summary()}; our route deleted {gone}x, shim address deleted "
                        f"{addr_gone}x; settled {took:.1f}s after `{' '.join(argv)}`")
            if w.longest > g.REPAIR:
                raise g.CheckError(f"{c.detail}: gone longer than {g.REPAIR:.0f}s")
    return watches


def shim_state():
    p = g.run("networkctl", "list", "--no-legend", "--no-pager", SHIM, check=False)
    return " ".join(p.stdout.split()[2:]) if p.returncode == 0 else p.stderr.strip()


def networkd(r):
    with r.check("networkd-file-installed") as c:
        if not OURS.is_file():
            raise g.CheckError(f"{OURS} is not installed by the package")
        g.wait_until(lambda: "unmanaged" in shim_state(), g.SETTLE,
                     desc=f"networkctl to list {SHIM} as unmanaged")
        c.detail = f"{OURS}; networkctl list {SHIM}: {shim_state()}"
    networkd_actions(r, "with-file")
    # A user's file that matches the shim, before and after ours is masked.
    USER_FILE.write_text(USER_TEXT)
    g.run("networkctl", "reload")
    with r.check("networkd-user-file-loses-to-ours") as c:
        time.sleep(3)
        state = shim_state()
        if "unmanaged" not in state:
            raise g.CheckError(f"{USER_FILE.name} took {SHIM}: {state}")
        c.detail = f"{SHIM}: {state}"
    networkd_actions(r, "with-file-and-user-file")
    MASK.symlink_to("/dev/null")
    try:
        g.run("networkctl", "reload")
        time.sleep(5)
        # Measured, not required: what the package's file prevents.
        state = shim_state()
        watches = {}
        for name, argv in NETWORKD_ACTIONS.items():
            with g.Watch(C4) as w:
                g.run(*argv, timeout=g.SETTLE)
                w.settle(5)
            watches[name] = w
            r.ok(f"measured-networkd-{name}-without-file",
                 f"shim {state}; {w.summary()}; our route deleted "
                 f"{len(w.deleted(f'{C4} dev {SHIM}'))}x, shim address deleted "
                 f"{len(w.deleted(SHIM, f'inet {HOST4}'))}x")
    finally:
        MASK.unlink()
        USER_FILE.unlink()
        g.run("networkctl", "reload")
    with r.check("networkd-file-back") as c:
        g.wait_until(lambda: "unmanaged" in shim_state(), g.SETTLE,
                     desc=f"{SHIM} unmanaged again")
        took = repaired_after(time.monotonic(), "the file came back")
        reachable()
        c.detail = f"{SHIM}: {shim_state()}; routes there after {took:.1f}s"


def monotonic(unit, prop):
    return int(g.unit_show(unit, prop)[prop])


def boot_order(r):
    with r.check("started-at-boot-after-docker-and-network-online") as c:
        g.wait_until(lambda: g.unit_show("macvlan-router", "ActiveState")["ActiveState"]
                     == "active", g.SETTLE, desc="macvlan-router.service active")
        start = monotonic("macvlan-router", "ExecMainStartTimestampMonotonic")
        docker_up = monotonic("docker", "ActiveEnterTimestampMonotonic")
        online = monotonic("network-online.target", "ActiveEnterTimestampMonotonic")
        if not (docker_up and online and start):
            raise g.CheckError(f"a timestamp is missing: macvlan-router started {start}, "
                               f"docker active {docker_up}, network-online {online}")
        if not (start >= docker_up and start >= online):
            raise g.CheckError(f"macvlan-router started at {start} us, before docker active "
                               f"at {docker_up} or network-online at {online}")
        # The journal of this boot tells the same story, in order.
        lines = g.journal("-b", "-o", "short-monotonic").splitlines()
        marks = {"online": r"Reached target network-online\.target",
                 "docker": r"Started docker\.service",
                 "mvr": r"Starting macvlan-router\.service"}
        at = {k: next((i for i, line in enumerate(lines) if re.search(v, line)), None)
              for k, v in marks.items()}
        if None in at.values() or not (at["mvr"] > at["docker"] and at["mvr"] > at["online"]):
            raise g.CheckError(f"journal order wrong or incomplete: line numbers {at}")
        c.detail = (f"network-online {online / 1e6:.2f}s, docker {docker_up / 1e6:.2f}s, "
                    f"macvlan-router started {start / 1e6:.2f}s after boot (journal agrees)")


def after_reboot(r):
    g.back_after_reboot(r, "", routed, reachable, C4, f"{C4} and {C6} via {SHIM}",
                        lambda: f"networkctl list {SHIM}: {shim_state()}")


def boot1(r):
    setup(r)
    if not r.failed:
        docker_restart(r)
        parent_flap(r)
        networkd(r)


def boot2(r):
    boot_order(r)
    after_reboot(r)


if __name__ == "__main__":
    sys.exit(g.main("check_macvlan", boot1, boot2))
