"""The Debian package end to end: build, lint, and run it under a real systemd.

Root only. Builds the .deb with debian/build-deb (what `make deb` runs), checks it with
lintian and systemd-analyze, then installs it with apt on each release in e2e.RELEASES
(debootstrapped Debian 12 and 13, each with its own docker.io and libraries) booted
with systemd as PID 1 in docker-in-docker (see e2e_host.py; DESIGN.md section 4), and
checks what a user does: the service runs, a macvlan container is reachable from the host,
the journal says what happened, reload/stop/watchdog/bad configuration behave, purge leaves
nothing behind. Only documentation addresses are used, and only inside the box.

The tests run in file order and share one box per release (module fixtures, the release a
parameter from conftest.py): each later test starts from the state the one before it
leaves, and says so. The static checks run once.
"""

import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_host as e2e  # noqa: E402

pytestmark = e2e.marks("package e2e tests")

UNIT = "macvlan-router"
SHIM = "mvr-lan0"
LAN = dict(parent="lan0", peer="lanpeer0", subnet="198.51.100.0/24", gateway="198.51.100.1",
           ip_range="198.51.100.128/25", host="198.51.100.2",
           subnet6="2001:db8:100::/64", gateway6="2001:db8:100::1",
           ip_range6="2001:db8:100::1:0/112", host6="2001:db8:100::2")
EXTRA_ROUTE = "203.0.113.0/24"
WATCHDOG_BOUND = 30 + 5 + 25        # WatchdogSec + RestartSec + slack


_reporter = None


@pytest.fixture(scope="module", autouse=True)
def _terminal(pytestconfig):
    global _reporter
    _reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    yield
    _reporter = None


def say(msg):
    """Progress and measurements, shown even when pytest captures output."""
    capman = _reporter and _reporter.config.pluginmanager.getplugin("capturemanager")
    if capman:
        with capman.global_and_fixture_disabled():
            _reporter.write_line(f"e2e: {msg}")
    else:
        print(f"e2e: {msg}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def host_tools():
    e2e.install_host_tools()
    e2e.sweep_stale()


@pytest.fixture(scope="module")
def built(host_tools):
    t = time.monotonic()
    deb, changes = e2e.build_deb()
    say(f"built {deb.name} in {time.monotonic() - t:.1f}s")
    return deb, changes


@pytest.fixture(scope="module")
def newer(host_tools):
    """The same code as a higher version: what an upgrade installs over the package."""
    with tempfile.TemporaryDirectory(prefix="mvr-e2e-newer-") as d:
        tree, version = e2e.newer_source(Path(d) / "src")
        t = time.monotonic()
        deb, _ = e2e.build_deb(tree, nocheck=True)
        say(f"built {deb.name} in {time.monotonic() - t:.1f}s")
        yield deb, version


@pytest.fixture(scope="module")
def unpacked(built):
    with tempfile.TemporaryDirectory(prefix="mvr-e2e-deb-") as d:
        e2e.run(["dpkg-deb", "-x", built[0], d])
        yield Path(d)


# --------------------------------------------------------------------------- static checks

def test_lintian_is_clean(built):
    deb, changes = built
    p = e2e.run(["lintian", "--fail-on", "error,warning", "--display-info", changes],
                check=False, timeout=600, env=e2e.debian_env())
    say(f"lintian:\n{p.stdout.strip() or '(no tags)'}")
    assert p.returncode == 0, f"lintian failed:\n{p.stdout}\n{p.stderr}"


def test_package_contents(unpacked):
    units = e2e.unit_dir()
    for path in ("etc/default/macvlan-router", f"{units}/macvlan-router.service",
                 f"{units}/podman.socket.d/macvlan-router.conf",
                 "etc/iproute2/rt_protos.d/macvlan-router.conf",
                 "usr/lib/NetworkManager/conf.d/macvlan-router.conf",
                 "usr/lib/sysusers.d/macvlan-router.conf",
                 "usr/share/man/man8/macvlan-router.8.gz", "usr/bin/macvlan-router"):
        assert (unpacked / path).is_file(), f"{path} missing from the package"
    default = (unpacked / "etc/default/macvlan-router").read_text()
    for key in ("MACVLAN_DOCKER_NETWORK", "MACVLAN_BRIDGE_IP", "MACVLAN_BRIDGE_IP6",
                "MACVLAN_BRIDGE_INTERFACE_NAME", "ADDITIONAL_ROUTES", "CLEANUP_ON_EXIT",
                "RESYNC_INTERVAL", "LOG_LEVEL", "DEBUG", "DOCKER_HOST"):
        assert re.search(rf"^#{key}=", default, re.M), f"{key} not listed in the default file"
    assert not [line for line in default.splitlines() if line.strip()
                and not line.lstrip().startswith("#")], "the default file sets a key"
    protos = (unpacked / "etc/iproute2/rt_protos.d/macvlan-router.conf").read_text()
    assert re.search(r"^210\s+macvlan-router$", protos, re.M)


def test_man_page_renders_without_warnings(unpacked):
    page = unpacked / "usr/share/man/man8/macvlan-router.8.gz"
    p = e2e.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", page],
                check=False, env=e2e.debian_env(MANWIDTH="80"))
    assert p.returncode == 0 and not p.stderr.strip(), f"man warnings:\n{p.stderr}"
    text = e2e.run(["man", "-l", page], env=e2e.debian_env(MANWIDTH="80")).stdout
    for word in ("run", "check", "status", "cleanup", "EXIT STATUS", "78", "69", "77",
                 "MACVLAN_BRIDGE_IP", "/etc/default/macvlan-router"):
        assert word in text, f"the man page does not mention {word}"


def test_systemd_analyze_verify(unpacked):
    unit = unpacked / e2e.unit_dir() / "macvlan-router.service"
    p = e2e.run(["systemd-analyze", "verify", unit], check=False,
                env=e2e.debian_env(MANPATH=str(unpacked / "usr/share/man")))
    out = (p.stdout + p.stderr).strip().splitlines()
    # The command is not installed on this machine; verify inside the box checks it too.
    if not Path("/usr/bin/macvlan-router").exists():
        out = [line for line in out
               if "Command /usr/bin/macvlan-router is not executable" not in line]
    assert not out, "systemd-analyze verify:\n" + "\n".join(out)


def test_systemd_analyze_security_exposure(unpacked):
    unit = unpacked / e2e.unit_dir() / "macvlan-router.service"
    p = e2e.run(["systemd-analyze", "security", "--offline=true", "--no-pager", unit],
                check=False, env=e2e.debian_env())
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout + p.stderr)
    assert m, f"no exposure level in:\n{p.stdout}\n{p.stderr}"
    exposure = float(m.group(1))
    say(f"systemd-analyze security --offline=true exposure: {exposure}")
    assert exposure <= 1.8


# --------------------------------------------------------------------------- real systemd

@pytest.fixture(scope="module")
def box(built, release):
    deb = built[0]
    with e2e.booted_box(release, log=say) as b:
        b.cp_in(deb, f"/root/{deb.name}")
        b.cp_in(e2e.REPO_ROOT / "debian" / "tests", "/root/autopkgtest")
        b.sh("mkdir -p /tmp/bb/bin && cp /bin/busybox /tmp/bb/bin/ && "
             "for l in sh sleep ping ip nc; do ln -sf busybox /tmp/bb/bin/$l; done")
        e2e.wait_until(lambda: b.sh("docker info", check=False, timeout=30).returncode == 0,
                       60, interval=1, desc="the box's own dockerd")
        b.sh("tar -C /tmp/bb -c . | docker import - bb:latest")
        b.deb = deb
        yield b


def ip_json(b, args):
    import json
    p = b.sh(f"ip -j {args}", check=False)
    return json.loads(p.stdout or "[]") if p.returncode == 0 else []


def owned_routes(b):
    """Routes with our protocol in any table (`ip` leaves the proto out when filtering)."""
    p = b.sh("ip -4 route show table all proto 210; ip -6 route show table all proto 210")
    return [line for line in p.stdout.splitlines() if line.strip()]


def shim_exists(b):
    return b.sh(f"ip link show {SHIM}", check=False).returncode == 0


def wait_active(b, timeout=60):
    return e2e.wait_until(
        lambda: b.sh(f"systemctl is-active {UNIT}", check=False).stdout.strip() == "active",
        timeout, desc=f"{UNIT} to be active")


def box_ping(b, addr, count_deadline=30):
    flag = "-6 " if ":" in addr else ""
    return e2e.wait_until(
        lambda: b.sh(f"busybox ping {flag}-c 1 -W 1 {addr}", check=False,
                     timeout=10).returncode == 0,
        count_deadline, interval=0.5, desc=f"host -> {addr} ping")


def install(b):
    t = time.monotonic()
    p = b.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y /root/{b.deb.name}",
             check=False, timeout=300)
    say(f"apt install in the box took {time.monotonic() - t:.1f}s")
    assert p.returncode == 0, f"apt install failed:\n{p.stdout}\n{p.stderr}"
    wait_active(b)


def ensure_installed(b):
    """For a test run on its own (-k): the package installed and the service running."""
    if b.sh("dpkg -s macvlan-router", check=False).returncode != 0:
        install(b)


def ensure_lan(b):
    """The box's LAN, a macvlan network on it and a container; returns (ipv4, ipv6)."""
    if getattr(b, "c1", None):
        return b.c1
    lan = LAN
    b.sh(f"""set -e
# Docker turns IPv6 off in a --network none container; a real host has it.
sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0
ip link add {lan['parent']} type veth peer name {lan['peer']}
ip link set {lan['peer']} up
ip addr add {lan['host']}/24 dev {lan['parent']}
ip -6 addr add {lan['host6']}/64 dev {lan['parent']} nodad
ip link set {lan['parent']} up
docker network create -d macvlan -o parent={lan['parent']} \
  --subnet {lan['subnet']} --gateway {lan['gateway']} --ip-range {lan['ip_range']} \
  --aux-address host={lan['host']} \
  --ipv6 --subnet {lan['subnet6']} --gateway {lan['gateway6']} --ip-range {lan['ip_range6']} \
  --aux-address host6={lan['host6']} lan
docker run -d --name c1 --restart always --network lan bb:latest sleep 100000
""")
    b.c1 = c1_addresses(b)
    return b.c1


def c1_addresses(b):
    addrs = b.sh("docker inspect -f '{{range .NetworkSettings.Networks}}"
                 "{{.IPAddress}} {{.GlobalIPv6Address}}{{end}}' c1").stdout.split()
    assert len(addrs) == 2, addrs
    return tuple(addrs)


def main_pid(b):
    pid = b.show(UNIT, "MainPID")["MainPID"]
    assert pid != "0", f"{UNIT} has no main process"
    return pid


def wait_restarted(b, before, timeout=60):
    """Until systemd has started a new daemon by itself (Restart=) after `before`'s."""
    e2e.wait_until(
        lambda: (lambda s: s["MainPID"] not in ("0", before["MainPID"])
                 and s["ActiveState"] == "active"
                 and int(s["NRestarts"]) > int(before["NRestarts"]))(
            b.show(UNIT, "MainPID", "ActiveState", "NRestarts")),
        timeout, interval=1, desc="systemd to restart the daemon")


def journal_mark(b):
    return len(b.journal().splitlines())


def journal_since(b, mark):
    return "\n".join(b.journal().splitlines()[mark:])


# Logged by the daemon on SIGTERM and by ExecStopPost=, each after asking systemd for the job.
KEPT_FOR_RESTART = re.compile(
    rf"^restarting: keeping {SHIM} and its \d+ routes for the next start$", re.M)
KEPT_AFTER_CRASH = re.compile(
    rf"^{re.escape(UNIT)}\.service ended without a stop job \(.*\): keeping {SHIM} and its "
    r"\d+ routes for the next start; `macvlan-router cleanup` removes them$", re.M)
REMOVAL = re.compile(r"^ip .*\bdel\b", re.M)


def assert_nothing_dropped(b, watch, routes_before, what):
    """No ping lost, nothing of ours deleted even for a moment, every route still there
    (an IPv6 route whose source was still in duplicate address detection may join)."""
    say(f"{what}: {watch.replied} pings answered, {len(watch.lost)} lost")
    assert watch.lost == [], \
        f"{what}: {len(watch.lost)} pings lost (sequence numbers {watch.lost[:20]}...)"
    assert not watch.deleted(SHIM), f"{what} deleted:\n" + "\n".join(watch.deleted(SHIM))
    missing = set(routes_before) - set(owned_routes(b))
    assert not missing, f"{what}: routes gone: {sorted(missing)}"


def test_install_with_apt_starts_the_service(box):
    install(box)
    enabled = box.sh(f"systemctl is-enabled {UNIT}", check=False).stdout.strip()
    assert enabled == "enabled"
    props = box.show(UNIT, "User", "Type", "NRestarts", "StatusText")
    assert props["User"] == "macvlan-router" and props["Type"] == "notify"
    # Runs as its own user with only CAP_NET_ADMIN, in group docker.
    pid = box.show(UNIT, "MainPID")["MainPID"]
    status = box.sh(f"cat /proc/{pid}/status").stdout
    caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}
    assert caps["CapEff"] == 1 << 12 and caps["CapBnd"] == 1 << 12, caps   # CAP_NET_ADMIN
    groups = box.sh(f"ps -o group=,supgrp= -p {pid}").stdout
    assert "docker" in groups, groups


def test_verify_and_autopkgtest_in_the_box(box):
    ensure_installed(box)
    out = box.sh("systemd-analyze verify /lib/systemd/system/macvlan-router.service 2>&1",
                 check=False).stdout.strip()
    assert not out, f"systemd-analyze verify on the installed unit:\n{out}"
    # The autopkgtest scripts of debian/tests, run as autopkgtest would on the testbed.
    control = (e2e.REPO_ROOT / "debian/tests/control").read_text()
    names = [n for line in re.findall(r"^Tests:\s*(.+)$", control, re.M)
             for n in line.replace(",", " ").split()]
    assert names
    for name in names:
        p = box.sh(f"cd /tmp && AUTOPKGTEST_TMP=$(mktemp -d) /root/autopkgtest/{name}",
                   check=False, timeout=120)
        assert p.returncode == 0, f"autopkgtest {name} failed:\n{p.stdout}\n{p.stderr}"


def test_container_reachable_from_host(box):
    ensure_installed(box)
    ip4, ip6 = ensure_lan(box)
    box_ping(box, ip4)
    box_ping(box, ip6)
    # rt_protos.d names our protocol: `ip route` prints "proto macvlan-router".
    routes = box.sh("ip -4 route show; ip -6 route show").stdout
    assert re.search(rf"^{re.escape(ip4)} dev {SHIM} proto macvlan-router", routes, re.M), routes
    assert re.search(rf"^{re.escape(ip6)} dev {SHIM} proto macvlan-router", routes, re.M), routes
    # arp_filter was set over netlink: /proc/sys is read-only for the service...
    assert box.sh(f"cat /proc/sys/net/ipv4/conf/{SHIM}/arp_filter").stdout.strip() == "1"
    # ...except /proc/sys/net/ipv6/conf, for accept_ra=0 (a router's advertisements
    # would give the shim an address and routes of its own).
    assert box.sh(f"cat /proc/sys/net/ipv6/conf/{SHIM}/accept_ra").stdout.strip() == "0"
    journal = box.journal()
    assert f"sysctl -w net.ipv6.conf.{SHIM}.accept_ra=0" in journal, journal[-3000:]
    assert "could not sysctl" not in journal, journal[-3000:]
    assert re.search(r"ip route (add|replace) " + re.escape(ip4), journal), journal[-3000:]
    fields = box.sh(f"journalctl --no-pager -o cat -u {UNIT} MACVLAN_NETWORK=lan",
                    check=False).stdout
    assert fields.strip(), "no journal entry carries MACVLAN_NETWORK=lan"
    status = box.show(UNIT, "StatusText")["StatusText"]
    say(f"StatusText: {status!r}")
    assert status


def test_reload_applies_the_edited_default_file(box):
    ensure_installed(box)
    ensure_lan(box)
    restarts = box.show(UNIT, "NRestarts", "MainPID")
    box.sh(f"echo 'ADDITIONAL_ROUTES={EXTRA_ROUTE}' >> /etc/default/macvlan-router")
    box.sh(f"systemctl reload {UNIT}")
    e2e.wait_until(lambda: re.search(rf"^{re.escape(EXTRA_ROUTE)} dev {SHIM} ",
                                     "\n".join(owned_routes(box)), re.M),
                   20, desc=f"{EXTRA_ROUTE} via {SHIM} after reload")
    assert box.show(UNIT, "NRestarts", "MainPID") == restarts, "reload restarted the daemon"
    box.sh("sed -i '/^ADDITIONAL_ROUTES=/d' /etc/default/macvlan-router")
    box.sh(f"systemctl reload {UNIT}")
    e2e.wait_until(lambda: not any(r.startswith(EXTRA_ROUTE) for r in owned_routes(box)),
                   20, desc=f"{EXTRA_ROUTE} gone after the second reload")
    box_ping(box, ensure_lan(box)[0])
    # An invalid file on reload is logged and the old configuration kept.
    box.sh("cp /etc/default/macvlan-router /root/default.before-reload && "
           "echo MACVLAN_BRIDGE_IP=nonsense >> /etc/default/macvlan-router")
    box.sh(f"systemctl reload {UNIT}")
    e2e.wait_until(lambda: "nonsense" in box.journal(extra="-n 20"), 20,
                   desc="the reload error in the journal")
    s = box.show(UNIT, "ActiveState", "NRestarts", "MainPID")
    assert s["ActiveState"] == "active" and s == dict(restarts, ActiveState="active"), s
    box_ping(box, ensure_lan(box)[0])
    box.sh("cp /root/default.before-reload /etc/default/macvlan-router && "
           f"systemctl reload {UNIT}")


def test_watchdog_kills_and_restarts_a_stuck_daemon(box):
    ensure_installed(box)
    ensure_lan(box)
    ip4 = ensure_lan(box)[0]
    box_ping(box, ip4)
    before = box.show(UNIT, "NRestarts", "MainPID")
    routes = owned_routes(box)
    with e2e.Watch(box, ip4) as watch:
        box.sh(f"kill -STOP {main_pid(box)}")
        t = time.monotonic()
        wait_restarted(box, before, WATCHDOG_BOUND)
        say(f"watchdog restart after {time.monotonic() - t:.1f}s")
        watch.wait_replies(100)
    journal = box.journal(extra="--since=-2min")
    assert "Watchdog timeout" in journal or "watchdog" in journal.lower(), journal[-2000:]
    # Killed by the watchdog is not stopped: the routes stay for the restarted daemon.
    assert_nothing_dropped(box, watch, routes, "watchdog kill and restart")


def test_stop_removes_shim_and_routes(box):
    ensure_installed(box)
    ip4 = ensure_lan(box)[0]
    mark = journal_mark(box)
    box.sh(f"systemctl stop {UNIT}")
    assert not shim_exists(box), f"{SHIM} still there after stop"
    assert not owned_routes(box), owned_routes(box)
    journal = journal_since(box, mark)
    assert f"{UNIT}.service is stopping: removing the shims and routes" in journal, journal
    assert f"ip link del {SHIM}" in journal, journal
    box.sh(f"systemctl start {UNIT}")
    wait_active(box)
    box_ping(box, ip4)


def test_stop_keeps_shim_and_routes_with_cleanup_on_exit_false(box):
    ensure_installed(box)
    ip4 = ensure_lan(box)[0]
    box.sh("echo CLEANUP_ON_EXIT=false >> /etc/default/macvlan-router && "
           f"systemctl restart {UNIT}")
    wait_active(box)
    box_ping(box, ip4)
    box.sh(f"systemctl stop {UNIT}")
    assert shim_exists(box) and owned_routes(box), "CLEANUP_ON_EXIT=false: removed on stop"
    box_ping(box, ip4)
    box.sh("sed -i '/^CLEANUP_ON_EXIT=/d' /etc/default/macvlan-router && "
           f"systemctl start {UNIT}")
    wait_active(box)
    box_ping(box, ip4)


def test_restart_keeps_routes_under_traffic(box):
    """systemctl restart: the shim and every route stay throughout; no ping is lost."""
    ensure_installed(box)
    ip4 = ensure_lan(box)[0]
    box_ping(box, ip4)
    routes, pid, mark = owned_routes(box), main_pid(box), journal_mark(box)
    with e2e.Watch(box, ip4) as watch:
        box.sh(f"systemctl restart {UNIT}")
        wait_active(box)
        watch.wait_replies(100)
    assert main_pid(box) != pid, "the daemon was not restarted"
    assert_nothing_dropped(box, watch, routes, "systemctl restart")
    journal = journal_since(box, mark)
    # Both asked systemd: the daemon on SIGTERM, then ExecStopPost=.
    assert len(KEPT_FOR_RESTART.findall(journal)) == 2, journal
    assert not REMOVAL.search(journal), journal


def test_upgrade_keeps_routes_under_traffic(box, newer):
    """apt install of a newer version over the running one (debhelper's postinst restarts
    the service): the shim and every route stay throughout; no ping is lost."""
    deb, version = newer
    ensure_installed(box)
    ip4 = ensure_lan(box)[0]
    box_ping(box, ip4)
    box.cp_in(deb, f"/root/{deb.name}")
    routes, pid, mark = owned_routes(box), main_pid(box), journal_mark(box)
    with e2e.Watch(box, ip4) as watch:
        p = box.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y /root/{deb.name}",
                   check=False, timeout=300)
        assert p.returncode == 0, f"apt install failed:\n{p.stdout}\n{p.stderr}"
        wait_active(box)
        watch.wait_replies(100)
    installed = box.sh("dpkg-query -W -f '${Version}' macvlan-router").stdout.strip()
    assert installed == version
    assert main_pid(box) != pid, "the upgrade did not restart the daemon"
    assert_nothing_dropped(box, watch, routes, f"upgrade to {version}")
    journal = journal_since(box, mark)
    assert len(KEPT_FOR_RESTART.findall(journal)) == 2, journal
    assert not REMOVAL.search(journal), journal


def test_crash_keeps_routes_and_the_restarted_daemon_adopts_them(box):
    """SIGKILL: no stop job, so ExecStopPost= keeps everything; systemd restarts the daemon
    (RestartSec=5s), which adopts the shim and routes without touching them."""
    ensure_installed(box)
    ip4 = ensure_lan(box)[0]
    box_ping(box, ip4)
    before = box.show(UNIT, "NRestarts", "MainPID")
    routes, mark = owned_routes(box), journal_mark(box)
    with e2e.Watch(box, ip4) as watch:
        box.sh(f"kill -KILL {before['MainPID']}")
        wait_restarted(box, before)
        watch.wait_replies(100)
    assert_nothing_dropped(box, watch, routes, "SIGKILL and automatic restart")
    journal = journal_since(box, mark)
    assert KEPT_AFTER_CRASH.search(journal), journal
    assert not REMOVAL.search(journal), journal


def test_crash_then_stop_removes_everything(box):
    """A daemon restarted after a crash is stopped like any other: everything goes."""
    ensure_installed(box)
    ip4 = ensure_lan(box)[0]
    box_ping(box, ip4)
    before = box.show(UNIT, "NRestarts", "MainPID")
    box.sh(f"kill -KILL {before['MainPID']}")
    wait_restarted(box, before)
    assert shim_exists(box) and owned_routes(box)
    box.sh(f"systemctl stop {UNIT}")
    assert not shim_exists(box), f"{SHIM} still there after stop"
    assert not owned_routes(box), owned_routes(box)
    box.sh(f"systemctl start {UNIT}")
    wait_active(box)
    box_ping(box, ip4)


def test_disable_now_removes_everything(box):
    ensure_installed(box)
    ip4 = ensure_lan(box)[0]
    box_ping(box, ip4)
    box.sh(f"systemctl disable --now {UNIT}")
    assert not shim_exists(box), f"{SHIM} still there after disable --now"
    assert not owned_routes(box), owned_routes(box)
    assert box.sh(f"systemctl is-enabled {UNIT}", check=False).stdout.strip() == "disabled"
    box.sh(f"systemctl enable --now {UNIT}")
    wait_active(box)
    box_ping(box, ip4)


def test_bad_config_fails_clearly_without_restart_loop(box):
    ensure_installed(box)
    ensure_lan(box)
    ip4 = ensure_lan(box)[0]
    box_ping(box, ip4)
    routes = owned_routes(box)
    box.sh("cp /etc/default/macvlan-router /root/default.good && "
           "echo MACVLAN_BRIDGE_IP=nonsense >> /etc/default/macvlan-router")
    p = box.sh(f"systemctl restart {UNIT}", check=False)
    assert p.returncode != 0, "restart with a bad configuration succeeded"
    time.sleep(8)                                         # past RestartSec=5s
    s = box.show(UNIT, "ActiveState", "SubState", "NRestarts", "ExecMainStatus", "Result")
    assert s["ActiveState"] == "failed" and s["ExecMainStatus"] == "78", s
    assert s["NRestarts"] == "0", s
    journal = box.journal(extra="-n 30")
    assert re.search(r"MACVLAN_BRIDGE_IP.*nonsense|nonsense.*MACVLAN_BRIDGE_IP", journal), \
        journal[-2000:]
    # A restart is not a stop, and the start that failed changed nothing: what the daemon
    # had made stays, and the containers stay reachable while the file is fixed.
    assert shim_exists(box) and owned_routes(box) == routes
    box_ping(box, ip4)
    box.sh("cp /root/default.good /etc/default/macvlan-router && "
           f"systemctl reset-failed {UNIT} && systemctl start {UNIT}")
    wait_active(box)
    box_ping(box, ip4)


def test_starts_without_docker_and_waits_for_it(box):
    ensure_installed(box)
    ensure_lan(box)
    box.sh("systemctl stop docker.socket docker.service")
    box.sh(f"systemctl restart {UNIT}")
    s = box.show(UNIT, "ActiveState", "StatusText", "NRestarts")
    say(f"without Docker: {s}")
    assert s["ActiveState"] == "active" and "waiting" in s["StatusText"].lower(), s
    box.sh("systemctl start docker.service")
    e2e.wait_until(lambda: box.sh("docker inspect -f '{{.State.Running}}' c1",
                                  check=False).stdout.strip() == "true",
                   60, desc="c1 running again after Docker came back")
    box.c1 = c1_addresses(box)
    box_ping(box, box.c1[0], count_deadline=60)
    assert box.show(UNIT, "NRestarts")["NRestarts"] == s["NRestarts"]


def test_remove_after_a_crash_that_left_the_unit_failed(box):
    """The daemon died and systemd did not restart it (here Restart=no in a drop-in): no
    stop runs ExecStopPost= on a failed unit, so `apt remove` (the package's prerm) removes
    what the daemon left. The package is installed again afterwards."""
    ensure_installed(box)
    ip4 = ensure_lan(box)[0]
    box_ping(box, ip4)
    routes = owned_routes(box)
    dropin = f"/run/systemd/system/{UNIT}.service.d"
    box.sh(f"mkdir -p {dropin} && printf '[Service]\\nRestart=no\\n' > {dropin}/e2e.conf && "
           "systemctl daemon-reload")
    try:
        box.sh(f"kill -KILL {main_pid(box)}")
        e2e.wait_until(lambda: box.show(UNIT, "ActiveState")["ActiveState"] == "failed", 30,
                       desc=f"{UNIT} to be failed")
        assert shim_exists(box) and owned_routes(box) == routes, "the crash removed routes"
        p = box.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y macvlan-router",
                   timeout=300)
        assert f"ip link del {SHIM}" in p.stdout + p.stderr, p.stdout + p.stderr
        assert not shim_exists(box), f"{SHIM} still there after apt remove"
        assert not owned_routes(box), owned_routes(box)
        # The cleanup ran from files dpkg then removed: it left no bytecode behind.
        left = box.sh("ls -d /usr/lib/python3/dist-packages/macvlan_router*", check=False)
        assert left.returncode != 0, f"left behind by apt remove: {left.stdout}"
    finally:
        box.sh(f"rm -rf {dropin}; systemctl daemon-reload; systemctl reset-failed {UNIT}",
               check=False)
    install(box)
    box_ping(box, ip4)


def test_purge_leaves_nothing_behind(box):
    ensure_installed(box)
    ensure_lan(box)
    box.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y macvlan-router", timeout=300)
    assert not shim_exists(box)
    assert not owned_routes(box), owned_routes(box)
    # Not ours: the journal, and man-db's cache of formatted pages (its own cron job
    # drops pages whose source is gone). The system user stays, as Debian policy wants.
    left = box.sh("find /etc /lib /usr /var -name '*macvlan-router*' -not -path '/var/log/*' "
                  "-not -path '/var/cache/man/*' 2>/dev/null", check=False).stdout.split()
    assert not left, f"left behind after purge: {left}"
    assert box.sh("dpkg -s macvlan-router", check=False).returncode != 0
    assert not box.sh("ls /etc/systemd/system/*/macvlan-router* 2>/dev/null",
                      check=False).stdout.strip(), "unit links left behind"


def test_make_install_from_a_source_tree(box):
    """The README's command on a systemd host: builds the .deb, installs it with apt, and
    leaves the service enabled and running with the default configuration."""
    box.sh("export DEBIAN_FRONTEND=noninteractive; "
           "! dpkg -s macvlan-router >/dev/null 2>&1 || apt-get purge -y macvlan-router")
    box.untar(e2e.checkout_tar(), "/root/src")
    t = time.monotonic()
    p = box.sh("cd /root/src && make install", check=False, timeout=600)
    say(f"make install in the box took {time.monotonic() - t:.1f}s")
    assert p.returncode == 0, f"make install failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert box.sh(f"systemctl is-enabled {UNIT}").stdout.strip() == "enabled"
    wait_active(box)
    box_ping(box, ensure_lan(box)[0])
    # /etc/default/macvlan-router is a conffile: a local edit survives a reinstall.
    box.sh("echo '# edited by the e2e test' >> /etc/default/macvlan-router && "
           "DEBIAN_FRONTEND=noninteractive apt-get install -y --reinstall "
           "/root/src/build/macvlan-router_*_all.deb")
    assert "# edited by the e2e test" in box.sh("cat /etc/default/macvlan-router").stdout
    wait_active(box)


def test_install_on_a_host_without_docker(box):
    """Docker not installed yet (no engine, no group docker): the package still installs,
    the service starts and waits for Docker. Runs last: it removes the box's engine."""
    box.sh("export DEBIAN_FRONTEND=noninteractive; "
           "! dpkg -s macvlan-router >/dev/null 2>&1 || apt-get purge -y macvlan-router; "
           "apt-get purge -y docker.io", timeout=300)
    box.sh("! getent group docker || groupdel docker")
    install(box)
    assert "macvlan-router" in box.sh("getent group docker").stdout.strip().split(":")[-1]
    s = box.show(UNIT, "ActiveState", "StatusText")
    assert s["ActiveState"] == "active" and "waiting" in s["StatusText"].lower(), s
