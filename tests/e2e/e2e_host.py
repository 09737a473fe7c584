"""Helpers for the package end-to-end test: a real systemd host in docker-in-docker.

    machine's own netns (never touched)
      netns mvre2e-<pid>               an outer dockerd confined here (DESIGN.md section 4)
        container "box" (--network none, systemd as PID 1, a debootstrapped Debian release)
          lan0 <-veth-> lanpeer0        the box's "LAN" (documentation addresses only)
          docker.service                the inner engine, a macvlan network on lan0
          macvlan-router.service        installed with apt from the .deb under test

Each release's root file system (RELEASES: bookworm and trixie) is built once with
debootstrap and cached as a tarball under /var/cache/macvlan-router-tests/ (keyed by its
release and package list). Names carry the pid of the pytest process, and what an earlier
run whose process is gone left behind is swept.
Every wait is bounded in time and in iterations.
"""

import contextlib
import dataclasses
import email.utils
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests"))
import lab  # noqa: E402  (the integration lab's process and tree helpers)
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DOCKER_CLI = "/usr/bin/docker"        # Debian's client, matching Debian's dockerd
DOCKERD = "/usr/sbin/dockerd"
CACHE_DIR = Path(os.environ.get("MVR_E2E_CACHE", "/var/cache/macvlan-router-tests"))
NS_PREFIX = "mvre2e-"
LABEL = "org.macvlan-router.e2e"

# Debian packages the test needs on the machine itself (and docker-cli where it exists:
# from Debian 13 on, docker.io only recommends its client).
# git: the boxes get the checkout as `git ls-files` lists it (checkout_tar), and a CI image
# may have received the checkout without having git itself.
HOST_PACKAGES = ("debootstrap", "docker.io", "lintian", "systemd", "iproute2", "util-linux",
                 "xz-utils", "git")

# The box has no network: everything the package and the test use must be in the image.
COMMON_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3", "python3-docker", "python3-pyroute2",
    "python3-systemd", "docker.io", "busybox-static", "iproute2", "apt-utils", "man-db",
    "procps", "kmod",
    # `make install` from a source tree, as the README has a user do it.
    "make", "build-essential", "dpkg-dev", "debhelper", "dh-python",
    "pybuild-plugin-pyproject", "python3-all", "python3-setuptools", "python3-pytest",
    "python3-hypothesis",
)
# Nothing to log in on, no hardware to wait for in a container.
COMMON_MASKED = (
    "getty.target", "console-getty.service", "systemd-udevd.service",
    "systemd-udev-trigger.service", "systemd-timesyncd.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer", "man-db.timer",
    "dpkg-db-backup.timer",
)


@dataclasses.dataclass(frozen=True)
class Release:
    """A Debian release the package is tested on, and how its box differs."""
    suite: str
    extra_packages: tuple = ()
    extra_masked: tuple = ()
    recipe: str = "2"     # bump when the way this rootfs is prepared (masks too) changes

    @property
    def packages(self):
        return COMMON_PACKAGES + self.extra_packages

    @property
    def masked(self):
        return COMMON_MASKED + self.extra_masked

    def key(self):
        h = hashlib.sha256(" ".join((self.suite, self.recipe) + self.packages).encode())
        return h.hexdigest()[:12]

    def image(self):
        return f"mvr-e2e-{self.suite}:{self.key()}"


# Podman with netavark, for the package's Podman test (test_podman_package.py).
PODMAN_PACKAGES = ("podman", "netavark", "aardvark-dns", "crun")

RELEASES = (
    Release("bookworm", extra_packages=PODMAN_PACKAGES),        # Debian 12
    # Debian 13: debootstrap --include takes no recommendations, and docker.io only
    # recommends its client here; systemd-modules-load.service fails in a container (the
    # box would boot "degraded").
    Release("trixie", extra_packages=("docker-cli",) + PODMAN_PACKAGES,
            extra_masked=("systemd-modules-load.service",)),
)


def marks(what):
    """The pytest marks every e2e module carries: `what` needs root and a Debian machine."""
    import pytest
    return [
        pytest.mark.skipif(os.geteuid() != 0,
                           reason=f"{what} need root (apt, network namespaces, dockerd)"),
        pytest.mark.skipif(not Path("/etc/debian_version").exists(),
                           reason=f"{what} need a Debian machine"),
    ]


class E2EError(Exception):
    """The test environment could not be set up (not a failure of the package)."""


def run(cmd, check=True, timeout=120, input=None, env=None, cwd=None):
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise E2EError(f"command failed (rc={p.returncode}): {' '.join(cmd)}\n"
                       f"stdout: {p.stdout.strip()[-3000:]}\nstderr: {p.stderr.strip()[-3000:]}")
    return p


def debian_env(**extra):
    """A Debian-only environment: no pyenv/virtualenv Python, no PYTHON* variables."""
    env = {"PATH": DEBIAN_PATH, "HOME": os.environ.get("HOME", "/root"), "LC_ALL": "C.UTF-8"}
    env.update(extra)
    return env


def wait_until(cond, timeout, interval=0.5, desc=None):
    """lab.wait_until, with this module's errors counted as "not yet"."""
    return lab.wait_until(cond, timeout, interval, desc,
                          errors=(E2EError, OSError, subprocess.SubprocessError))


# --------------------------------------------------------------------------- host tools

def missing_host_tools():
    need = {"debootstrap": "/usr/sbin/debootstrap", "dockerd": DOCKERD, "docker": DOCKER_CLI,
            "lintian": "/usr/bin/lintian", "systemd-analyze": "/usr/bin/systemd-analyze",
            "ip": "/usr/sbin/ip", "git": "/usr/bin/git"}
    for tool in ("nsenter", "unshare"):
        need[tool] = shutil.which(tool, path=DEBIAN_PATH) or f"/usr/bin/{tool}"
    return [t for t, p in need.items() if not os.access(p, os.X_OK)]


@contextlib.contextmanager
def no_service_starts():
    """While installing packages on the machine, keep invoke-rc.d/deb-systemd-invoke from
    starting services (a dockerd in the machine's own network namespace, above all)."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\n# macvlan-router e2e test: start no service\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink()


def host_packages(env):
    """HOST_PACKAGES, and docker-cli when apt knows it (Debian 13 and later)."""
    known = run(["apt-cache", "show", "docker-cli"], check=False, env=env).returncode == 0
    return HOST_PACKAGES + (("docker-cli",) if known else ())


def install_host_tools():
    """apt-get install what the test needs on the machine, when something is missing."""
    problem = lab.chroot_problem()  # the boxes' `docker exec` would leave the tree too
    if problem:
        raise E2EError(problem)
    if not missing_host_tools():
        return
    apt = ["apt-get", "-y", "-q", "-o", "Acquire::Retries=5", "--no-install-recommends"]
    env = debian_env(DEBIAN_FRONTEND="noninteractive")
    with no_service_starts():
        p = run(apt + ["install", *host_packages(env)], check=False, timeout=900, env=env)
        # Lists that are stale or missing may not know docker-cli yet.
        if p.returncode != 0 or missing_host_tools():
            run(["apt-get", "-q", "-o", "Acquire::Retries=5", "update"], timeout=600, env=env)
            run(apt + ["install", *host_packages(env)], timeout=900, env=env)
    if missing_host_tools():
        raise E2EError(f"still missing after apt-get install: {missing_host_tools()}")


# --------------------------------------------------------------------------- the package

def build_deb(tree=REPO_ROOT, nocheck=False):
    """Build the package with the project's own entry point (make deb -> debian/build-deb)."""
    env = debian_env(DEBIAN_FRONTEND="noninteractive")
    if nocheck:
        env["DEB_BUILD_OPTIONS"] = "nocheck"
    p = run([tree / "debian" / "build-deb"], check=False, timeout=1200, env=env, cwd=tree)
    if p.returncode != 0:
        raise AssertionError(f"debian/build-deb failed (rc={p.returncode}):\n"
                             f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    version = run(["dpkg-parsechangelog", "-S", "Version"], cwd=tree,
                  env=debian_env()).stdout.strip()
    build = tree / "build"
    deb = build / f"macvlan-router_{version}_all.deb"
    changes = next(build.glob(f"macvlan-router_{version}_*.changes"))
    assert deb.is_file(), f"{deb} was not built"
    return deb, changes


def checkout_tar():
    """The checkout as git sees it (tracked and new files), as a clone would have it."""
    listing = run(["git", "-C", REPO_ROOT, "ls-files", "-z", "--cached", "--others",
                   "--exclude-standard"]).stdout
    files = [f for f in listing.split("\0") if f and (REPO_ROOT / f).exists()]
    return subprocess.run(["tar", "-C", REPO_ROOT, "--null", "-T", "-", "-cf", "-"],
                          input="\0".join(files).encode(), capture_output=True,
                          check=True).stdout


def newer_source(dest, suffix="+e2e1"):
    """A copy of the checkout whose debian/changelog has one entry more (VERSION+e2e1): it
    builds a package that upgrades the one under test, from the same code."""
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-C", dest, "-xf", "-"], input=checkout_tar(), check=True)
    changelog = dest / "debian" / "changelog"

    def field(name):
        return run(["dpkg-parsechangelog", "-S", name], cwd=dest, env=debian_env()).stdout.strip()

    version = field("Version") + suffix
    entry = (f"macvlan-router ({version}) unstable; urgency=medium\n\n"
             "  * The package under test with a higher version, to test the upgrade.\n\n"
             f" -- {field('Maintainer')}  {email.utils.formatdate()}\n\n")
    changelog.write_text(entry + changelog.read_text())
    return dest, version


# --------------------------------------------------------------------------- rootfs cache

def debian_mirror():
    """The Debian mirror the machine's apt uses (deb822 or one-line sources)."""
    texts = []
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if f.suffix in (".list", ".sources", "") and f.is_file():
            with contextlib.suppress(OSError):
                texts.append(f.read_text())
    for text in texts:
        for m in re.finditer(r"(?:URIs:|^deb)\s+(?:\[[^\]]*\]\s+)?(\S+/debian)/?\s", text + "\n",
                             re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


def rootfs_tarball(release, log=print):
    """Path of the release's cached rootfs tarball; debootstrap it first when missing."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    suite = release.suite
    tarball = CACHE_DIR / f"{suite}-systemd-{release.key()}.tar"
    if tarball.is_file():
        return tarball, True
    for stale in CACHE_DIR.glob(f"{suite}-systemd-*.tar*"):
        m = re.search(r"\.(\d+)\.tmp$", stale.name)
        if not m or not lab.pid_alive(int(m.group(1))):
            stale.unlink()
    work = CACHE_DIR / f"build-{os.getpid()}"
    mirror = debian_mirror()
    last = None
    for attempt in range(1, 4):
        lab.remove_tree(work)
        log(f"debootstrap {suite} from {mirror} (attempt {attempt})")
        p = run(["debootstrap", "--variant=minbase", f"--include={','.join(release.packages)}",
                 suite, work, mirror], check=False, timeout=1500, env=debian_env())
        if p.returncode == 0:
            break
        last = p.stdout[-2000:] + p.stderr[-2000:]
        time.sleep(5 * attempt)
    else:
        lab.remove_tree(work)
        raise E2EError(f"debootstrap failed three times:\n{last}")
    try:
        _prepare_rootfs(work, release)
        tmp = tarball.with_name(tarball.name + f".{os.getpid()}.tmp")
        run(["tar", "-C", work, "--numeric-owner", "-cf", tmp, "."], timeout=600)
        tmp.rename(tarball)
    finally:
        lab.remove_tree(work)
    return tarball, False


def _prepare_rootfs(root, release):
    root = Path(root)
    (root / "etc/hostname").write_text("mvr-e2e\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost mvr-e2e\n::1 localhost\n")
    # A fixed machine id: the shim's MAC is derived from it.
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    for unit in release.masked:
        link = root / "etc/systemd/system" / unit
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")
    # The package is installed offline from a file: no lists, no recommends.
    (root / "etc/apt/apt.conf.d/99e2e").write_text(
        'APT::Install-Recommends "false";\nAcquire::Languages "none";\n')
    run(["chroot", root, "apt-get", "clean"], check=False, env=debian_env())
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- cleanup helpers

def sweep_stale():
    """Remove namespaces, engines and directories left by e2e runs whose process is gone."""
    p = run(["ip", "netns", "list"], check=False, timeout=10)
    for line in p.stdout.splitlines():
        name = (line.split() or [""])[0]
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)", name)
        if m and not lab.pid_alive(int(m.group(1))):
            lab.kill_netns_processes(name, grace=15)
            run(["ip", "netns", "del", name], check=False, timeout=10)
    for d in Path("/tmp").glob(NS_PREFIX + "*"):
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)", d.name)
        if m and d.is_dir() and not lab.pid_alive(int(m.group(1))):
            lab.remove_tree(d)
    # A debootstrap interrupted with its run.
    for d in CACHE_DIR.glob("build-*"):
        m = re.fullmatch(r"build-(\d+)", d.name)
        if m and d.is_dir() and not lab.pid_alive(int(m.group(1))):
            lab.remove_tree(d)


# --------------------------------------------------------------------------- the outer engine

class OuterDocker:
    """A dockerd confined to a network namespace of its own, with its own directories."""

    def __init__(self):
        self.name = f"{NS_PREFIX}{os.getpid()}"
        self.dir = Path("/tmp") / self.name          # short: socket paths are limited
        self.sock = self.dir / "docker.sock"
        self.proc = None
        self.log = None

    def start(self, timeout=60):
        self.dir.mkdir(mode=0o700, exist_ok=False)
        run(["ip", "netns", "add", self.name])
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        self.log = open(self.dir / "dockerd.log", "w")
        # nsenter, not `ip netns exec` (which remounts /sys: "Devices cgroup isn't mounted").
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.name}", "--", DOCKERD,
             "--data-root", self.dir / "root", "--exec-root", self.dir / "exec",
             "-H", f"unix://{self.sock}", "--pidfile", self.dir / "pid",
             "--bridge=none", "--iptables=false", "--ip6tables=false"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=debian_env(), start_new_session=True)
        wait_until(lambda: self.proc.poll() is None and
                   self.docker("version", check=False, timeout=10).returncode == 0,
                   timeout, desc="the outer dockerd to answer")
        if self.proc.poll() is not None:
            raise E2EError(f"outer dockerd exited: {self.read_log()}")

    def read_log(self):
        with contextlib.suppress(OSError):
            return (self.dir / "dockerd.log").read_text()[-3000:]
        return ""

    def docker(self, *args, check=True, timeout=120, input=None):
        return run([DOCKER_CLI, "-H", f"unix://{self.sock}", *args], check=check,
                   timeout=timeout, input=input, env=debian_env())

    def stop(self):
        if self.proc and self.proc.poll() is None:
            p = self.docker("ps", "-aq", "--filter", f"label={LABEL}", check=False, timeout=30)
            for cid in p.stdout.split():
                self.docker("rm", "-f", cid, check=False, timeout=60)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.log:
            self.log.close()
        # containerd and shims started by this engine live in our namespace only.
        lab.kill_netns_processes(self.name, grace=10)
        run(["ip", "netns", "del", self.name], check=False, timeout=10)
        lab.remove_tree(self.dir)


# --------------------------------------------------------------------------- the systemd box

BOX_RUN_FLAGS = (
    "--network", "none",
    "--security-opt", "seccomp=unconfined", "--security-opt", "systempaths=unconfined",
    "--tmpfs", "/run", "--tmpfs", "/run/lock",
    "--tmpfs", "/var/lib/docker:rw,exec,size=2g",
    # Podman's storage: overlay cannot stack on the box's own overlay root.
    "--tmpfs", "/var/lib/containers:rw,exec,size=1g",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup", "-e", "container=docker",
    "--stop-signal", "SIGRTMIN+3",
)


# Capability numbers (linux/capability.h) and the names `docker run --cap-add` takes: those
# Docker 20.10 (Debian 12) knows. It rejects the later PERFMON, BPF and CHECKPOINT_RESTORE
# ("unknown capability"), so the box has them on no release.
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
)


def box_capabilities():
    """--cap-add for the CAPABILITIES a process may have on this machine (its bounding set).

    Not `--cap-add ALL --cap-drop` what the machine withholds (this one withholds
    SYS_RESOURCE): Docker 20.10 (Debian 12) takes ALL as every capability the kernel knows,
    so runc fails with "unable to apply caps" unless the missing one is dropped, while
    Docker 26 (Debian 13) refuses that drop ("invalid CapDrop: capability not supported by
    your kernel or not available in the current environment")."""
    status = Path("/proc/self/status").read_text()
    bounding = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    args = []
    for bit, name in enumerate(CAPABILITIES):
        if bounding >> bit & 1:
            args += ["--cap-add", name]
    return args


def unit_dir():
    """Where the package built on this machine has its systemd units: under /usr when its
    debhelper has dh_movetousr (Debian 13 on, merged /usr), under /lib before (debian/rules)."""
    if shutil.which("dh_movetousr", path=DEBIAN_PATH):
        return "usr/lib/systemd/system"
    return "lib/systemd/system"


class Box:
    """A container running systemd as PID 1: the Debian host the package is installed on."""

    def __init__(self, engine, release):
        self.engine = engine
        self.release = release
        self.image = release.image()
        self.name = f"{NS_PREFIX}{os.getpid()}-{release.suite}"

    def start(self, timeout=90):
        self.engine.docker("run", "-d", "--name", self.name, "--hostname", "mvr-e2e",
                           "--label", LABEL, *BOX_RUN_FLAGS, *box_capabilities(),
                           self.image, "/sbin/init")
        # An immediate exec cannot reach the bus: wait for boot to finish.
        state = wait_until(
            lambda: self.sh("timeout 10 systemctl is-system-running --wait",
                            check=False, timeout=20).stdout.strip()
            in ("running", "degraded") and
            self.sh("systemctl is-system-running", check=False).stdout.strip(),
            timeout, interval=1, desc="systemd in the box to finish booting")
        if state == "degraded":
            failed = self.sh("systemctl --failed --no-legend --plain", check=False).stdout
            print(f"e2e: box booted degraded; failed units:\n{failed}", file=sys.stderr)
        return state

    def sh(self, script, check=True, timeout=120, input=None):
        args = ["exec"] + (["-i"] if input is not None else []) + [self.name, "sh", "-c", script]
        return self.engine.docker(*args, check=check, timeout=timeout, input=input)

    def cp_in(self, src, dst):
        self.engine.docker("cp", str(src), f"{self.name}:{dst}")

    def untar(self, data, dest):
        """Unpack a tar stream (bytes) into `dest` in the box, emptied first."""
        p = subprocess.run([DOCKER_CLI, "-H", f"unix://{self.engine.sock}", "exec", "-i",
                            self.name, "sh", "-c",
                            f"rm -rf {dest} && mkdir -p {dest} && tar -C {dest} -xf -"],
                           input=data, capture_output=True, timeout=120, env=debian_env())
        if p.returncode != 0:
            raise E2EError(f"cannot unpack into {dest} in the box: {p.stderr.decode()[-2000:]}")

    def write(self, path, text):
        self.sh(f"cat > {path}", input=text)

    def show(self, unit, *props):
        p = self.sh(f"systemctl show {unit} " + " ".join(f"-p {x}" for x in props))
        return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)

    def journal(self, unit="macvlan-router", extra=""):
        return self.sh(f"journalctl --no-pager -o cat -u {unit} {extra}", check=False).stdout

    def stop(self):
        self.engine.docker("stop", "-t", "15", self.name, check=False, timeout=60)
        self.engine.docker("rm", "-f", self.name, check=False, timeout=60)


@contextlib.contextmanager
def booted_box(release, log=print):
    """The release's rootfs booted with systemd as PID 1 under a confined outer engine."""
    t = time.monotonic()
    tarball, cached = rootfs_tarball(release, log=log)
    log(f"rootfs {tarball.name} {'cached' if cached else 'built'} "
        f"in {time.monotonic() - t:.1f}s")
    engine = OuterDocker()
    box = None
    try:
        t = time.monotonic()
        engine.start()
        engine.docker("import", tarball, release.image(), timeout=600)
        box = Box(engine, release)
        state = box.start()
        log(f"{release.suite} box up ({state}) in {time.monotonic() - t:.1f}s")
        yield box
    finally:
        if box is not None:
            box.stop()
        engine.stop()


class Watch:
    """While something happens in the box: a ping from the box to `addr` every 10 ms (100 a
    second) and `ip monitor` of links, addresses and routes, both in the background and
    bounded in time. A lost packet is a gap in the sequence numbers of the replies, so the
    one in flight when the ping is stopped does not count."""

    DIR = "/root/watch"

    def __init__(self, box, addr, limit=600):
        self.box = box
        self.addr = addr
        self.limit = limit
        self.lost = self.monitor = None

    def __enter__(self):
        flag = "-6 " if ":" in self.addr else ""
        d = self.DIR
        self.box.sh(f"""set -e
rm -rf {d} && mkdir -p {d}
setsid timeout {self.limit} ip -o monitor link address route > {d}/monitor 2>&1 < /dev/null &
echo $! > {d}/monitor.pid
setsid busybox ping {flag}-i 0.01 -w {self.limit} {self.addr} > {d}/ping 2>&1 < /dev/null &
echo $! > {d}/ping.pid
""")
        self.wait_replies(50, desc=f"the first replies from {self.addr}")
        return self

    def replies(self):
        text = self.box.sh(f"cat {self.DIR}/ping", check=False).stdout
        return [int(n) for n in re.findall(r"seq=(\d+)", text)]

    def wait_replies(self, more, timeout=30, desc=None):
        """Wait for `more` replies beyond those seen now: the ping was alive after an event."""
        target = len(self.replies()) + more
        wait_until(lambda: len(self.replies()) >= target, timeout, interval=0.2,
                   desc=desc or f"{more} more replies from {self.addr}")

    def __exit__(self, *exc):
        self.box.sh(f"for p in ping monitor; do kill $(cat {self.DIR}/$p.pid) 2>/dev/null; "
                    "done; true", check=False)
        seen = set(self.replies())
        self.lost = sorted(set(range(max(seen, default=-1) + 1)) - seen)
        self.replied = len(seen)
        self.monitor = self.box.sh(f"cat {self.DIR}/monitor", check=False).stdout.splitlines()
        return False

    def deleted(self, name):
        """What `ip monitor` saw deleted on link `name`: links, addresses, routes."""
        return [line for line in self.monitor
                if line.startswith("Deleted") and re.search(rf"\b{re.escape(name)}\b", line)]
