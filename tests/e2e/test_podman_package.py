"""The Debian package on a Podman host, under a real systemd: Podman's API socket, the
shipped drop-in for podman.socket, and routes to a Podman macvlan network's containers.

Root only. Runs on each release in e2e.RELEASES whose box carries Podman (its podman,
netavark, aardvark-dns and crun; see e2e_host.py), in a box of its own, booted as
test_deb_package.py's is, with docker.io installed but not followed. In file order, each
test starting from the state the one before it leaves: podman.socket already listening
when the package is installed (postinst gives it the drop-in's group), the one line set
in /etc/default/macvlan-router, a macvlan network on the box's LAN, routes added live and
reachable both ways, latency figures, kept across a restart of the service, removed
when it stops, and (where netavark has its DHCP proxy) a container addressed by a DHCP
server on the LAN peer. Only documentation addresses, only inside the box.
"""

import calendar
import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_host as e2e  # noqa: E402
import test_deb_package as pkg  # noqa: E402  (its helpers; its tests are not collected here)
from test_deb_package import _terminal  # noqa: E402,F401  (autouse: say() shows its figures)

pytestmark = e2e.marks("package e2e tests")

SOCK = "/run/podman/podman.sock"
GROUP = "macvlan-router"
DOCKER_HOST_LINE = f"DOCKER_HOST=unix://{SOCK}"
LAN = pkg.LAN
# Podman has no --aux-address: the host's and the peer's addresses stay out of the range.
NETWORK = "plan"
PEER_NS = "lanpeer"
PEER4, PEER6 = "198.51.100.3", "2001:db8:100::3"
LATENCY_RUNS = 10
# GET /_ping over the socket as a given user and groups; prints the answer's first line.
PING = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('" + SOCK + "'); "
        "s.sendall(b'GET /_ping HTTP/1.0\\r\\n\\r\\n'); "
        "print(s.recv(200).decode().splitlines()[0])")


@pytest.fixture(scope="module")
def built():
    e2e.install_host_tools()
    e2e.sweep_stale()
    t = time.monotonic()
    deb, _ = e2e.build_deb()
    pkg.say(f"built {deb.name} in {time.monotonic() - t:.1f}s")
    return deb


@pytest.fixture(scope="module")
def podman_release(release):
    if "podman" not in release.packages:
        pytest.skip(f"the {release.suite} box carries no Podman")
    return release


@pytest.fixture(scope="module")
def box(podman_release, built):
    release = podman_release
    with e2e.booted_box(release, log=pkg.say) as b:
        b.cp_in(built, f"/root/{built.name}")
        b.deb = built
        # This machine's cgroup v1 devices hierarchy refuses crun's writes ("write file
        # `devices.allow`: Operation not permitted"), in the box too. Its rlimits suit
        # Podman's defaults: no default_ulimits needed here.
        b.sh("mkdir -p /etc/containers/containers.conf.d && printf '[containers]\\n"
             "cgroups = \"disabled\"\\n' > /etc/containers/containers.conf.d/e2e.conf")
        b.sh("mkdir -p /tmp/bb/bin && cp /bin/busybox /tmp/bb/bin/ && "
             "for l in sh sleep ping ip nc; do ln -sf busybox /tmp/bb/bin/$l; done && "
             "tar -C /tmp/bb -c . | podman import - localhost/bb:latest", timeout=300)
        yield b


def as_user(b, user, groups):
    """What GET /_ping on Podman's socket answers to `user` with exactly `groups`."""
    return b.sh(f"setpriv --reuid {user} --regid {groups[0]} --groups {','.join(groups)} "
                f"python3 -c \"{PING}\"", check=False, timeout=30)


def socket_group(b):
    return b.sh(f"stat -c %G {SOCK}").stdout.strip()


def ensure_lan_links(b):
    """The box's LAN: lan0, its peer in a namespace of its own, addresses on both."""
    if getattr(b, "lan_up", False):
        return
    b.sh(f"""set -e
sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0
ip link add {LAN['parent']} type veth peer name {LAN['peer']}
ip netns add {PEER_NS}
ip link set {LAN['peer']} netns {PEER_NS}
ip -n {PEER_NS} link set lo up
ip -n {PEER_NS} addr add {PEER4}/24 dev {LAN['peer']}
ip -n {PEER_NS} -6 addr add {PEER6}/64 dev {LAN['peer']} nodad
ip -n {PEER_NS} link set {LAN['peer']} up
ip addr add {LAN['host']}/24 dev {LAN['parent']}
ip -6 addr add {LAN['host6']}/64 dev {LAN['parent']} nodad
ip link set {LAN['parent']} up
""")
    b.lan_up = True


def ensure_podman_lan(b):
    """The LAN, a Podman macvlan network on it and container p1; returns p1's (ipv4, ipv6)."""
    if getattr(b, "p1", None):
        return b.p1
    ensure_lan_links(b)
    b.sh(f"""set -e
podman network create -d macvlan -o parent={LAN['parent']} \
  --subnet {LAN['subnet']} --gateway {LAN['gateway']} --ip-range {LAN['ip_range']} \
  --ipv6 --subnet {LAN['subnet6']} --gateway {LAN['gateway6']} --ip-range {LAN['ip_range6']} \
  {NETWORK}
""", timeout=120)
    b.p1 = run_container(b, "p1")
    return b.p1


def run_container(b, name):
    """`podman run` a container on the network; returns its (ipv4, ipv6)."""
    # NET_RAW: busybox ping opens a raw socket, and Podman no longer grants it by default.
    b.sh(f"podman run -d --name {name} --network {NETWORK} --cap-add NET_RAW "
         "localhost/bb:latest "
         "sh -c \"trap 'exit 0' TERM; sleep 100000 & wait\"", timeout=120)
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}}{{end}}"
    addrs = b.sh(f"podman inspect -f '{fmt}' {name}").stdout.split()
    assert len(addrs) == 2, addrs
    return tuple(addrs)


def has_route(b, addr):
    return any(re.match(rf"{re.escape(addr)} dev {pkg.SHIM}\b", r) for r in pkg.owned_routes(b))


def wait_routes(b, addrs, present=True, timeout=30):
    """Until every address in `addrs` has (or has not) its route via the shim; the
    service's journal in the failure."""
    desc = f"routes to {' '.join(addrs)} {'present' if present else 'gone'}"
    try:
        e2e.wait_until(lambda: all(has_route(b, a) == present for a in addrs), timeout,
                       interval=0.05, desc=desc)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nroutes: {pkg.owned_routes(b)}\n"
                             f"journal:\n{b.journal(extra='-n 40')}") from None


def test_install_gives_the_running_podman_socket_to_the_service_group(box):
    # Podman's socket already listens when the package comes: no restart may be needed.
    box.sh("systemctl enable --now podman.socket")
    assert socket_group(box) == "root", box.sh(f"ls -l {SOCK}").stdout
    p = box.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y /root/{box.deb.name}",
               check=False, timeout=300)
    assert p.returncode == 0, f"apt install failed:\n{p.stdout}\n{p.stderr}"
    assert f"chgrp {GROUP} {SOCK}" in p.stdout, p.stdout
    pkg.wait_active(box)
    assert box.show("podman.socket", "SocketGroup", "SocketMode") == \
        {"SocketGroup": GROUP, "SocketMode": "0660"}
    assert socket_group(box) == GROUP
    assert box.sh("stat -c '%a %G' /run/podman").stdout.split() == ["710", GROUP]
    assert "podman.socket.d/macvlan-router.conf" in box.sh("systemctl cat podman.socket").stdout
    out = box.sh("systemd-analyze verify podman.socket 2>&1", check=False).stdout.strip()
    assert not out, f"systemd-analyze verify podman.socket with the drop-in:\n{out}"
    # The service's user with its own group alone reaches Podman; a member of docker does not.
    ok = as_user(box, GROUP, [GROUP])
    assert ok.returncode == 0 and " 200 " in ok.stdout, ok.stdout + ok.stderr
    denied = as_user(box, "nobody", ["nogroup", "docker"])
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, \
        denied.stdout + denied.stderr


def test_restarted_podman_socket_keeps_the_group(box):
    # Bound afresh (a reboot, an upgrade of podman), the socket gets the drop-in's group.
    box.sh("chgrp root /run/podman && chmod 0700 /run/podman && "
           "systemctl restart podman.socket")
    assert socket_group(box) == GROUP
    assert box.sh("stat -c '%a %G' /run/podman").stdout.split() == ["710", GROUP]
    assert box.sh(f"stat -c %a {SOCK}").stdout.strip() == "660"


def test_one_line_in_the_default_file_serves_podman(box):
    # The LAN exists before the service starts, as a host's interfaces do: a parent
    # created while the daemon runs is not seen until the next resync (the netlink
    # filter drops links it does not watch yet).
    ensure_lan_links(box)
    box.sh(f"echo '{DOCKER_HOST_LINE}' >> /etc/default/macvlan-router && "
           f"systemctl restart {pkg.UNIT}")
    pkg.wait_active(box)
    t = time.monotonic()
    ip4, ip6 = ensure_podman_lan(box)
    wait_routes(box, (ip4, ip6))
    pkg.say(f"podman network create + run -> both routes present: {time.monotonic() - t:.1f}s")
    pkg.box_ping(box, ip4)
    pkg.box_ping(box, ip6)
    # And from the container to the host (over IPv6 at the shim's own address: the
    # host's is never put on the shim, see README) and to the LAN peer.
    shim6 = box.sh(f"ip -6 -o addr show dev {pkg.SHIM} scope global").stdout.split()[3]
    for addr in (LAN["host"], shim6.split("/")[0], PEER4, PEER6):
        p = box.sh(f"podman exec p1 ping -c 1 -W 2 {addr}", check=False, timeout=30)
        assert p.returncode == 0, f"p1 -> {addr}: {p.stdout}{p.stderr}"
    journal = box.journal()
    assert "Podman" in journal and "permission denied" not in journal.lower(), journal[-3000:]


def test_a_container_started_later_gets_its_route_and_loses_it_on_rm(box):
    ensure_podman_lan(box)
    t = time.monotonic()
    ip4, _ = run_container(box, "p2")
    wait_routes(box, (ip4,))
    pkg.say(f"podman run returned -> route present: {time.monotonic() - t:.2f}s")
    pkg.box_ping(box, ip4)
    box.sh("podman rm -f -t 0 p2", timeout=60)
    wait_routes(box, (ip4,), present=False)


def _instant(text):
    """Seconds since the epoch of `ip -ts`'s "[2026-11-28T08:28:28.123456]" (the box's
    clock is UTC)."""
    m = re.search(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(?:\.(\d+))?", text)
    assert m, text
    whole = calendar.timegm(time.strptime(f"{m[1]} {m[2]}", "%Y-%m-%d %H:%M:%S"))
    return whole + float(f"0.{m[3] or 0}")


# A subscriber to Podman's events as the daemon is one (docker-py on the socket): when
# each container start and death reaches it, next to the event's own timeNano.
SUBSCRIBER = """import json, sys, time, docker
api = docker.APIClient(base_url="unix://%s", version="auto")
for e in api.events(decode=True, filters={"type": ["container"], "event": ["start", "died"]}):
    print(json.dumps([e.get("Action"), e.get("Actor", {}).get("Attributes", {}).get("name"),
                      e.get("timeNano"), time.time()]), flush=True)
""" % SOCK


def test_latency_from_podman_events_to_the_route(box):
    """Figures, not a target, measured as tests/bench.py measures them: from the event's
    own timeNano to the route's netlink notification (`ip -ts monitor` in the box), and
    of that, the time Podman takes to deliver the event to a subscriber; LATENCY_RUNS
    containers one at a time, with journald as Podman's events backend."""
    ensure_podman_lan(box)
    box.write("/root/subscriber.py", SUBSCRIBER)
    box.sh("rm -f /root/routes.mon /root/events.log")
    box.sh("setsid timeout 600 ip -ts -o monitor route > /root/routes.mon 2>&1 < /dev/null & "
           "echo $! > /root/routes.pid")
    box.sh("setsid timeout 600 python3 /root/subscriber.py > /root/events.log 2>&1 "
           "< /dev/null & echo $! > /root/events.pid")
    time.sleep(2)
    addresses = []
    for n in range(LATENCY_RUNS):
        name = f"l{n}"
        ip4, _ = run_container(box, name)
        wait_routes(box, (ip4,))
        box.sh(f"podman stop -t 5 {name}", timeout=60)
        wait_routes(box, (ip4,), present=False)
        box.sh(f"podman rm -f -t 0 {name}", timeout=60)
        addresses.append((name, ip4))
    time.sleep(1)
    box.sh("kill $(cat /root/routes.pid) $(cat /root/events.pid)", check=False)
    monitor = box.sh("cat /root/routes.mon").stdout.splitlines()
    events = {}
    for line in box.sh("cat /root/events.log").stdout.splitlines():
        if line.startswith("["):
            action, name, nano, received = json.loads(line)
            events.setdefault((name, "die" if action in ("die", "died") else action),
                              (int(nano) / 1e9, received))
    # In order: an address freed by one run may be handed out again in the next.
    routes = iter(line for line in monitor if re.search(rf" dev {pkg.SHIM}\b", line))

    def seen(ip4, deleted):
        prefix = f"Deleted {ip4} " if deleted else f"{ip4} "
        return next(_instant(line) for line in routes
                    if line.split("] ", 1)[-1].startswith(prefix))

    figures = {"start event -> route present": [], "died event -> route gone": [],
               "of which Podman delivering the event": []}
    for name, ip4 in addresses:
        for action, deleted, what in (("start", False, "start event -> route present"),
                                      ("die", True, "died event -> route gone")):
            assert (name, action) in events, f"no {action} event of {name} reached " \
                f"the subscriber: {box.sh('cat /root/events.log').stdout[-2000:]}"
            at, received = events[(name, action)]
            figures[what].append(1000 * (seen(ip4, deleted) - at))
            figures["of which Podman delivering the event"].append(1000 * (received - at))
    for what, ms in figures.items():
        ms.sort()
        pkg.say(f"{what} over {len(ms)}: p50 {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms")


def test_restart_keeps_routes(box):
    ip4, _ = ensure_podman_lan(box)
    routes = pkg.owned_routes(box)
    with e2e.Watch(box, ip4) as watch:
        box.sh(f"systemctl restart {pkg.UNIT}")
        pkg.wait_active(box)
        watch.wait_replies(100)
    pkg.assert_nothing_dropped(box, watch, routes, "systemctl restart")


def test_stop_removes_shim_and_routes(box):
    ip4, _ = ensure_podman_lan(box)
    box.sh(f"systemctl stop {pkg.UNIT}")
    assert not pkg.shim_exists(box), f"{pkg.SHIM} still there after stop"
    assert not pkg.owned_routes(box), pkg.owned_routes(box)
    box.sh(f"systemctl start {pkg.UNIT}")
    pkg.wait_active(box)
    pkg.box_ping(box, ip4)


UDHCPD_CONF = f"""start 198.51.100.200
end 198.51.100.250
interface {LAN['peer']}
lease_file /root/udhcpd.leases
option subnet 255.255.255.0
option lease 600
"""


def test_dhcp_addressed_container_gets_its_route(box):
    # Podman 5 with netavark's DHCP proxy: a macvlan network without a subnet takes its
    # containers' addresses from the LAN's DHCP server (busybox udhcpd on the peer).
    if "dhcp-proxy" not in box.sh("/usr/lib/podman/netavark --help").stdout:
        pytest.skip(f"{box.release.suite}'s netavark has no dhcp-proxy command, so no "
                    "DHCP for macvlan networks")
    ensure_podman_lan(box)
    box.write("/root/udhcpd.conf", UDHCPD_CONF)
    box.sh(f"touch /root/udhcpd.leases && setsid timeout 600 ip netns exec {PEER_NS} "
           "busybox udhcpd -f /root/udhcpd.conf > /root/udhcpd.log 2>&1 < /dev/null &")
    box.sh("systemctl enable --now netavark-dhcp-proxy.socket")
    box.sh(f"podman network create -d macvlan -o parent={LAN['parent']} --ipam-driver dhcp "
           "pdhcp")
    box.sh("podman run -d --name d1 --network pdhcp --cap-add NET_RAW localhost/bb:latest "
           "sh -c \"trap 'exit 0' TERM; sleep 100000 & wait\"", timeout=120)
    ip4 = box.sh("podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}"
                 "{{end}}' d1").stdout.strip()
    assert ip4.startswith("198.51.100.2"), (ip4, box.sh("cat /root/udhcpd.log").stdout)
    wait_routes(box, (ip4,))
    pkg.box_ping(box, ip4)
    p = box.sh(f"podman exec d1 ping -c 1 -W 2 {LAN['host']}", check=False, timeout=30)
    assert p.returncode == 0, f"d1 -> {LAN['host']}: {p.stdout}{p.stderr}"
    box.sh("podman rm -f -t 0 d1", timeout=60)
    wait_routes(box, (ip4,), present=False)
