#!/usr/bin/python3
"""Benchmark macvlan-router against a real Docker engine in the test lab (not a test).

Run as root:  python3 tests/bench.py [--containers 50] [--burst 100] [--churn 1000] [--idle 60]

Prints, per figure, what issue 2 asks for:
  connect event -> route present, disconnect event -> route gone (p50, p99, max),
  from the events' own timeNano to the route's netlink event, seen by a monitor in T;
  100 containers started at once: last connect event -> all routes present;
  CPU over an idle minute with containers running; RSS at start and after churn;
  start -> READY=1 with 100 containers present.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import lab as labmod  # noqa: E402

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
    """Docker's network connect/disconnect events with their timeNano, by container id."""

    def __init__(self, client):
        super().__init__()
        self.stream = client.api.events(decode=True, filters={"type": ["network"]})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for event in self.stream:
                container = event.get("Actor", {}).get("Attributes", {}).get("container")
                self.record((event.get("Action"), container), event["timeNano"])
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


def sequential(lab, client, network, routes, events, count):
    connect, disconnect = [], []
    for i in range(count):
        container = run_container(client, network, f"seq{i}")
        ip = container_ip(client, container.id, network)
        added = routes.wait(("add", ip))
        connect.append((added - events.wait(("connect", container.id))) / 1e6)
        container.remove(force=True)
        gone = routes.wait(("del", ip))
        disconnect.append((gone - events.wait(("disconnect", container.id))) / 1e6)
    show(f"connect event -> route present ({count} containers, one at a time)", connect)
    show(f"disconnect event -> route gone ({count} containers, one at a time)", disconnect)


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
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--churn", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=60)
    args = parser.parse_args()
    problem = labmod.prereq_problem()
    if problem:
        sys.exit(f"cannot run the benchmark: {problem}")
    lab = labmod.make_lab()
    try:
        client = lab.engine.client
        network = lab.engine.network("bench", parent="lan0")
        daemon = lab.daemon(config={})
        pid = daemon.proc.pid
        print(f"daemon pid {pid}, python {sys.version.split()[0]}, "
              f"RSS at start {rss_kib(pid) / 1024:.1f} MiB", flush=True)
        routes, events = RouteWatch(lab), EventWatch(client)
        sequential(lab, client, network, routes, events, args.containers)
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
