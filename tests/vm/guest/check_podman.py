"""A rootful Podman host, served through Podman's API socket as a user sets it up: Debian
13's podman, netavark and crun, `podman.socket` enabled, the one line
DOCKER_HOST=unix:///run/podman/podman.sock in /etc/default/macvlan-router and
`systemctl restart macvlan-router`.

One service follows one engine: this check switches it to Podman and back to Docker, so
runner.py runs it after every other check file (their Docker containers lose their routes
while it follows Podman), and it proves their routes come back after the switch back.

Parents (dummies made here in boot1, before the switch: the daemon sees links that exist
when it starts): podip0 (198.51.100.194/28, 2001:db8:d::2/64) for the ipvlan network
podipnet (mode l2, netavark's default; its shim needs an address of its own,
MACVLAN_BRIDGE_IP=198.51.100.196), podmv0 (198.51.100.210/28) for the macvlan network
podmvnet. Containers pod-ip1, pod-mv1, without a restart policy.

boot1: podman.socket comes up with the package's drop-in (group macvlan-router); the service
follows Podman; containers started afterwards are routed (the ipvlan shim an ipvlan l2
child with its own address), reachable both ways; back on Docker, the Podman shims and
routes are gone and every route of the other check files is back and reachable.
boot2: nothing of Podman is needed after the reboot (its containers had no restart policy,
its parents are gone): the socket comes up at boot with the drop-in's group, the service
follows Docker, and no shim or route of the Podman networks came back.
"""

import sys
import time

import guestlib as g

SOCK = "/run/podman/podman.sock"
DOCKER_HOST_LINE = f"DOCKER_HOST=unix://{SOCK}"
GROUP = "macvlan-router"
IMAGE = "localhost/bb:latest"
SHIM4 = "198.51.100.196"
# name: (driver, parent, host addresses on the parent, podman network create options,
#        container, its addresses, where the container reaches the host)
NETS = {
    "podipnet": ("ipvlan", "podip0", ("198.51.100.194/28", "2001:db8:d::2/64"),
                 ("--subnet", "198.51.100.192/28", "--gateway", "198.51.100.193",
                  "--ip-range", "198.51.100.200/29", "--ipv6", "--subnet", "2001:db8:d::/64",
                  "--gateway", "2001:db8:d::1", "--ip-range", "2001:db8:d::200/125"),
                 "pod-ip1", ("198.51.100.200", "2001:db8:d::200"),
                 ("198.51.100.194", SHIM4)),
    "podmvnet": ("macvlan", "podmv0", ("198.51.100.210/28",),
                 ("--subnet", "198.51.100.208/28", "--gateway", "198.51.100.209",
                  "--ip-range", "198.51.100.216/29"),
                 "pod-mv1", ("198.51.100.216",), ("198.51.100.210",)),
}


def shim(net):
    return g.SHIM_PREFIX + NETS[net][1]


def routed(net):
    return g.routed(shim(net), *NETS[net][5])


def podman(*args, check=True, timeout=g.SETTLE):
    return g.run("podman", *args, check=check, timeout=timeout)


def pod_ping(container, addr, timeout=2):
    fam = "-6" if ":" in addr else "-4"
    return podman("exec", container, "ping", fam, "-c", "1", "-W", str(timeout), addr,
                  check=False, timeout=timeout + 30).returncode == 0


def reachable(net):
    _, _, _, _, c, addrs, hosts = NETS[net]
    return g.reach_both_ways(c, addrs, hosts, pod_ping)


def kind(net):
    info = (g.link(shim(net)) or {}).get("linkinfo", {})
    mode = info.get("info_data", {}).get("mode")
    return f"{info.get('info_kind')} mode {mode}"


def socket_access():
    """The socket's and its directory's mode and group, as the drop-in sets them."""
    return g.run("stat", "-c", "%a %G", SOCK, "/run/podman").stdout.split()


def follow(engine):
    """Put in (Podman) or take out (Docker) the DOCKER_HOST line and the ipvlan shim's
    address, restart the service; returns (seconds the restart took, its start line)."""
    lines = [x for x in g.CONFIG.read_text().splitlines() if x != DOCKER_HOST_LINE]
    podman_ = engine == "Podman"
    g.CONFIG.write_text("\n".join(lines + [DOCKER_HOST_LINE] * podman_) + "\n")
    (g.config_add if podman_ else g.config_remove)("MACVLAN_BRIDGE_IP", SHIM4, apply=False)
    t0 = time.monotonic()
    g.run("systemctl", "restart", "macvlan-router", timeout=g.SETTLE)
    g.wait_until(lambda: g.unit_show("macvlan-router", "ActiveState")["ActiveState"]
                 == "active", g.SETTLE, desc="macvlan-router.service active")
    took = time.monotonic() - t0
    started = [x for x in g.journal("-u", "macvlan-router", "-o", "cat", "-n", "500")
               .splitlines() if x.startswith("macvlan-router starting:")]
    if not started or f" {engine} at " not in started[-1]:
        raise g.CheckError(f"the service did not start following {engine}: "
                           f"{started[-1:] or 'no start line in its journal'}")
    return took, started[-1]


def setup(r):
    with r.check("podman-socket-with-dropin") as c:
        for net, (_, parent, hosts, _, _, _, _) in NETS.items():
            g.run("ip", "link", "add", parent, "type", "dummy")
            for h in hosts:
                nodad = ["nodad"] if ":" in h else []
                g.run("ip", "address", "add", h, "dev", parent, *nodad)
            g.run("ip", "link", "set", parent, "up")
        g.run("systemctl", "enable", "--now", "podman.socket", timeout=g.SETTLE)
        access = socket_access()
        if access != ["660", GROUP, "710", GROUP]:
            raise g.CheckError(f"{SOCK} and /run/podman: {access}; want 660 and 710, group "
                               f"{GROUP} (podman.socket.d/macvlan-router.conf)")
        c.detail = f"{SOCK} 660, /run/podman 710, group {GROUP}"
    with r.check("podman-networks") as c:
        g.sh(f"""set -e
d=$(mktemp -d); mkdir -p $d/bin; cp /bin/busybox $d/bin/busybox
for l in {' '.join(g.BUSYBOX_LINKS)}; do ln -s busybox $d/bin/$l; done
tar -C $d -c . | podman import - {IMAGE} >/dev/null; rm -rf $d""", timeout=g.SETTLE)
        for net, (driver, parent, _, options, _, _, _) in NETS.items():
            podman("network", "create", "-d", driver, "-o", f"parent={parent}", *options, net)
        c.detail = podman("version", "--format", "podman {{.Client.Version}}").stdout.strip()


def on_podman(r):
    with r.check("podman-followed") as c:
        took, line = follow("Podman")
        c.detail = f"{DOCKER_HOST_LINE}, restarted in {took:.1f}s: {line}"
    for net, (driver, parent, _, _, cname, addrs, _) in NETS.items():
        with r.check(f"{net}-routed") as c:
            ip_opts = [f"--ip{'6' if ':' in a else ''}={a}" for a in addrs]
            t0 = time.monotonic()
            podman("run", "-d", "--name", cname, "--network", net, *ip_opts, "--cap-add",
                   "NET_RAW", IMAGE, "sh", "-c", "trap 'exit 0' TERM; sleep 1000000 & wait")
            t1 = time.monotonic()
            g.wait_until(lambda: routed(net), g.SETTLE,
                         desc=f"routes to {', '.join(addrs)} via {shim(net)}")
            c.detail = (f"{', '.join(map(g.host_prefix, addrs))} via {shim(net)} "
                        f"{time.monotonic() - t1:.1f}s after podman run returned "
                        f"({t1 - t0:.1f}s)")
        with r.check(f"{net}-shim-kind") as c:
            want = "ipvlan mode l2" if driver == "ipvlan" else "macvlan mode bridge"
            if kind(net) != want:
                raise g.CheckError(f"{shim(net)} is {kind(net)}, want {want}: "
                                   f"{g.link(shim(net))}")
            if driver == "ipvlan" and SHIM4 not in g.addresses(shim(net)):
                raise g.CheckError(f"{shim(net)} lacks its own address {SHIM4}: "
                                   f"{g.addresses(shim(net))}")
            c.detail = f"{shim(net)}: {want} on {parent}, addresses {g.addresses(shim(net))}"
        with r.check(f"{net}-reach-both-ways") as c:
            c.detail = reachable(net)


def back_on_docker(r, docker_routes):
    with r.check("podman-left-docker-routes") as c:
        left = {d: v for d, v in g.routes().items() if docker_routes.get(d) == v}
        # Measured: following Podman, the daemon owns Docker's shims and routes but has no
        # network for them.
        c.detail = (f"{len(left)} of Docker's {len(docker_routes)} routes stayed while "
                    "Podman was followed")
    with r.check("back-on-docker") as c:
        took, line = follow("Docker")
        t0 = time.monotonic()
        g.wait_until(lambda: docker_routes.items() <= g.routes().items(), g.SETTLE,
                     desc=f"Docker's routes back: {sorted(docker_routes)}")
        back = time.monotonic() - t0
        for d in docker_routes:
            addr = d.split("/")[0]
            g.wait_until(lambda: g.ping(addr), g.SETTLE, desc=f"host -> {addr}")
        c.detail = (f"restarted in {took:.1f}s ({line}); all {len(docker_routes)} routes "
                    f"of the other checks back {back:.1f}s later, each address answers the "
                    "host's ping")
    with r.check("podman-shims-gone-on-docker") as c:
        c.detail = leftovers()


def leftovers():
    """Raises if a Podman network's shim or route is there; says what is not."""
    found = {shim(n): g.link(shim(n)) is not None for n in NETS}
    ours = g.routes()
    found.update({g.host_prefix(a): g.host_prefix(a) in ours
                  for n in NETS for a in NETS[n][5]})
    there = [k for k, v in found.items() if v]
    if there:
        raise g.CheckError(f"still there: {there}")
    return f"none of {', '.join(found)}"


def after_reboot(r):
    with r.check("podman-socket-at-boot-with-dropin") as c:
        g.wait_until(lambda: g.unit_show("podman.socket", "ActiveState")["ActiveState"]
                     == "active", g.SETTLE, desc="podman.socket active")
        access = socket_access()
        if access != ["660", GROUP, "710", GROUP]:
            raise g.CheckError(f"{SOCK} and /run/podman: {access}")
        c.detail = f"podman.socket active; {SOCK} 660, /run/podman 710, group {GROUP}"
    with r.check("docker-followed-after-reboot") as c:
        if DOCKER_HOST_LINE in g.CONFIG.read_text().splitlines():
            raise g.CheckError(f"{g.CONFIG} still has {DOCKER_HOST_LINE}")
        state = g.unit_show("macvlan-router", "ActiveState")["ActiveState"]
        if state != "active":
            raise g.CheckError(f"macvlan-router.service is {state}")
        states = podman("ps", "-a", "--format", "{{.Names}}={{.State}}").stdout.split()
        c.detail = f"macvlan-router active; Podman containers: {' '.join(sorted(states))}"
    with r.check("podman-nothing-back-after-reboot") as c:
        c.detail = leftovers()


def boot1(r):
    setup(r)
    if r.failed:
        return
    docker_routes = g.routes()
    try:
        on_podman(r)
    finally:
        back_on_docker(r, docker_routes)


def boot2(r):
    after_reboot(r)


if __name__ == "__main__":
    sys.exit(g.main("check_podman", boot1, boot2))
