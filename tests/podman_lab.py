"""A real rootful Podman for the integration tests, in a lab of its own (tests/lab.py's).

  namespace T (the "host")                          namespace P (a LAN peer)
    lo, lan0, lan1 as in tests/lab.py           <-veth->  peer0, peer1
    a keeper process holding a private mount namespace, where /run is a fresh tmpfs
    podman --network-backend netavark system service --time=0 unix://DIR/podman.sock
    the podman CLI (podman run, network connect, ...), as a user would run it
    the daemon under test (DOCKER_HOST=unix://DIR/podman.sock in its file)

Nothing here touches the machine's own network or configuration: storage, network
definitions and the events log live under the lab's directory (CONTAINERS_CONF and
CONTAINERS_STORAGE_CONF), and what rootful Podman keeps in fixed places that no option
moves (/run/containers/networks for netavark's address database, /run/crun, /run/netns
for the containers' namespaces, /run/libpod) lands in the private /run, which goes with
the keeper. Podman and every process it starts run in that mount namespace and in T.

On this machine a container needs `cgroups = "disabled"` (the cgroup v1 net_cls hierarchy
is read-only) and explicit rlimits (Podman's defaults exceed the hard limits here); the
events log and the containers' logs are files: there is no journald here, and where there is
one (a box, a host with systemd) the private /run hides its socket, so Podman 4.3 logging to it
fails every `podman run` ("failed to initialize journal"). Debian 12's netavark has no DHCP for
macvlan networks ("DHCP is not yet supported with netavark").

Namespaces are named `mvrpod-<pid of pytest>-T|P`, apart from the Docker lab's, so both
can exist in one pytest run; those of a run whose process is gone are swept at the next
start, as tests/lab.py does for its own.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import lab as lablib

NS_PREFIX = "mvrpod-"
PODMAN = "/usr/bin/podman"
LIBPOD = "/v4.0.0/libpod"   # libpod paths need a libpod version (every Podman 4 and 5 has it)
KEEPER_LIFETIME = 6 * 3600  # seconds: an upper bound even if every cleanup failed
# Containers' main command: ends at once on SIGTERM (`podman stop` is then fast) and by
# itself within ten minutes even if a run is killed before it removes them.
COMMAND = ["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"]

CONTAINERS_CONF = """\
[containers]
cgroups = "disabled"
log_driver = "k8s-file"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{dir}/events.log"
runtime = "crun"

[network]
network_backend = "netavark"
network_config_dir = "{dir}/networks"
"""
STORAGE_CONF = """\
[storage]
driver = "overlay"
runroot = "{dir}/runroot"
graphroot = "{dir}/root"
"""


def prereq_problem():
    """Why the Podman lab cannot run here, or None."""
    problem = lablib.prereq_problem()
    if problem:
        return problem
    for tool in (PODMAN, "/usr/bin/crun", "/usr/lib/podman/netavark", "/usr/bin/unshare"):
        if not os.access(tool, os.X_OK):
            return (f"{tool} missing: apt-get install podman netavark aardvark-dns crun "
                    "(tests/run-all installs them)")
    return None


def sweep_stale_labs():
    p = lablib.run(["ip", "netns", "list"], check=False, timeout=10)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)-[TP]", name)
        if m and not lablib.pid_alive(int(m.group(1))):
            lablib.kill_netns_processes(name, grace=3)
            lablib.run(["ip", "netns", "del", name], check=False, timeout=10)


class PodmanLab(lablib.Lab):
    """tests/lab.py's namespaces and helpers, under names of their own, with Podman."""

    def __init__(self):
        super().__init__()
        self.T = f"{NS_PREFIX}{self.run_id}-T"
        self.P = f"{NS_PREFIX}{self.run_id}-P"

    def teardown(self):
        """Daemons, then Podman's containers, service and private /run, then the rest."""
        for daemon in list(self.daemons):
            daemon.kill_quietly()
        try:
            if self.engine is not None:
                self.engine.teardown()
        finally:
            super().teardown()


class Podman(lablib.Engine):
    """`podman system service` and the podman CLI, confined as the module says.

    Inherits the docker-py client (Podman answers Docker's API), the image import and
    the ping helpers from lab.Engine; creates networks and containers with the podman
    CLI, as a user does."""

    DIR, SOCKET, LOG = "podman", "podman.sock", "service.log"

    def __init__(self, lab):
        super().__init__(lab)
        self.networks_dir = self.dir / "networks"
        for name, text in (("containers.conf", CONTAINERS_CONF), ("storage.conf", STORAGE_CONF),
                           ("registries.conf", "")):
            (self.dir / name).write_text(text.format(dir=self.dir))
        self.keeper = None

    def env(self):
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.dir),
                "CONTAINERS_CONF": str(self.dir / "containers.conf"),
                "CONTAINERS_STORAGE_CONF": str(self.dir / "storage.conf"),
                "CONTAINERS_REGISTRIES_CONF": str(self.dir / "registries.conf")}

    def inside(self, *cmd):
        """A command line run in the keeper's mount namespace and in T."""
        return ["nsenter", "-t", str(self.keeper.pid), "-m", "-n", "--", *map(str, cmd)]

    # the service -------------------------------------------------------------------
    def start(self, timeout=60):
        if self.running():
            return
        if self.keeper is None or self.keeper.poll() is not None:
            self._start_keeper()
        with open(self.log, "ab") as log:
            log.write(f"\n=== start {time.ctime()} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.inside(PODMAN, "--network-backend", "netavark", "system", "service",
                            "--time=0", self.host),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env(),
                start_new_session=True)
        self._client = None
        lablib.wait_until(self._answers, timeout=timeout, interval=0.1,
                          desc="podman system service to answer")

    def _start_keeper(self):
        # nsenter and unshare exec what follows, and sh execs sleep once /run is mounted:
        # the keeper's pid is Popen's, and "sleep" in its comm means the mount is there.
        self.keeper = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.lab.T}", "--", "unshare", "--mount",
             "--propagation", "private", "--", "sh", "-c",
             f"mount -t tmpfs -o mode=0755,size=64m mvrpod-run /run && "
             f"exec sleep {KEEPER_LIFETIME}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)

        def mounted():
            if self.keeper.poll() is not None:
                raise AssertionError(f"the mount namespace keeper exited: "
                                     f"{self.keeper.stderr.read().decode(errors='replace')}")
            return Path(f"/proc/{self.keeper.pid}/comm").read_text().strip() == "sleep"
        lablib.wait_until(mounted, timeout=10, desc="a private /run for Podman")

    def stop(self, timeout=30, sig=signal.SIGTERM, quiet=False):
        """Stop the service only: containers run on (conmon holds them), as on a host."""
        super().stop(timeout=timeout, sig=sig, quiet=quiet)

    def teardown(self):
        """Containers, service and keeper, in that order; the private /run goes last."""
        if self.keeper is not None and self.keeper.poll() is None:
            self.cli("rm", "--all", "--force", "--time", "0", check=False, timeout=120)
        self.stop(quiet=True)
        if self.keeper is not None:
            with contextlib.suppress(ProcessLookupError):
                self.keeper.kill()
            self.keeper.wait(timeout=10)
            self.keeper = None

    # CLI ----------------------------------------------------------------------------
    def cli(self, *args, check=True, timeout=60):
        return lablib.run(self.inside(PODMAN, *args), check=check, timeout=timeout,
                          env=self.env())

    def network(self, name, parent="lan0", v6=False, ip_range=True, subnet=None,
                gateway=None, subnet6=None, extra=()):
        """podman network create -d macvlan ... (parent None: no -o parent). Podman has no
        --aux-address: by default the range is the upper half of the subnet, away from
        the host and the peer."""
        lan = lablib.LANS.get(parent, lablib.LAN0)
        args = ["network", "create", "-d", "macvlan", "--label", f"{lablib.LABEL}=1",
                "--subnet", subnet or lan["subnet"], "--gateway", gateway or lan["gateway"]]
        if ip_range:
            args += ["--ip-range", lan["ip_range"] if ip_range is True else ip_range]
        if v6:
            args += ["--ipv6", "--subnet", subnet6 or lan["subnet6"],
                     "--gateway", lan["gateway6"]]
            if ip_range:
                args += ["--ip-range", lan["ip_range6"]]
        if parent:
            args += ["-o", f"parent={parent}"]
        self.cli(*args, *extra, name)
        return name

    def container(self, name, network, ip=None, ip6=None, cap_add=(), cmd=None, start=True):
        """A bb:latest container on network (`podman run -d`, or `podman create`). The
        image is there from the lab's start: the CLI works while the service is away."""
        args = ["run", "-d"] if start else ["create"]
        args += ["--name", name, "--label", f"{lablib.LABEL}=1", "--network", network]
        if ip:
            args += ["--ip", ip]
        if ip6:
            args += ["--ip6", ip6]
        # busybox ping opens a raw socket, and Podman 5 no longer grants NET_RAW by
        # default: without it every ping from a container fails, whatever the routes.
        for cap in ("NET_RAW", *cap_add):
            args += ["--cap-add", cap]
        self.cli(*args, lablib.IMAGE, *(cmd or COMMAND))
        return name

    def exec(self, container, *cmd, timeout=30):
        p = self.cli("exec", container, *cmd, check=False, timeout=timeout)
        return p.returncode, p.stdout + p.stderr

    def cleanup(self):
        """Remove every container and every network but Podman's default one."""
        self.cli("rm", "--all", "--force", "--time", "0", timeout=120)
        names = self.cli("network", "ls", "--format", "{{.Name}}").stdout.split()
        doomed = [n for n in names if n != "podman"]
        if doomed:
            self.cli("network", "rm", "--force", *doomed)

    # reading Podman as the daemon does ------------------------------------------------
    def libpod(self, path):
        """GET a libpod path over the socket (docker-py builds only Docker-versioned URLs)."""
        api = self.client.api
        return api._result(api._get(api._url(LIBPOD + path, versioned_api=False)), json=True)

    def redefine(self, name, change):
        """Rewrite network `name`'s definition file with change(dict) and let Podman see it
        (it re-reads the directory when its time stamp moves): how the lab gives a network
        a shape this Podman cannot create, such as Podman 5's DHCP networks."""
        path = self.networks_dir / f"{name}.json"
        definition = json.loads(path.read_text())
        change(definition)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(definition))
        os.replace(tmp, path)
        stamp = time.time() + 1
        os.utime(self.networks_dir, (stamp, stamp))


def make_lab():
    """Sweep stale runs, build namespaces + Podman + image. Caller must call teardown()."""
    sweep_stale_labs()
    return lablib.make_lab(PodmanLab, Podman)
