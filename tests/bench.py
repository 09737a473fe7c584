#!/usr/bin/python3
"""Benchmark macvlan-router against a real Docker engine in the test lab (not a test).

Run as root:  python3 tests/bench.py [--containers 50] [--burst 100] [--churn 1000] [--idle 60]
              python3 tests/bench.py --engine podman|docker --latency-only [--containers 50]

Prints, per figure, what issue 2 asks for:
  connect event -> route present, disconnect event -> route gone (p50, p99, max),
  from the events' own timeNano to the route's netlink event, seen by a monitor in T;
  how long the engine took to deliver those events to a subscriber (a part of the above);
  100 containers started at once: last connect event -> all routes present;
  CPU over an idle minute with containers running; RSS at start and after churn;
  start -> READY=1 with 100 containers present.

With --latency-only, and always with --engine podman (tests/podman_lab.py), only the
first figures, one container at a time. Podman's containers are started with `podman run`
and removed with `podman rm -f`, as a user does; it emits no network connect for
`podman run`, so its container start and died events stand for connect and disconnect
(Docker's network connect comes as the container starts, too).
"""

import argparse
import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab as labmod  # noqa: E402
import podman_lab  # noqa: E402

MONITOR = r"""
import sys, time
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.bind(groups=0x40 | 0x400)
    print("ready", flush=True)
    while True:
        for msg in ipr.get():
            if msg["proto"] != 210:
                continue
            kind = "add" if msg["header"]["type"] == 24 else "del"
            print(time.time_ns(), kind, msg.get_attr("RTA_DST"), flush=True)
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


def sequential(lab, client, network, routes, events, count, starter):
    connect, disconnect = [], []
    for i in range(count):
        cid = starter.run(network, f"seq{i}")
        ip = container_ip(client, cid, network)
        added = routes.wait(("add", ip))
        connect.append((added - events.wait(("connect", cid))) / 1e6)
        starter.remove(cid)
        gone = routes.wait(("del", ip))
        disconnect.append((gone - events.wait(("disconnect", cid))) / 1e6)
    show(f"connect event -> route present ({count} containers, one at a time)", connect)
    show(f"disconnect event -> route gone ({count} containers, one at a time)", disconnect)
    show("  of which the engine's delivery of the event to a subscriber", events.delivery)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("docker", "podman"), default="docker")
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--churn", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=60)
    parser.add_argument("--latency-only", action="store_true",
                        help="stop after the one-at-a-time figures (always so for podman)")
    args = parser.parse_args()
    podman = args.engine == "podman"
    problem = (podman_lab if podman else labmod).prereq_problem()
    if problem:
        sys.exit(f"cannot run the benchmark: {problem}")
    lab = (podman_lab if podman else labmod).make_lab()
    try:
        client = lab.engine.client
        network = lab.engine.network("bench", parent="lan0")
        daemon = lab.daemon(config={})
        pid = daemon.proc.pid
        print(f"{args.engine}: daemon pid {pid}, python {sys.version.split()[0]}, "
              f"RSS at start {rss_kib(pid) / 1024:.1f} MiB", flush=True)
        routes, events = RouteWatch(lab), EventWatch(client, args.engine)
        sequential(lab, client, network, routes, events, args.containers,
                   (PodmanRun if podman else DockerRun)(lab))
        if podman or args.latency_only:
            routes.close()
            events.close()
            return
        created = burst(lab, client, network, routes, events, args.burst)

        running = created[:50]
        for cid in created[50:]:
            client.api.remove_container(cid, force=True)
        time.sleep(2)
        before = cpu_seconds(pid)
        time.sleep(args.idle)
        used = cpu_seconds(pid) - before
        print(f"CPU over {args.idle:.0f} idle seconds with {len(running)} containers: "
              f"{used:.2f} s = {100 * used / args.idle:.3f}% of a core", flush=True)

        rss_before = rss_kib(pid)
        churn(client, network, args.churn)
        time.sleep(2)
        print(f"RSS before churn {rss_before / 1024:.1f} MiB, after {args.churn} containers "
              f"came and went {rss_kib(pid) / 1024:.1f} MiB", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the lab prints the daemon's log
            daemon.stop()

        extra = [run_container(client, network, f"start{i}").id for i in range(50)]
        started = time.monotonic()
        again = lab.daemon(config={})
        print(f"start -> READY=1 (first complete reconcile) with "
              f"{len(running) + len(extra)} containers present: "
              f"{(time.monotonic() - started) * 1000:.0f} ms "
              f"(includes the interpreter's start and imports)", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            again.stop()
        routes.close()
        events.close()
    finally:
        lab.teardown()


if __name__ == "__main__":
    main()
