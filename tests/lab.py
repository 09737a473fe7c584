"""A real-engine lab for the integration tests (and tests/bench.py).

Everything happens inside network namespaces this module creates and removes:

  namespace T (the "host")                     namespace P (a LAN peer)
    lo up
    lan0 198.51.100.2/24 2001:db8:1::2/64  <-veth->  peer0 198.51.100.3/24 2001:db8:1::3/64
    lan1 203.0.113.2/24  2001:db8:2::2/64  <-veth->  peer1 203.0.113.3/24  2001:db8:2::3/64
    dockerd (own data-root, exec-root, socket, pidfile under a temporary directory)
    the daemon under test: python3 -m macvlan_router run ... (same interpreter as pytest)

Nothing here touches the machine's own interfaces, addresses or routes: every `ip` command
carries `-n NS` or runs under `nsenter --net=/run/netns/NS` (not `ip netns exec`, which
remounts /sys and makes dockerd fail with "Devices cgroup isn't mounted").

Names carry the pid of the pytest process (`mvrlab-<pid>-T`), so several runs can share the
machine; namespaces left by a run whose process is gone are swept at the next start.
Every wait is bounded in time and in iterations.
"""

import contextlib
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

PROTO = 210                      # our rtnetlink protocol number (contract)
PROTO_NAMES = {"210", "macvlan-router"}
LABEL = "org.macvlan-router.test"  # every docker object a test creates carries it
IMAGE = "bb:latest"

# The "LAN" on lan0 and the second parent lan1 (documentation ranges only).
LAN0 = dict(parent="lan0", peer="peer0",
            subnet="198.51.100.0/24", gateway="198.51.100.1", ip_range="198.51.100.128/25",
            host="198.51.100.2", peer_ip="198.51.100.3",
            subnet6="2001:db8:1::/64", gateway6="2001:db8:1::1", ip_range6="2001:db8:1::1:0/112",
            host6="2001:db8:1::2", peer_ip6="2001:db8:1::3")
LAN1 = dict(parent="lan1", peer="peer1",
            subnet="203.0.113.0/24", gateway="203.0.113.1", ip_range="203.0.113.128/25",
            host="203.0.113.2", peer_ip="203.0.113.3",
            subnet6="2001:db8:2::/64", gateway6="2001:db8:2::1", ip_range6="2001:db8:2::1:0/112",
            host6="2001:db8:2::2", peer_ip6="2001:db8:2::3")
LANS = {"lan0": LAN0, "lan1": LAN1}
SHIM0 = "mvr-lan0"   # default shim names (contract: mvr-<parent>)
SHIM1 = "mvr-lan1"

NS_PREFIX = "mvrlab-"
DOCKERD = shutil.which("dockerd", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/dockerd"
DOCKER_CLI = "/usr/bin/docker"   # Debian's 20.10 client, never /usr/local/bin/docker
BUSYBOX = "/bin/busybox"         # from busybox-static
BUSYBOX_LINKS = ("sh", "sleep", "ping", "ping6", "ip", "nc", "httpd", "cat", "true", "ls")

# Environment keys of the daemon's configuration: stripped from inherited environments,
# because the same keys in the environment override the config file.
CONFIG_KEYS = ("MACVLAN_DOCKER_NETWORK", "MACVLAN_BRIDGE_IP", "MACVLAN_BRIDGE_IP6",
               "MACVLAN_BRIDGE_INTERFACE_NAME", "ADDITIONAL_ROUTES", "CLEANUP_ON_EXIT",
               "RESYNC_INTERVAL", "LOG_LEVEL", "DEBUG")
SYSTEMD_KEYS = ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID",
                "LISTEN_FDS", "LISTEN_PID", "INVOCATION_ID")


class LabError(Exception):
    """The lab itself could not be set up (not a failure of the code under test)."""


# --------------------------------------------------------------------------- basics

def run(cmd, netns=None, check=True, timeout=60, input=None, env=None):
    """Run a command (list), inside namespace `netns` when given (via nsenter --net).

    Returns subprocess.CompletedProcess with text stdout/stderr."""
    cmd = [str(c) for c in cmd]
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", "--"] + cmd
    p = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                       env=env, stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise LabError(f"command failed (rc={p.returncode}): {' '.join(cmd)}\n"
                       f"stdout: {p.stdout.strip()}\nstderr: {p.stderr.strip()}")
    return p


def wait_until(cond, timeout=10.0, interval=0.05, desc=None,
               errors=(LabError, OSError, subprocess.SubprocessError)):
    """Poll cond() until it returns something truthy; return that value.

    Bounded in time (timeout) and in iterations. Raises AssertionError naming what was
    awaited and the last value seen (or the last of `errors` raised by cond)."""
    deadline = time.monotonic() + timeout
    max_iter = int(timeout / max(interval, 0.001)) * 4 + 20
    last = None
    for _ in range(max_iter):
        try:
            last = cond()
        except errors as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for "
                         f"{desc or getattr(cond, '__name__', 'condition')}; last: {last!r}")


def holds_for(cond, duration=3.0, interval=0.1, desc=None):
    """Assert that cond() stays truthy during `duration` seconds (checked repeatedly)."""
    deadline = time.monotonic() + duration
    max_iter = int(duration / max(interval, 0.001)) * 4 + 20
    for _ in range(max_iter):
        value = cond()
        if not value:
            raise AssertionError(f"{desc or getattr(cond, '__name__', 'condition')} "
                                 f"stopped holding: {value!r}")
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)
    return True


def is_v6(addr):
    return ipaddress.ip_address(str(addr).split("/")[0]).version == 6


def host_prefix(addr):
    """'198.51.100.5' -> '198.51.100.5/32', '2001:db8::5' -> '2001:db8::5/128'."""
    a = ipaddress.ip_address(str(addr).split("/")[0])
    return f"{a}/{a.max_prefixlen}"


def norm_dst(dst):
    """Route dst as printed by `ip -j` ('198.51.100.5' or '198.51.100.0/24') -> network str."""
    if dst in (None, "default"):
        return dst
    return str(ipaddress.ip_network(dst, strict=False))


def prereq_problem():
    """Why the integration lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, dockerd)"
    for tool, path in (("dockerd", DOCKERD), ("docker CLI", DOCKER_CLI),
                       ("busybox-static", BUSYBOX)):
        if not os.access(path, os.X_OK):
            return (f"{tool} missing ({path}): apt-get install docker.io busybox-static "
                    "(and docker-cli on Debian 13)")
    for tool in ("ip", "nsenter"):
        if not shutil.which(tool):
            return f"{tool} missing"
    try:
        import docker  # noqa: F401
    except ImportError:
        return "python docker library missing (python3-docker or pip install docker)"
    if not os.path.isdir("/run/netns") and not os.access("/run", os.W_OK):
        return "cannot create network namespaces"
    return chroot_problem()


def chroot_problem():
    """Why `/` here is not the root of this mount namespace (a chroot), or None.

    Entering a mount namespace (setns) puts a process at that namespace's root, not at the
    caller's `/`: under a chroot, `docker exec` (runc) and the Podman lab's `nsenter -m`
    then run the machine's own programs outside this tree. Tests fail for no reason of
    theirs: a container's `ping` is "not found" (it runs the machine's /bin, not busybox),
    Podman cannot find its storage.conf. Seen in a Debian 13 tree under chroot."""
    here = os.stat("/")
    p = run(["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", "stat", "-L", "-c",
             "%d:%i", "/"], check=False, timeout=10)
    if p.returncode != 0 or p.stdout.strip() == f"{here.st_dev}:{here.st_ino}":
        return None  # the same root, or no way to tell (the lab's own steps will say)
    return ("this process runs under chroot: `/` is not the root of its mount namespace, so "
            "`docker exec` and `nsenter -m` would run programs from outside this tree. Run "
            "the suite on the machine itself, in a container or VM, or make the tree the "
            "namespace's root: unshare -m, then pivot_root into it (not chroot)")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mounts_under(path):
    """Mount points at or below path (deepest first), from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == path or mp.startswith(path + "/"):
                    out.append(mp)
    except OSError:
        pass
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


def _unmount_all_under(path):
    for _ in range(5):
        mounts = _mounts_under(path)
        if not mounts:
            return True
        for mp in mounts:
            if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True)
    return not _mounts_under(path)


def remove_tree(path):
    """rm -rf path, but never across a mount point."""
    if not os.path.exists(path):
        return
    if not _unmount_all_under(path):
        print(f"mounts remain under {path}; not removing it", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


def netns_pids(ns):
    p = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def kill_netns_processes(ns, grace=5.0):
    """End the processes living in namespace ns (all started by this lab), by pid."""
    pids = netns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for _ in range(int(grace / 0.05) + 5):
        if not any(pid_alive(p) for p in pids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in netns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def sweep_stale_labs():
    """Remove namespaces and directories left by earlier lab runs whose process is gone."""
    p = run(["ip", "netns", "list"], check=False, timeout=10)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)-[TP]", name)
        if m and not pid_alive(int(m.group(1))):
            kill_netns_processes(name, grace=3)
            run(["ip", "netns", "del", name], check=False, timeout=10)
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(NS_PREFIX + "*"):
        m = re.match(re.escape(NS_PREFIX) + r"(\d+)-", d.name)
        if m and d.is_dir() and not pid_alive(int(m.group(1))):
            remove_tree(str(d))


# --------------------------------------------------------------------------- config files

def _quote(value):
    value = str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path, config):
    """Write a config in systemd EnvironmentFile syntax. config: dict (None values skipped)
    or a str written as is."""
    if isinstance(config, str):
        text = config
    else:
        text = "# written by tests/lab.py\n" + "".join(
            f"{k}={_quote(v)}\n" for k, v in (config or {}).items() if v is not None)
    Path(path).write_text(text)
    return str(path)


# --------------------------------------------------------------------------- the namespaces

class Lab:
    """The two namespaces, the veth "LAN"s, and helpers to look into T."""

    def __init__(self, run_id=None):
        self.run_id = run_id or str(os.getpid())
        self.T = f"{NS_PREFIX}{self.run_id}-T"
        self.P = f"{NS_PREFIX}{self.run_id}-P"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}{self.run_id}-"))
        self._counter = 0
        self.engine = None
        self.daemons = []

    # names -------------------------------------------------------------------
    def unique(self, stem):
        self._counter += 1
        return f"{stem}{self._counter}"

    def path(self, name):
        return self.dir / name

    # setup / teardown ----------------------------------------------------------
    def setup(self):
        for ns in (self.T, self.P):
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for lan in LANS.values():
            self.add_lan(lan)

    def add_lan(self, lan):
        T, P = self.T, self.P
        run(["ip", "-n", T, "link", "add", lan["parent"], "type", "veth",
             "peer", "name", lan["peer"], "netns", P])
        self.configure_lan(lan)

    def configure_lan(self, lan):
        T, P = self.T, self.P
        for ns, dev, a4, a6 in ((T, lan["parent"], lan["host"], lan["host6"]),
                                (P, lan["peer"], lan["peer_ip"], lan["peer_ip6"])):
            plen = lan["subnet"].split("/")[1]
            plen6 = lan["subnet6"].split("/")[1]
            run(["ip", "-n", ns, "addr", "replace", f"{a4}/{plen}", "dev", dev])
            run(["ip", "-n", ns, "addr", "replace", f"{a6}/{plen6}", "dev", dev, "nodad"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])

    def teardown(self):
        for d in list(self.daemons):
            d.kill_quietly()
        if self.engine:
            self.engine.stop(quiet=True)
        for ns in (self.T, self.P):
            kill_netns_processes(ns, grace=5)
            run(["ip", "netns", "del", ns], check=False, timeout=10)
        remove_tree(str(self.dir))

    def reset(self):
        """Bring T back to its baseline after a test: no daemon, no links but lo/lan0/lan1
        (recreated/readdressed when a test removed or downed them), no routes but the
        kernel's, engine running, no test containers/networks."""
        for d in list(self.daemons):
            d.kill_quietly()
        if self.engine:
            if not self.engine.running():
                self.engine.start()
            self.engine.cleanup()
        keep = {"lo"} | set(LANS)
        for link in self.links():
            name = link["ifname"]
            if name not in keep:
                run(["ip", "-n", self.T, "link", "del", name], check=False)
        present = {link["ifname"] for link in self.links()}
        for name, lan in LANS.items():
            if name not in present:
                run(["ip", "-n", self.P, "link", "del", lan["peer"]], check=False)
                self.add_lan(lan)
            else:
                # Only the baseline addresses: a test may have moved the host's.
                run(["ip", "-n", self.T, "addr", "flush", "dev", name, "scope", "global"])
                self.configure_lan(lan)
        for fam in (4, 6):
            for r in self.routes(fam):
                if str(r.get("protocol")) in ("2", "kernel") or not r.get("dst"):
                    continue
                cmd = ["ip", "-n", self.T, f"-{fam}", "route", "del", r["dst"], "table", "main"]
                if r.get("dev"):
                    cmd += ["dev", r["dev"]]
                if r.get("protocol"):
                    cmd += ["proto", str(r["protocol"])]
                run(cmd, check=False)
        for r in self.owned_routes():
            fam = "-6" if ":" in str(r.get("dst", "")) else "-4"
            run(["ip", "-n", self.T, fam, "route", "del", r["dst"], "proto", str(PROTO),
                 "table", str(r.get("table", "main"))], check=False)

    # looking into T ------------------------------------------------------------
    def ip_json(self, *args, ns=None):
        p = run(["ip", "-j", "-N", "-n", ns or self.T, *args], check=False)
        if p.returncode != 0 or not p.stdout.strip():
            return []
        return json.loads(p.stdout)

    def links(self, ns=None):
        return self.ip_json("-d", "link", "show", ns=ns)

    def link(self, name, ns=None):
        """`ip -d link show dev NAME` as a dict, or None when absent."""
        for link in self.links(ns=ns):
            if link.get("ifname") == name:
                return link
        return None

    def macvlan_links(self):
        return [ln for ln in self.links()
                if ln.get("linkinfo", {}).get("info_kind") == "macvlan"]

    def addrs(self, dev, family=None, ns=None):
        """[{'local':..., 'prefixlen':..., 'flags': [...]}, ...] on dev."""
        fam = [] if family is None else [f"-{family}"]
        out = []
        for entry in self.ip_json(*fam, "addr", "show", "dev", dev, ns=ns):
            for a in entry.get("addr_info", []):
                flags = [k for k, v in a.items() if v is True]
                out.append(dict(a, flags=flags))
        return out

    def global_addrs(self, dev, family):
        return [a for a in self.addrs(dev, family) if str(a.get("scope")) in ("global", "0")]

    def routes(self, family=4, table="main", ns=None):
        fam = "-6" if family == 6 else "-4"
        return self.ip_json(fam, "route", "show", "table", str(table), ns=ns)

    def all_routes(self, table="main"):
        return self.routes(4, table) + self.routes(6, table)

    def owned_routes(self):
        """Routes carrying our protocol (210), both families, every table."""
        out = []
        for fam in ("-4", "-6"):
            # filtered client-side: with `proto 210` ip omits the protocol field
            out += [r for r in self.ip_json(fam, "route", "show", "table", "all")
                    if str(r.get("protocol")) in PROTO_NAMES]
        return out

    def route(self, dst, family=None):
        """The main-table route whose destination is exactly dst (host address -> /32, /128)."""
        dst = str(dst)
        want = norm_dst(dst if "/" in dst else host_prefix(dst))
        fam = family or (6 if is_v6(dst) else 4)
        for r in self.routes(fam):
            if norm_dst(r.get("dst")) == want:
                return r
        return None

    def route_via(self, dst, shim):
        """The route to dst when it goes through shim with our protocol, else None."""
        r = self.route(dst)
        if r and r.get("dev") == shim and str(r.get("protocol")) in PROTO_NAMES:
            return r
        return None

    def sysctl(self, key, ns=None):
        p = run(["sysctl", "-n", key], netns=ns or self.T, check=False)
        return p.stdout.strip() if p.returncode == 0 else None

    # traffic -------------------------------------------------------------------
    def ping(self, addr, ns=None, timeout_s=1):
        """One echo request from namespace ns (default T); True when answered."""
        cmd = [BUSYBOX, "ping", "-6" if is_v6(addr) else "-4", "-c", "1", "-W",
               str(timeout_s), str(addr)]
        return run(cmd, netns=ns or self.T, check=False, timeout=timeout_s + 10).returncode == 0

    def wait_ping(self, addr, ns=None, timeout=10):
        return wait_until(lambda: self.ping(addr, ns=ns), timeout=timeout, interval=0.1,
                          desc=f"ping {addr} from {ns or self.T}")

    def ipc(self, *args, ns=None, check=True):
        """`ip -n NS ARGS...` (default T)."""
        return run(["ip", "-n", ns or self.T, *args], check=check)

    def parent_down(self, unreachable, parent="lan0", shim=SHIM0):
        """Take the parent down (what a link flap or a NetworkManager rescan does) and wait
        until the shim has lost its lower layer and `unreachable` no longer answers."""
        self.ipc("link", "set", parent, "down")
        wait_until(lambda: self.link(shim) is None
                   or self.link(shim)["operstate"] in ("LOWERLAYERDOWN", "DOWN"),
                   desc="the shim losing its lower layer")
        time.sleep(0.5)   # let the daemon see the parent down
        assert not self.ping(unreachable)

    # the daemon and the CLI -------------------------------------------------------
    def daemon_env(self, docker_host=None, env=None):
        e = {k: v for k, v in os.environ.items()
             if k not in CONFIG_KEYS and k not in SYSTEMD_KEYS and not k.startswith("DOCKER_")}
        e["DOCKER_HOST"] = docker_host or (self.engine.host if self.engine else "")
        pp = [str(REPO_ROOT)]
        e["PYTHONPATH"] = os.pathsep.join(pp)
        e["PYTHONDONTWRITEBYTECODE"] = "1"
        e["PYTHONUNBUFFERED"] = "1"
        if env:
            for k, v in env.items():
                if v is None:
                    e.pop(k, None)
                else:
                    e[k] = str(v)
        return e

    def config_file(self, config, name=None, docker_host=None):
        if config is None:
            config = {}
        if isinstance(config, Path) or (isinstance(config, str) and os.path.exists(config)):
            return str(config)   # a path (a Path need not exist: "missing file" tests)
        if isinstance(config, dict):
            # The daemon takes DOCKER_HOST from its file only, never from the environment.
            engine = self.engine.host if self.engine else None
            config = {"DOCKER_HOST": docker_host or engine, **config}
        return write_config(self.path(name or self.unique("config-") + ".env"), config)

    def mvr(self, *args, config=None, env=None, docker_host=None, timeout=60, wrap=()):
        """Run `python3 -m macvlan_router ARGS... --config FILE` in T.

        config: dict or str (written to a file), a Path or an existing path as str, or
        False for no --config.
        wrap: a command prefix (e.g. setpriv ...) run inside T before the interpreter.
        Returns (rc, stdout, stderr)."""
        cmd = [*wrap, sys.executable, "-m", "macvlan_router", *args]
        if config is not False:
            cmd += ["--config", self.config_file(config, docker_host=docker_host)]
        p = run(cmd, netns=self.T, check=False, timeout=timeout,
                env=self.daemon_env(docker_host, env))
        return p.returncode, p.stdout, p.stderr

    def status_json(self, config=None, env=None):
        rc, out, err = self.mvr("status", "--json", config=config, env=env)
        assert rc == 0, f"status --json exited {rc}: {err}"
        return json.loads(out)

    def daemon(self, config=None, env=None, docker_host=None, start=True, ready=True, wrap=()):
        d = Daemon(self, config=config, env=env, docker_host=docker_host, wrap=wrap)
        if start:
            d.start(wait_ready=ready)
        return d


# --------------------------------------------------------------------------- dockerd

class Engine:
    """A dockerd confined to namespace T with its own directories."""

    # Under the lab directory: the engine's own directory, API socket and log.
    DIR, SOCKET, LOG = "docker", "docker.sock", "dockerd.log"

    def __init__(self, lab):
        self.lab = lab
        self.dir = lab.dir / self.DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / self.SOCKET
        self.host = f"unix://{self.sock}"
        self.pidfile = self.dir / "dockerd.pid"
        self.log = self.dir / self.LOG
        self.proc = None
        self._client = None
        self.extra_args = []     # more dockerd options (e.g. --live-restore), from next start
        lab.engine = self

    def argv(self):
        return ["nsenter", f"--net=/run/netns/{self.lab.T}", "--", DOCKERD,
                "--data-root", str(self.dir / "root"), "--exec-root", str(self.dir / "exec"),
                "-H", self.host, "--pidfile", str(self.pidfile),
                "--bridge=none", "--iptables=false", "--ip6tables=false",
                "--userland-proxy=false", "--log-level=warn", *self.extra_args]

    def start(self, timeout=60):
        if self.running():
            return
        with open(self.log, "ab") as log:
            log.write(f"\n=== start {time.ctime()} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        self._client = None
        wait_until(self._answers, timeout=timeout, interval=0.1, desc="dockerd to answer")

    def _answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"dockerd exited with {self.proc.returncode}:\n"
                                 + self.log_tail())
        try:
            return self.client.ping()
        except Exception:
            self._client = None
            return False

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=30, sig=signal.SIGTERM, quiet=False):
        """Stop dockerd (SIGTERM, then SIGKILL after timeout) and wait for it."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if not quiet:
                    print("lab: dockerd did not stop in time; SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def crash(self, timeout=10):
        """SIGKILL dockerd, as a crash or the OOM killer would; containers keep running.

        Its containerd dies with it (dockerd starts it with PDEATHSIG=SIGKILL). Where
        nothing reaps orphans (a sandbox whose PID 1 does not), containerd stays a zombie
        and its pid file makes the next dockerd wait for that zombie's socket until it
        gives up: the pid file goes once its process is dead or a zombie."""
        pidfile = self.dir / "exec" / "containerd" / "containerd.pid"
        try:
            containerd = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            containerd = None
        self.stop(sig=signal.SIGKILL, timeout=timeout)
        if containerd is None:
            return

        def gone():
            try:
                stat = Path(f"/proc/{containerd}/stat").read_text()
            except OSError:
                return True
            return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")
        wait_until(gone, timeout=timeout, desc=f"containerd ({containerd}) to die with dockerd")
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()

    def log_tail(self, n=30):
        try:
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    @property
    def client(self):
        if self._client is None:
            import docker
            self._client = docker.DockerClient(base_url=self.host, version="auto", timeout=60)
        return self._client

    # CLI ----------------------------------------------------------------------
    def cli(self, *args, check=True, timeout=60):
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DOCKER_HOST": self.host,
               "DOCKER_CONFIG": str(self.lab.dir / "docker-cli")}
        return run([DOCKER_CLI, *args], check=check, timeout=timeout, env=env)

    # image --------------------------------------------------------------------
    def ensure_image(self):
        """bb:latest from busybox-static: /bin/busybox plus links."""
        try:
            self.client.images.get(IMAGE)
            return
        except Exception:
            pass
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for d in ("bin", "tmp", "etc", "proc", "sys", "dev", "www"):
                ti = tarfile.TarInfo(d)
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o1777 if d == "tmp" else 0o755
                tar.addfile(ti)
            tar.add(BUSYBOX, arcname="bin/busybox")
            for name in BUSYBOX_LINKS:
                ti = tarfile.TarInfo(f"bin/{name}")
                ti.type = tarfile.SYMTYPE
                ti.linkname = "busybox"
                tar.addfile(ti)
            data = b"<html>macvlan-router lab</html>\n"
            ti = tarfile.TarInfo("www/index.html")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        repo, tag = IMAGE.split(":")
        self.client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag)
        self.client.images.get(IMAGE)

    # networks and containers -----------------------------------------------------
    def network(self, name, parent="lan0", v6=False, ip_range=True, aux=True, labels=None,
                subnet=None, gateway=None, subnet6=None, config_only=False,
                config_from=None, extra=()):
        """docker network create -d macvlan ... (labelled for cleanup).

        By default the IPAM range is the upper half of the subnet and the host/peer
        addresses are reserved, so Docker never hands a container the host's address."""
        lan = LANS.get(parent, LAN0)
        args = ["network", "create"]
        if config_from:
            # Docker refuses any other option (labels included) with --config-from
            args += ["-d", "macvlan", "--config-from", config_from, name]
            self.cli(*args, *extra)
            return name
        args += ["--label", f"{LABEL}=1"]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        if config_from:
            self.cli(*args, *extra)
            return name
        if config_only:
            args += ["--config-only"]
        else:
            args += ["-d", "macvlan"]
        args += ["--subnet", subnet or lan["subnet"], "--gateway", gateway or lan["gateway"]]
        if ip_range:
            args += ["--ip-range", lan["ip_range"] if ip_range is True else ip_range]
        if aux:
            args += ["--aux-address", f"host={lan['host']}",
                     "--aux-address", f"peer={lan['peer_ip']}"]
        if v6:
            args += ["--ipv6", "--subnet", subnet6 or lan["subnet6"],
                     "--gateway", lan["gateway6"]]
            if ip_range:
                args += ["--ip-range", lan["ip_range6"]]
            if aux:
                args += ["--aux-address", f"host6={lan['host6']}",
                         "--aux-address", f"peer6={lan['peer_ip6']}"]
        if parent:
            args += ["-o", f"parent={parent}"]
        args += list(extra) + [name]
        self.cli(*args)
        return name

    def container(self, name, network, ip=None, ip6=None, cap_add=(), cmd=None, start=True,
                  extra=()):
        """A bb:latest container on network with the given address(es); returns its name.

        Its command exits on SIGTERM at once, so `docker stop` is fast. extra: more
        `docker create` options (e.g. --restart always)."""
        self.ensure_image()
        args = ["create", "--name", name, "--label", f"{LABEL}=1", "--network", network]
        if ip:
            args += ["--ip", ip]
        if ip6:
            args += ["--ip6", ip6]
        for cap in cap_add:
            args += ["--cap-add", cap]
        args += list(extra) + [IMAGE]
        args += list(cmd or ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"])
        self.cli(*args)
        if start:
            self.cli("start", name)
        return name

    def exec(self, container, *cmd, timeout=30):
        p = self.cli("exec", container, *cmd, check=False, timeout=timeout)
        return p.returncode, p.stdout + p.stderr

    def ping_from(self, container, addr, timeout_s=1):
        rc, _ = self.exec(container, "ping", "-6" if is_v6(addr) else "-4", "-c", "1",
                          "-W", str(timeout_s), str(addr), timeout=timeout_s + 20)
        return rc == 0

    def wait_ping_from(self, container, addr, timeout=10):
        return wait_until(lambda: self.ping_from(container, addr), timeout=timeout,
                          interval=0.1, desc=f"ping {addr} from container {container}")

    def container_ips(self, container):
        """(ipv4s, ipv6s) of a container, from docker inspect."""
        info = self.client.api.inspect_container(container)
        v4, v6 = [], []
        for net in (info["NetworkSettings"].get("Networks") or {}).values():
            if net.get("IPAddress"):
                v4.append(net["IPAddress"])
            if net.get("GlobalIPv6Address"):
                v6.append(net["GlobalIPv6Address"])
        return v4, v6

    def cleanup(self):
        """Remove every container and network carrying the test label."""
        c = self.client
        for ctr in c.containers.list(all=True, filters={"label": LABEL}):
            with contextlib.suppress(Exception):
                ctr.remove(force=True)
        # Every network but the built-in ones (the engine is ours alone; a network made
        # --config-from cannot carry a label). Dependent networks first, then the
        # config-only networks they use.
        for _ in range(3):
            nets = [n for n in c.networks.list() if n.name not in ("bridge", "host", "none")]
            if not nets:
                break
            for net in sorted(nets, key=lambda n: n.attrs.get("ConfigOnly", False)):
                with contextlib.suppress(Exception):
                    net.remove()


# --------------------------------------------------------------------------- the daemon

class NotifyListener:
    """An AF_UNIX/SOCK_DGRAM socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []          # (monotonic time, "KEY=value")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            now = time.monotonic()
            with self._lock:
                for line in data.decode(errors="replace").splitlines():
                    if line:
                        self.messages.append((now, line))

    def lines(self):
        with self._lock:
            return [m for _, m in self.messages]

    def timed(self):
        """[(monotonic time of arrival, line), ...]"""
        with self._lock:
            return list(self.messages)

    def values(self, key):
        return [m.split("=", 1)[1] for m in self.lines() if m.startswith(key + "=")]

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Daemon:
    """`python3 -m macvlan_router run --config FILE` in namespace T (same interpreter as
    pytest), with its own NOTIFY_SOCKET and stderr captured to a file."""

    def __init__(self, lab, config=None, env=None, docker_host=None, wrap=()):
        self.lab = lab
        self.wrap = list(wrap)
        self.name = lab.unique("daemon-")
        self.config = lab.config_file(config, name=self.name + ".env", docker_host=docker_host)
        self.env_extra = dict(env or {})
        self.docker_host = docker_host
        self.stderr_path = lab.path(self.name + ".stderr")
        self.stdout_path = lab.path(self.name + ".stdout")
        self.proc = None
        self.notify = None
        self._notified = []
        self._timed = []
        self.started_at = None      # monotonic time of the start() call
        self.returncode = None

    def argv(self):
        return ["nsenter", f"--net=/run/netns/{self.lab.T}", "--", *self.wrap,
                sys.executable, "-m", "macvlan_router", "run", "--config", self.config]

    def start(self, wait_ready=True, timeout=30):
        self.notify = NotifyListener(self.lab.path(self.name + ".notify"))
        self.started_at = time.monotonic()
        env = self.lab.daemon_env(self.docker_host, self.env_extra)
        env["NOTIFY_SOCKET"] = self.notify.path
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            # nsenter execs the interpreter: self.proc.pid is the daemon itself
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=env, start_new_session=True)
        self.lab.daemons.append(self)
        if wait_ready:
            self.wait_ready(timeout=timeout)
        return self

    # observing -----------------------------------------------------------------
    @property
    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_notify(self, pred, timeout=20, desc=None):
        """Wait for a notification line matching pred (a str: exact line, or a callable)."""
        match = (lambda m: m == pred) if isinstance(pred, str) else pred

        def seen():
            for m in self.notified():
                if match(m):
                    return m
            if not self.alive():
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode} before "
                    f"{desc or pred!r}; stderr:\n{self.stderr[-4000:]}")
            return None
        try:
            return wait_until(seen, timeout=timeout, interval=0.05, desc=desc or repr(pred))
        except AssertionError as e:
            raise AssertionError(f"{e}\nnotifications: {self.notified()}\n"
                                 f"stderr:\n{self.stderr[-4000:]}") from None

    def wait_ready(self, timeout=30):
        return self.wait_notify("READY=1", timeout=timeout, desc="READY=1")

    def notified(self):
        """Every notification line received so far (also after the daemon stopped)."""
        return self.notify.lines() if self.notify is not None else list(self._notified)

    def notify_times(self, line):
        """Monotonic arrival times of every notification equal to line (e.g. WATCHDOG=1)."""
        timed = self.notify.timed() if self.notify is not None else self._timed
        return [t for t, m in timed if m == line]

    def count(self, line):
        return self.notified().count(line)

    def status(self):
        v = [m.split("=", 1)[1] for m in self.notified() if m.startswith("STATUS=")]
        return v[-1] if v else None

    # stopping ----------------------------------------------------------------------
    def send_signal(self, sig):
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout=20):
        """Wait for the process to end; return its exit status (raises on timeout)."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running {timeout}s later; stderr:\n"
                                 f"{self.stderr[-4000:]}") from None
        self._finish()
        return self.returncode

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.send_signal(sig)
        return self.wait_exit(timeout=timeout)

    def kill(self):
        return self.stop(sig=signal.SIGKILL, timeout=10)

    def kill_quietly(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(Exception):
                    os.kill(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    self.proc.wait(timeout=5)
        self._finish()

    def _finish(self):
        if self.notify is not None:
            time.sleep(0.1)  # let the reader drain what the daemon sent last
            self._notified = self.notify.lines()
            self._timed = self.notify.timed()
            self.notify.close()
            self.notify = None
        if self in self.lab.daemons:
            self.lab.daemons.remove(self)
            # shown by pytest when the test fails
            print(f"----- {self.name} stderr (exit {self.proc.returncode}) -----\n"
                  f"{self.stderr[-20000:]}")


# --------------------------------------------------------------------------- fixtures glue

def make_lab(lab_class=None, engine_class=None):
    """Sweep stale runs, build namespaces + engine + image (by default the Docker lab's).
    Caller must call teardown()."""
    sweep_stale_labs()
    lab = (lab_class or Lab)()
    try:
        lab.setup()
        engine = (engine_class or Engine)(lab)
        engine.start()
        engine.ensure_image()
    except BaseException:
        lab.teardown()
        raise
    return lab


def lab_session(prereq_problem, make):
    """Body of a session fixture: the lab make() builds, torn down at the end; skipped when
    prerequisites are missing, failed instead under MVR_REQUIRE_INTEGRATION=1 (CI)."""
    import pytest
    problem = prereq_problem()
    if problem:
        if os.environ.get("MVR_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"integration prerequisites missing: {problem}")
        pytest.skip(problem)
    the_lab = make()
    try:
        yield the_lab
    finally:
        the_lab.teardown()


def reset_around(the_lab):
    """Body of a per-test fixture: the lab clean before the test and reset after it."""
    the_lab.reset()
    try:
        yield the_lab
    finally:
        the_lab.reset()


def random_suffix():
    return secrets.token_hex(3)


# --------------------------------------------------------------------------- test helpers

def assert_no_traceback(text, what="output"):
    assert "Traceback (most recent call last)" not in text, f"traceback in {what}:\n{text}"


def shim_addr(lab, shim, family):
    """The shim's (first) global address of a family, waiting until it is usable
    (IPv6: DAD finished, no 'tentative' flag)."""
    def usable():
        for a in lab.global_addrs(shim, family):
            if "tentative" not in a["flags"] and "dadfailed" not in a["flags"]:
                return a
        return None
    return wait_until(usable, timeout=15, desc=f"a usable IPv{family} address on {shim}")


class RouteWatcher:
    """`ip monitor link route` in namespace T, in the background: records, with the time it
    saw them, every deletion of one of our routes (protocol 210, main table), every deletion
    of a link and every link going from up to down. A shim that goes down or away takes its
    IPv4 routes with it without a word from the kernel, so "no owned route lost" needs all.

    `blind` is set when the monitor itself missed messages (its socket overflowed).
    """

    MARKER = "198.18.255.254"   # an unreachable route in table 251 proves we are listening
    ROUTE = re.compile(r"^Deleted (?:\d+ )?(\S+) (.*)$")
    LINK = re.compile(r"^(Deleted )?\d+: ([^:@\s]+)[^:]*: <([^>]*)>")

    def __init__(self, lab):
        self.lab = lab
        self.events = []        # (monotonic time, kind, name or dst, line)
        self.blind = False
        self._lock = threading.Lock()
        self._marker_seen = threading.Event()
        self._up = {}           # link name -> up when last seen (a new link starts down)
        self.proc = None
        self._threads = []

    def start(self, timeout=10):
        self._up = {link["ifname"]: "UP" in link.get("flags", []) for link in self.lab.links()}
        # -N: numbers (proto 210, whatever rt_protos says); a big buffer, to keep up.
        self.proc = subprocess.Popen(
            ["ip", "-N", "-o", "-rc", str(4 << 20), "-n", self.lab.T, "monitor", "link", "route"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1)
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_errors, daemon=True)]
        for thread in self._threads:
            thread.start()
        marker = ["route", "add", "unreachable", f"{self.MARKER}/32", "table", "251"]
        try:
            for _ in range(int(timeout / 0.2) + 1):
                self.lab.ipc(*marker, check=False)
                if self._marker_seen.wait(0.2):
                    return self
                self.lab.ipc("route", "del", f"{self.MARKER}/32", "table", "251", check=False)
            raise LabError(f"ip monitor in {self.lab.T} did not start within {timeout}s")
        finally:
            self.lab.ipc("route", "del", f"{self.MARKER}/32", "table", "251", check=False)

    def _read(self):
        for line in self.proc.stdout:
            now = time.monotonic()
            if self.MARKER in line:
                self._marker_seen.set()
                continue
            event = self._parse(line.strip())
            if event:
                with self._lock:
                    self.events.append((now, *event, line.strip()))

    def _read_errors(self):
        for line in self.proc.stderr:
            if "No buffer space" in line or "receive error" in line:
                self.blind = True

    def _parse(self, line):
        m = self.LINK.match(line)
        if m:
            name, up = m.group(2), "UP" in m.group(3).split(",")
            was_up = self._up.pop(name, False)
            if m.group(1):
                return "link-deleted", name
            self._up[name] = up
            return ("link-down", name) if was_up and not up else None
        m = self.ROUTE.match(line)
        if m and " proto 210" in f" {m.group(2)}" and " table " not in f" {m.group(2)}":
            return "route-deleted", norm_dst(m.group(1) if "/" in m.group(1)
                                             else host_prefix(m.group(1)))
        return None

    def lost(self, dsts=(), links=()):
        """Deletions of the given owned routes (addresses or prefixes) and deletions or
        downs of the given links seen so far: [(time, kind, what, line), ...]."""
        want = {norm_dst(d if "/" in str(d) else host_prefix(d)) for d in dsts}
        with self._lock:
            return [e for e in self.events
                    if (e[1] == "route-deleted" and e[2] in want)
                    or (e[1] != "route-deleted" and e[2] in set(links))]

    def route_deletions(self):
        with self._lock:
            return [e for e in self.events if e[1] == "route-deleted"]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def netlink_sockets(pid):
    """The netlink sockets process pid holds, from /proc/PID/net/netlink (the sockets of its
    namespace) matched to its file descriptors: [{'groups': int, 'rmem': int, 'drops': int,
    'inode': int}, ...]. 'drops' counts messages lost to a full receive buffer."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    lines = Path(f"/proc/{pid}/net/netlink").read_text().splitlines()
    header = lines[0].split()
    out = []
    for line in lines[1:]:
        row = dict(zip(header, line.split()))
        if int(row["Inode"]) in inodes:
            out.append({"groups": int(row["Groups"], 16), "rmem": int(row["Rmem"]),
                        "drops": int(row["Drops"]), "inode": int(row["Inode"])})
    return out
