#!/usr/bin/python3
"""Benchmark macvlan-router against a real Docker engine in the test lab (not a test).

Run as root:  python3 tests/bench.py [--containers 30] [--burst 100] [--churn 1000] [--idle 60]
              python3 tests/bench.py --engine podman|docker --latency-only [--containers 30]
                [--timeline]
              python3 tests/bench.py --pure ENDPOINTS

Prints, per figure (issues 2 and 9):
  connect event -> route present, disconnect event -> route gone (p50, p99, max), from the
  events' own timeNano to the route's netlink event, seen by a monitor in T, with 0 and 100
  containers already on one network and with 500 spread over 10 networks, each next to
  the floor measured in the same run: connect event -> `inspect_network` answered, through
  the same client the daemon uses (docker-py's APIClient), and how long the engine took to
  deliver those events to a subscriber (a part of the above);
  RSS with 500 containers; start -> READY=1 with 500 containers present;
  with --burst/--idle/--churn above 0: 100 containers started at once, CPU over an idle
  minute, RSS after churn.
The bench networks use 198.18.0.0/15 (the benchmarking range), one veth parent each
(Docker 20.10 allows one macvlan network per parent), inside the lab's namespaces only.

With --latency-only, and always with --engine podman (tests/podman_lab.py), only the
first figures, on one network (parent lan0) with no other containers. Podman's containers
are started with `podman run` and removed with `podman rm -f`, as a user does; it emits no
network connect for `podman run`, so its container start and died events stand for connect
and disconnect (Docker's network connect comes as the container starts, too), and there is
no floor (it is measured on network connect events).
"""

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab as labmod  # noqa: E402
import podman_lab  # noqa: E402

# Stamps each notification as it is received, before decoding it (decoding is the
# bench's cost, not the daemon's): a raw rtnetlink socket, the route groups only.
MONITOR = r"""
import ipaddress, socket, struct, time
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
sock.bind((0, 0x40 | 0x400))  # RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
print("ready", flush=True)
while True:
    data = sock.recv(1 << 16)
    stamp = time.time_ns()
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        body = offset + 16
        if kind in (24, 25) and data[body + 5] == 210:  # RTM_NEWROUTE/DELROUTE, our proto
            at = body + 12  # past struct rtmsg
            while at + 4 <= offset + length:
                size, attr = struct.unpack_from("=HH", data, at)
                if size < 4:
                    break
                if attr == 1:  # RTA_DST
                    dst = ipaddress.ip_address(bytes(data[at + 4:at + size]))
                    print(stamp, "add" if kind == 24 else "del", dst, flush=True)
                at += (size + 3) & ~3
        offset += (length + 3) & ~3
"""


class Stamps:
    """The first time stamp seen per key, filled by a reader thread; wait() takes one out."""

    def __init__(self):
        self.seen = {}
        self.lock = threading.Condition()

    def record(self, key, stamp):
        with self.lock:
            self.seen.setdefault(key, stamp)
            self.lock.notify_all()

    def wait(self, key, timeout=10):
        deadline = time.monotonic() + timeout
        with self.lock:
            while key not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"nothing seen for {key} within {timeout}s")
                self.lock.wait(left)
            return self.seen.pop(key)


class RouteWatch(Stamps):
    """A netlink monitor in T that timestamps our route additions and removals."""

    def __init__(self, lab):
        super().__init__()
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lab.T}", sys.executable, "-c", MONITOR],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            stamp, kind, dst = line.split()
            self.record((kind, dst), int(stamp))

    def close(self):
        self.proc.kill()


class EventWatch(Stamps):
    """Connect and disconnect events with their timeNano, by container id: Docker's network
    connect/disconnect, Podman's container start/died (it emits no connect for podman
    run). Also how long after its timeNano each event reached this subscriber."""

    FILTERS = {"docker": {"type": ["network"]},
               "podman": {"type": ["container"], "event": ["start", "died"]}}
    MEANING = {"connect": "connect", "disconnect": "disconnect",
               "start": "connect", "die": "disconnect"}

    def __init__(self, client, engine):
        super().__init__()
        self.podman = engine == "podman"
        self.delivery = []  # ms
        self.stream = client.api.events(decode=True, filters=self.FILTERS[engine])
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for event in self.stream:
                self.delivery.append((time.time_ns() - event["timeNano"]) / 1e6)
                actor = event.get("Actor", {})
                container = actor.get("ID") if self.podman \
                    else actor.get("Attributes", {}).get("container")
                action = self.MEANING.get(event.get("Action"))
                if action:
                    self.record((action, container), event["timeNano"])
        except Exception:  # noqa: BLE001 - closed at the end
            pass

    def close(self):
        self.stream.close()


class FloorWatch(Stamps):
    """The floor: a network connect event -> `inspect_network` of its network answered,
    through docker-py's APIClient as the daemon uses it, in ms, by container id."""

    def __init__(self, engine):
        super().__init__()
        import docker
        self.events = docker.APIClient(base_url=engine.host, version="auto", timeout=60)
        self.api = docker.APIClient(base_url=engine.host, version="auto", timeout=60)
        self.stream = self.events.events(
            decode=True, filters={"type": ["network"], "event": ["connect"]})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for event in self.stream:
                self.api.inspect_network(event["Actor"]["ID"])
                container = event["Actor"].get("Attributes", {}).get("container")
                self.record(container, (time.time_ns() - event["timeNano"]) / 1e6)
        except Exception:  # noqa: BLE001 - closed at the end
            pass

    def close(self):
        self.stream.close()


def timeline(log_text, samples):
    """Where each connect's and disconnect's latency went, from the daemon's debug log and
    the bench's own stamps (`samples`: (kind, address, event timeNano, route stamp) in
    order): from the event to the daemon's read of Docker (the engine's delivery and the
    wake of the daemon's main loop), the read (the inspect and its translation), the plan,
    and from the start of the apply to the kernel's notification of the route."""
    applies = {"connect": [], "disconnect": []}
    reads, dst = None, None
    for line in log_text.splitlines():
        if " reads took " in line:
            words = line.split(" reads took ")[1].split()
            reads, dst = (float(words[0]), float(words[4].rstrip(")"))), None
        elif " ip route replace " in line or " ip route del " in line:
            words = line.split(" ip route ")[1].split()
            dst = ("connect" if words[0] == "replace" else "disconnect", words[1].split("/")[0])
        elif "reconcile planned in " in line:
            words = line.split("reconcile planned in ")[1].split()
            if dst and reads is not None and words[3] == "1":
                applies[dst[0]].append((dst[1], reads, float(words[0]),
                                        float(words[10].rstrip(")"))))
            reads, dst = None, None
    stages = {"connect": [], "disconnect": []}
    for kind, rows in applies.items():
        ours = [s for s in samples if s[0] == kind]
        for (address, (read_ms, read_at), plan_ms, apply_at), (_, want, event, route) in \
                zip(rows, ours):
            if address == want:
                stages[kind].append((read_at * 1e3 - event / 1e6, read_ms, plan_ms,
                                     route / 1e6 - apply_at * 1e3))
    names = ("event -> the daemon's read begins (delivery, wake)", "the daemon's read",
             "the daemon's plan", "apply begins -> route notified")
    for kind, rows in stages.items():
        if rows:
            for name, values in zip(names, zip(*rows)):
                show(f"[timeline] {kind}: {name}", list(values))


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def show(name, values_ms):
    print(f"{name}: n={len(values_ms)} p50={percentile(values_ms, 0.5):.2f} ms "
          f"p99={percentile(values_ms, 0.99):.2f} ms max={max(values_ms):.2f} ms", flush=True)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def container_ip(client, cid, network):
    info = client.api.inspect_container(cid)
    return info["NetworkSettings"]["Networks"][network]["IPAddress"]


def run_container(client, network, name):
    return client.containers.run(labmod.IMAGE, ["sleep", "3600"], detach=True, name=name,
                                 network=network, labels={labmod.LABEL: "1"})


def bench_networks(lab, count):
    """`count` macvlan networks, each on its own veth parent benchN (T) <-> benchNp (P),
    subnet 198.18.N.0/24 with the host at .2 (the shim reuses it) and containers in the
    upper half."""
    names = []
    for i in range(count):
        parent = f"bench{i}"
        labmod.run(["ip", "-n", lab.T, "link", "add", parent, "type", "veth",
                    "peer", "name", f"{parent}p", "netns", lab.P])
        labmod.run(["ip", "-n", lab.T, "addr", "add", f"198.18.{i}.2/24", "dev", parent])
        labmod.run(["ip", "-n", lab.T, "link", "set", parent, "up"])
        labmod.run(["ip", "-n", lab.P, "link", "set", f"{parent}p", "up"])
        names.append(lab.engine.network(parent, parent=parent, subnet=f"198.18.{i}.0/24",
                                        gateway=f"198.18.{i}.1",
                                        ip_range=f"198.18.{i}.128/25", aux=False))
    return names


def fill(client, routes, networks, count, stem):
    """`count` containers spread over `networks`, each with its route present."""
    def one(i):
        network = networks[i % len(networks)]
        container = run_container(client, network, f"{stem}{i}")
        routes.wait(("add", container_ip(client, container.id, network)), timeout=120)
        return container.id
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(count)))


def latency(client, networks, routes, events, floor, count, label, starter):
    """Containers started and removed one at a time by `starter`, round robin over
    `networks`: event -> route latencies, and the floor for the same connect events
    (`floor` None: none measured)."""
    connect, disconnect, floors, samples = [], [], [], []
    del events.delivery[:]
    for i in range(count):
        network = networks[i % len(networks)]
        cid = starter.run(network, f"lat{label.split()[0]}-{len(networks)}-{i}")
        ip = container_ip(client, cid, network)
        added, event = routes.wait(("add", ip)), events.wait(("connect", cid))
        connect.append((added - event) / 1e6)
        samples.append(("connect", ip, event, added))
        if floor is not None:
            floors.append(floor.wait(cid))
        starter.remove(cid)
        gone, event = routes.wait(("del", ip)), events.wait(("disconnect", cid))
        disconnect.append((gone - event) / 1e6)
        samples.append(("disconnect", ip, event, gone))
    if floors:
        show(f"[{label}] floor: connect event -> inspect_network answered", floors)
    show(f"[{label}] connect event -> route present", connect)
    show(f"[{label}] disconnect event -> route gone", disconnect)
    show(f"[{label}]   of which the engine's delivery of the event to a subscriber",
         events.delivery)
    if floors:
        print(f"[{label}] p50 connect / p50 floor = "
              f"{statistics.median(connect) / statistics.median(floors):.2f}", flush=True)
    return samples


class DockerRun:
    """Containers through docker-py, as the Docker figures have always been taken."""

    def __init__(self, lab):
        self.client = lab.engine.client

    def run(self, network, name):
        return run_container(self.client, network, name).id

    def remove(self, cid):
        self.client.api.remove_container(cid, force=True)


class PodmanRun:
    """Containers through the podman CLI, as a user starts them."""

    def __init__(self, lab):
        self.engine = lab.engine

    def run(self, network, name):
        return self.engine.cli("run", "-d", "--name", name, "--network", network,
                               labmod.IMAGE, *podman_lab.COMMAND).stdout.strip()

    def remove(self, cid):
        self.engine.cli("rm", "-f", "-t", "0", cid)


def burst(lab, client, network, routes, events, count):
    created = [client.api.create_container(labmod.IMAGE, ["sleep", "3600"], name=f"burst{i}",
                                           labels={labmod.LABEL: "1"},
                                           host_config=client.api.create_host_config(
                                               network_mode=network))["Id"]
               for i in range(count)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(client.api.start, created))
    last_connect = max(events.wait(("connect", cid), timeout=60) for cid in created)
    ips = [container_ip(client, cid, network) for cid in created]
    last_route = max(routes.wait(("add", ip), timeout=60) for ip in ips)
    print(f"{count} containers started at once: last connect event -> all {count} routes "
          f"present: {max(0, last_route - last_connect) / 1e6:.1f} ms", flush=True)
    return created


def churn(client, network, count):
    def one(i):
        run_container(client, network, f"churn{i}").remove(force=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(count)))


class PureDocker:
    """Docker's inspect answers as raw records, translated as DockerSource does."""

    network_events = True
    engine = "Docker"

    def __init__(self, records):
        self.records = records
        self.known = {}
        self.answers = {}

    def answer(self, network_id):
        """What the API would return next, decoded from JSON (not part of the timing)."""
        self.answers[network_id] = json.loads(json.dumps(self.records[network_id]))

    def list_networks(self):
        from macvlan_router.docker_source import Listing, to_network
        return Listing(tuple(to_network(dict(raw, Containers={}), {})[0]
                             for raw in self.records.values()))

    def inspect(self, network_id):
        from macvlan_router.docker_source import to_network
        raw = self.answers.pop(network_id, None) or self.records[network_id]
        network, problems = to_network(raw, {}, known=self.known.setdefault(network_id, {}))
        return network, tuple(problems)


class PureKernel:
    """The model kernel (tests/unit/factories.apply_model) while setting up; while
    measuring, apply() costs nothing: the kernel's share is not the daemon's."""

    def __init__(self, host):
        self.host, self.measuring = host, False
        self.own = None

    def read(self):
        return self.host

    def neighbours(self, _links):
        return self.host.neighbours

    def apply(self, actions, _host, _why):
        from tests.unit.factories import apply_model
        if not self.measuring:
            self.host = apply_model(self.host, actions)
        return 0


def pure(endpoints, networks, events):
    """CPU time of one connect (and one disconnect) event's processing without Docker or
    the kernel: translate the inspect answer, refresh the view, compute, plan, apply."""
    from macvlan_router.config import Config
    from macvlan_router.model import Address, Host, Link
    from macvlan_router.reconcile import Reconciler
    import ipaddress
    per = endpoints // networks
    records, links, addresses = {}, [], []
    for n in range(networks):
        subnet = ipaddress.ip_network(f"198.18.{4 * n}.0/22")
        hosts = subnet.hosts()
        gateway, own = next(hosts), next(hosts)
        records[f"{n:064x}"] = {
            "Id": f"{n:064x}", "Name": f"bench{n}", "Driver": "macvlan",
            "Options": {"parent": f"bench{n}"},
            "IPAM": {"Config": [{"Subnet": str(subnet), "Gateway": str(gateway)}]},
            "Containers": {
                f"{n:04x}{i:060x}": {"Name": f"c{n}-{i}", "IPv4Address": f"{next(hosts)}/22",
                                     "IPv6Address": ""}
                for i in range(per)}}
        links.append(Link(index=n + 2, name=f"bench{n}"))
        addresses.append(Address(f"bench{n}", ipaddress.ip_interface(f"{own}/22")))
        if n == 0:
            # What Docker would hand the next container: an address no endpoint holds.
            free = [next(hosts) for _ in range(min(events, 20))]
    kernel = PureKernel(Host(links=tuple(links), addresses=tuple(addresses),
                             machine_id="0123456789abcdef0123456789abcdef"))
    docker = PureDocker(records)
    reconciler = Reconciler(Config(), docker, kernel)

    def event(network_id):
        reconciler.refresh({network_id})
        reconciler.apply(reconciler.assess())

    reconciler.refresh({"all"})
    reconciler.apply(reconciler.assess())
    reconciler.apply(reconciler.assess())
    target = records[f"{0:064x}"]["Containers"]
    # As the daemon does after its first reconcile (daemon._report): what start-up built
    # stays out of the collector's way.
    gc.freeze()
    kernel.measuring = True
    connect, disconnect = [], []
    for i in range(events):
        cid = f"ffff{i:060x}"
        target[cid] = {"Name": f"new{i}", "IPv4Address": f"{free[i % len(free)]}/22",
                       "IPv6Address": ""}
        docker.answer(f"{0:064x}")
        started = time.process_time()
        event(f"{0:064x}")
        connect.append((time.process_time() - started) * 1000)
        del target[cid]
        docker.answer(f"{0:064x}")
        started = time.process_time()
        event(f"{0:064x}")
        disconnect.append((time.process_time() - started) * 1000)
    routes = len(reconciler.assess().desired.routes)
    show(f"pure processing of one connect event, {routes} routes over {networks} networks "
         "(CPU time)", connect)
    show("pure processing of one disconnect event (CPU time)", disconnect)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("docker", "podman"), default="docker")
    parser.add_argument("--containers", type=int, default=30,
                        help="containers started one at a time per size")
    parser.add_argument("--burst", type=int, default=0)
    parser.add_argument("--churn", type=int, default=0)
    parser.add_argument("--idle", type=float, default=0)
    parser.add_argument("--latency-only", action="store_true",
                        help="stop after the one-at-a-time figures on one network (always "
                        "so for podman)")
    parser.add_argument("--timeline", action="store_true",
                        help="with --latency-only: the daemon logs at debug level, and each "
                        "latency is split into stages from that log and the bench's own "
                        "stamps (the logging costs a little)")
    parser.add_argument("--pure", type=int, metavar="ENDPOINTS",
                        help="only the micro-benchmark without Docker, at this many endpoints")
    args = parser.parse_args()
    if args.pure:
        pure(args.pure, 10, 20)
        return
    podman = args.engine == "podman"
    problem = (podman_lab if podman else labmod).prereq_problem()
    if problem:
        sys.exit(f"cannot run the benchmark: {problem}")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    lab = (podman_lab if podman else labmod).make_lab()
    try:
        client = lab.engine.client
        daemon = lab.daemon(config={"LOG_LEVEL": "debug"} if args.timeline else {})
        pid = daemon.proc.pid
        print(f"{args.engine}: daemon pid {pid}, python {sys.version.split()[0]}, "
              f"RSS at start {rss_kib(pid) / 1024:.1f} MiB", flush=True)
        routes, events = RouteWatch(lab), EventWatch(client, args.engine)
        starter = (PodmanRun if podman else DockerRun)(lab)
        if podman or args.latency_only:
            floor = None if podman else FloorWatch(lab.engine)
            samples = latency(client, [lab.engine.network("bench", parent="lan0")], routes,
                              events, floor, args.containers, "0 containers, 1 network",
                              starter)
            if args.timeline:
                timeline(daemon.stderr, samples)
            for watch in (routes, events, floor):
                if watch is not None:
                    watch.close()
            return
        networks = bench_networks(lab, 10)
        floor = FloorWatch(lab.engine)
        latency(client, networks[:1], routes, events, floor, args.containers,
                "0 containers, 1 network", starter)
        hundred = fill(client, routes, networks[:1], 100, "hundred")
        latency(client, networks[:1], routes, events, floor, args.containers,
                "100 containers, 1 network", starter)
        for cid in hundred[50:]:
            client.api.remove_container(cid, force=True)
        fill(client, routes, networks[1:], 450, "spread")
        latency(client, networks, routes, events, floor, args.containers,
                "500 containers, 10 networks", starter)
        print(f"RSS with 500 containers: {rss_kib(pid) / 1024:.1f} MiB", flush=True)

        if args.burst:
            burst(lab, client, networks[0], routes, events, args.burst)
        if args.idle:
            time.sleep(2)
            before = cpu_seconds(pid)
            time.sleep(args.idle)
            used = cpu_seconds(pid) - before
            print(f"CPU over {args.idle:.0f} idle seconds: {used:.2f} s = "
                  f"{100 * used / args.idle:.3f}% of a core", flush=True)
        if args.churn:
            rss_before = rss_kib(pid)
            churn(client, networks[0], args.churn)
            time.sleep(2)
            print(f"RSS before churn {rss_before / 1024:.1f} MiB, after {args.churn} "
                  f"containers came and went {rss_kib(pid) / 1024:.1f} MiB", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the lab prints the daemon's log
            daemon.stop()

        present = len(client.api.containers(filters={"label": labmod.LABEL}))
        started = time.monotonic()
        again = lab.daemon(config={})
        print(f"start -> READY=1 (first complete reconcile) with {present} containers "
              f"present: {(time.monotonic() - started) * 1000:.0f} ms "
              f"(includes the interpreter's start and imports)", flush=True)
        print(f"RSS after that start: {rss_kib(again.proc.pid) / 1024:.1f} MiB", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            again.stop()
        for watch in (routes, events, floor):
            watch.close()
        print(f"load average at the end: {os.getloadavg()}", flush=True)
    finally:
        lab.teardown()


if __name__ == "__main__":
    main()
