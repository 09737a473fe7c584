#!/usr/bin/python3
"""Churn soak of macvlan-router against a real Docker engine in the test lab (not a test).

Run as root, with Debian's python3, after `tests/run-all` has installed the packages:

    /usr/bin/python3 tests/soak.py --minutes 10 [--grace-ms 250] [--burst 8]
                                   [--min-alive 20] [--max-alive 40] [--seed 1]

It builds the namespace lab of the integration tests (tests/lab.py: a dockerd in namespace
T, parents lan0 and lan1), makes one dual-stack macvlan network on each parent, starts the
daemon with an empty configuration (it serves every macvlan network), and for the given
time keeps 20-40 containers alive while it replaces, restarts and reconnects them, one at a
time and in bursts of concurrent threads: on one network or on both, with addresses
from Docker's IPAM or chosen (and re-used at once after their holder is gone).

It judges the daemon from two streams that do not involve it, stamped with the same
(wall) clock: Docker's own events and a netlink monitor in T (routes with protocol 210
appearing and going). An address is *held* from its network's `connect` event to its
`disconnect` event (the address itself is read by inspecting the container right after the
call that connected it), and *in use* until it is released: its container's `die` event,
the soak's own request to disconnect it, or the `disconnect` event, whichever comes first.
It prints a Markdown table ready for README.md: containers cycled; connect / disconnect
event -> route latencies; the gaps where an address was in use without a route and where a
route lived while nobody held its address, longer than the grace; routes deleted while
their address was in use (must be 0); the daemon's memory (VmRSS at start, half-time and
end, and VmHWM) and CPU time; whether it ended alive, with exit 0 on SIGTERM and no
traceback in its log. The exit status is 1 when a route was deleted in use, the final
routes differ from the held addresses, the monitor overflowed or the daemon was unhealthy.

The grace exists because Docker's view and Docker's events disagree by tens of
milliseconds (DESIGN.md section 6), and the daemon follows the view (`network inspect`): a
new container enters it before its `connect` event, and a leaving one leaves it before its
`disconnect` event (a dying one only after its `die` event, which is why `die` ends the
use). Under this churn on a shared 2-core machine the disconnect event trailed `die` by up
to 700 ms and the route's removal by up to 400 ms. Gaps up to the grace (default 250 ms)
are not counted; a deletion within the grace before a disconnect event, or of the previous
holder's route within the grace after a connect (a restart), is not one "in use"; the
longest gap of any length is printed too, so nothing hides behind the grace.

Every loop is bounded in count and time; the lab is torn down on errors and on Ctrl-C
(the first Ctrl-C ends the churn early and still judges what was recorded).
"""

import argparse
import bisect
import collections
import contextlib
import io
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import lab as labmod  # noqa: E402
from tests.bench import cpu_seconds, percentile  # noqa: E402

# One dual-stack network per parent (Docker 20.10 allows one macvlan network per parent).
NETWORKS = {"soak0": labmod.LAN0, "soak1": labmod.LAN1}
SHIMS = (labmod.SHIM0, labmod.SHIM1)
# Chosen addresses lie outside the networks' IPAM ranges, so Docker never hands them out.
CHOSEN = {"soak0": ([f"198.51.100.{i}" for i in range(64, 96)],
                    [f"2001:db8:1::2:{i:x}" for i in range(64, 96)]),
          "soak1": ([f"203.0.113.{i}" for i in range(64, 96)],
                    [f"2001:db8:2::2:{i:x}" for i in range(64, 96)])}
COMMAND = ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]  # stops at once on SIGTERM
OP_TIMEOUT = 120        # seconds one container operation may take (each API call: 60 s)
SETTLE = 3.0            # seconds after the churn before the final picture
NS = 1_000_000_000
MS = 1_000_000

# A netlink monitor in T: our routes appearing and going, shims deleted, overflows.
MONITOR = r"""
import errno, socket, sys, time
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
RTM_DELLINK, RTM_NEWROUTE, RTM_DELROUTE = 17, 24, 25
SO_RCVBUFFORCE = 33
with IPRoute() as ipr:
    ipr.bind(groups=0x1 | 0x40 | 0x400)
    ipr.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 24)
    print("ready", flush=True)
    while True:
        try:
            messages = ipr.get()
        except (OSError, NetlinkError) as e:
            if errno.ENOBUFS in (getattr(e, "errno", None), getattr(e, "code", None)):
                print(time.time_ns(), "overflow", flush=True)
                continue
            raise
        now = time.time_ns()
        for m in messages:
            kind = m["header"]["type"]
            if kind in (RTM_NEWROUTE, RTM_DELROUTE) and m["proto"] == 210:
                print(now, "add" if kind == RTM_NEWROUTE else "del", m.get_attr("RTA_DST"),
                      m["dst_len"], m.get_attr("RTA_OIF"), m.get_attr("RTA_TABLE") or m["table"],
                      flush=True)
            elif kind == RTM_DELLINK and str(m.get_attr("IFLA_IFNAME")).startswith("mvr-"):
                print(now, "linkdel", m.get_attr("IFLA_IFNAME"), flush=True)
"""


def norm(addr):
    return str(ipaddress.ip_address(addr))


def status_kib(pid, key):
    """A figure of /proc/PID/status in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- recording

class RouteMonitor:
    """Records (time_ns, "add"|"del", address, (oif, table)) of our host routes in T."""

    def __init__(self, lab):
        self.routes = []
        self.overflows = 0
        self.shims_deleted = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lab.T}", "--", sys.executable, "-c", MONITOR],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            raise labmod.LabError(f"the netlink monitor did not start: {first!r} "
                                  f"{self.proc.stderr.read()[-2000:]}")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            stamp, kind, *rest = line.split()
            with self.lock:
                if kind == "overflow":
                    self.overflows += 1
                elif kind == "linkdel":
                    self.shims_deleted.append((int(stamp), rest[0]))
                elif rest[1] in ("32", "128"):
                    self.routes.append((int(stamp), kind, norm(rest[0]), (rest[2], rest[3])))

    def snapshot(self):
        with self.lock:
            return list(self.routes)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=5)


class EventLog:
    """Docker's container and network events: (timeNano, type, action, container, network)."""

    def __init__(self, client):
        self.events = []
        self.lock = threading.Lock()
        self.stream = client.api.events(decode=True, filters={"type": ["container", "network"]})
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with contextlib.suppress(Exception):  # the stream ends when closed or dockerd stops
            for event in self.stream:
                attrs = event.get("Actor", {}).get("Attributes", {})
                if event.get("Type") == "network":
                    item = (event["timeNano"], "network", event.get("Action"),
                            attrs.get("container"), attrs.get("name"))
                else:
                    item = (event["timeNano"], "container", event.get("Action"),
                            event.get("Actor", {}).get("ID"), None)
                with self.lock:
                    self.events.append(item)

    def snapshot(self):
        with self.lock:
            return sorted(self.events)

    def close(self):
        with contextlib.suppress(Exception):
            self.stream.close()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- the churn

class Churn:
    """Containers on the soak networks, and the operations that replace them.

    Operations take their containers out of `idle` while they work on them, so no two
    threads touch one container. After every call that connects a container, its
    addresses are inspected and recorded per (container, network) with the time."""

    def __init__(self, client, rng, stop):
        self.api = client.api
        self.rng = rng
        self.stop = stop
        self.lock = threading.Lock()
        self.idle = {}          # container id -> {network: (chosen v4, chosen v6) or None}
        self.busy = 0
        self.free = {net: (collections.deque(v4), collections.deque(v6))
                     for net, (v4, v6) in CHOSEN.items()}
        self.records = collections.defaultdict(list)  # (cid, net) -> [(time_ns, addrs)]
        self.leaving = collections.defaultdict(list)  # (cid, net) -> [time_ns of a request]
        self.counts = collections.Counter()
        self.errors = collections.Counter()
        self.serial = 0

    # bookkeeping ----------------------------------------------------------------
    def alive(self):
        with self.lock:
            return len(self.idle) + self.busy

    def take(self, n, two_networks=False):
        """Up to n idle containers, now busy."""
        with self.lock:
            pool = [c for c, nets in self.idle.items() if not two_networks or len(nets) == 2]
            chosen = self.rng.sample(pool, min(n, len(pool)))
            self.busy += len(chosen)
            return [(cid, self.idle.pop(cid)) for cid in chosen]

    def give_back(self, cid, nets):
        with self.lock:
            self.busy -= 1
            if cid is not None:
                self.idle[cid] = nets

    def _choose(self, net):
        """A chosen address pair for net, or None (Docker's IPAM picks)."""
        with self.lock:
            v4, v6 = self.free[net]
            if self.rng.random() < 0.5 or not v4 or not v6:
                return None
            return v4.popleft(), v6.popleft()

    def _release(self, nets):
        """Return chosen addresses; half go to the front, to be re-used at once."""
        with self.lock:
            for net, pair in nets.items():
                if pair is None:
                    continue
                for queue, addr in zip(self.free[net], pair):
                    (queue.appendleft if self.rng.random() < 0.5 else queue.append)(addr)

    def _record(self, cid, nets):
        info = self.api.inspect_container(cid)["NetworkSettings"]["Networks"] or {}
        now = time.time_ns()
        for net in nets:
            entry = info.get(net) or {}
            addrs = [norm(a) for a in (entry.get("IPAddress"), entry.get("GlobalIPv6Address"))
                     if a]
            self.records[(cid, net)].append((now, addrs))

    # operations (each runs in one thread) ------------------------------------------------
    def start_new(self, how):
        """Create and start a container on one network or both."""
        pick = self.rng.random()
        names = ["soak0"] if pick < 0.4 else ["soak1"] if pick < 0.7 else ["soak0", "soak1"]
        nets = {net: self._choose(net) for net in names}
        with self.lock:
            self.serial += 1
            name = f"soak{self.serial}"
            self.busy += 1
        cid = None
        try:
            first = names[0]
            endpoint = self.api.create_endpoint_config(**self._addresses(nets[first]))
            cid = self.api.create_container(
                labmod.IMAGE, COMMAND, name=name, labels={labmod.LABEL: "1"},
                host_config=self.api.create_host_config(network_mode=first),
                networking_config=self.api.create_networking_config({first: endpoint}))["Id"]
            for net in names[1:]:
                self.api.connect_container_to_network(cid, net, **self._addresses(nets[net]))
            self.api.start(cid)
            self._record(cid, nets)
            self.note(f"started {how}")
        except Exception as e:  # noqa: BLE001 - counted, and the container removed
            self.failed("start", e)
            if cid is not None:
                with contextlib.suppress(Exception):
                    self.api.remove_container(cid, force=True)
            self._release(nets)
            cid = None
        self.give_back(cid, nets)

    def _addresses(self, pair):
        return {} if pair is None else {"ipv4_address": pair[0], "ipv6_address": pair[1]}

    def remove(self, cid, nets, how):
        way = self.rng.choice(("rm -f", "stop, rm", "kill, rm"))
        try:
            if way == "stop, rm":
                self.api.stop(cid, timeout=5)
            elif way == "kill, rm":
                self.api.kill(cid)
            self.api.remove_container(cid, force=True)
            self.note(f"removed {how}")
        except Exception as e:  # noqa: BLE001 - counted; try once more to remove it
            self.failed(f"remove ({way})", e)
            with contextlib.suppress(Exception):
                self.api.remove_container(cid, force=True)
        self._release(nets)
        self.give_back(None, nets)

    def restart(self, cid, nets, how):
        try:
            self.api.restart(cid, timeout=5)
            self._record(cid, nets)
            self.note(f"restarted {how}")
        except Exception as e:  # noqa: BLE001
            self.failed("restart", e)
        self.give_back(cid, nets)

    def reconnect(self, cid, nets, how):
        """Disconnect a running container from one of its two networks and connect it again
        (with the same chosen addresses, if it had them)."""
        net = self.rng.choice(sorted(nets))
        try:
            self.leaving[(cid, net)].append(time.time_ns())
            self.api.disconnect_container_from_network(cid, net)
            self.stop.wait(self.rng.uniform(0, 0.2))
            self.api.connect_container_to_network(cid, net, **self._addresses(nets[net]))
            self._record(cid, [net])
            self.note(f"reconnected {how}")
        except Exception as e:  # noqa: BLE001
            self.failed("reconnect", e)
        self.give_back(cid, nets)

    def replace(self, cid, nets, how):
        self.remove(cid, nets, how)
        self.start_new(how)

    def note(self, what):
        with self.lock:
            self.counts[what] += 1

    def failed(self, what, error):
        with self.lock:
            self.errors[f"{what}: {str(error).splitlines()[0][:160]}"] += 1


def churn(ch, args, rng, stop, pool, daemon_pid, marks):
    """Replace containers singly and in bursts until the time is up (or Ctrl-C)."""
    started = time.monotonic()
    deadline = started + args.minutes * 60
    middle = started + args.minutes * 30
    max_ops = int(args.minutes * 60 * 50) + 10
    for _ in range(max_ops):
        now = time.monotonic()
        if now >= deadline or stop.is_set():
            break
        if "middle" not in marks and now >= middle:
            marks["middle"] = status_kib(daemon_pid, "VmRSS")
        if rng.random() < args.burst_share:
            burst(ch, args, rng, pool)
        else:
            single(ch, rng, pool)
        stop.wait(rng.uniform(0, args.pause_ms / 1000))


def one_op(ch, rng, how):
    """Replace, restart or reconnect one container."""
    pick = rng.random()
    if pick < 0.2:
        victims = ch.take(1, two_networks=True)
        if victims:
            ch.reconnect(*victims[0], how)
            return
    victims = ch.take(1)
    if not victims:
        ch.start_new(how)
    elif pick < 0.4:
        ch.restart(*victims[0], how)
    else:
        ch.replace(*victims[0], how)


def single(ch, rng, pool):
    # in the pool, like everything that changes containers: a Ctrl-C in the main thread
    # must not cut an operation short, or its container would escape the books
    run_together(pool, [lambda: one_op(ch, rng, "singly")], ch, "single step")
    ch.note("single operations")


def burst(ch, args, rng, pool):
    """K operations at once: K new containers, K removed, K replaced, or K mixed."""
    k = args.burst
    alive = ch.alive()
    kinds = ["replace", "mixed"]
    if alive + k <= args.max_alive:
        kinds.append("grow")
    if alive - k >= args.min_alive:
        kinds.append("shrink")
    kind = rng.choice(kinds)
    if kind == "grow":
        jobs = [lambda: ch.start_new("in bursts")] * k
    elif kind == "mixed":
        jobs = [lambda: one_op(ch, rng, "in bursts")] * k
    else:
        fn = ch.remove if kind == "shrink" else ch.replace
        jobs = [lambda v=v: fn(*v, "in bursts") for v in ch.take(k)]
    run_together(pool, jobs, ch, f"burst ({kind})")
    ch.note(f"bursts ({kind})")


def run_together(pool, jobs, ch, what):
    done, pending = wait([pool.submit(job) for job in jobs], timeout=OP_TIMEOUT * 2)
    for future in done:
        if future.exception():
            ch.failed(what, future.exception())
    if pending:
        raise RuntimeError(f"{len(pending)} container operations of a {what} did not end in "
                           f"{OP_TIMEOUT * 2} s; is dockerd hung? (see its log)")


# --------------------------------------------------------------------------- judging

def merge(intervals):
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(i) for i in out]


def subtract(a, b):
    """The maximal pieces of merged intervals a not covered by merged intervals b."""
    out = []
    for start, end in a:
        cursor = start
        for bs, be in b:
            if be <= cursor or bs >= end:
                continue
            if bs > cursor:
                out.append((cursor, bs))
            cursor = max(cursor, be)
        if cursor < end:
            out.append((cursor, end))
    return out


def covering(intervals, t):
    """The merged interval containing t, or the first one after it, or None."""
    i = bisect.bisect_right(intervals, (t, float("inf")))
    if i and intervals[i - 1][1] > t:
        return intervals[i - 1]
    return intervals[i] if i < len(intervals) else None


Hold = collections.namedtuple("Hold", "addr cid net connect released disconnect")


def holds_from(events, records, leaving, t0, t1):
    """[Hold] from Docker's events: an address is held from its network's `connect` event
    to its `disconnect` event (None: still held at t1), and in use until it is released:
    its container's `die` event, the soak's request to disconnect it, or the disconnect
    event, whichever comes first. The address is the one recorded after the call that
    connected it. Also returns the count of connects with no record."""
    open_, spans, unknown = {}, [], 0
    connects, deaths = collections.defaultdict(list), collections.defaultdict(list)
    for t, kind, action, cid, net in events:
        if kind == "network" and action == "connect" and net in NETWORKS:
            connects[(cid, net)].append(t)
        elif kind == "container" and action == "die":
            deaths[cid].append(t)
    for t, kind, action, cid, net in events:
        if kind != "network" or net not in NETWORKS or not t0 <= t <= t1:
            continue
        key = (cid, net)
        if action == "connect" and key not in open_:
            open_[key] = t
        elif action == "disconnect" and key in open_:   # Docker may repeat a disconnect
            spans.append((key, open_.pop(key), t))
    spans += [(key, t, None) for key, t in open_.items()]
    holds = []
    for (cid, net), connect, disconnect in spans:
        end = disconnect or t1
        limit = min((c for c in connects[(cid, net)] if c > connect), default=float("inf"))
        addrs = next((a for r, a in records.get((cid, net), []) if connect <= r < limit), None)
        if addrs is None:
            unknown += 1
            continue
        released = min((t for t in deaths[cid] + leaving.get((cid, net), [])
                        if connect < t <= end), default=disconnect)
        holds += [Hold(addr, cid, net, connect, released, disconnect) for addr in addrs]
    return holds, unknown


def route_intervals(routes, t1):
    """{address: merged [(appeared, gone)]} from the monitor (a route counts while any
    (oif, table) of ours exists for the address), and deletions: [(time, address, since)]
    with the time the deleted route had appeared."""
    present = collections.defaultdict(dict)   # address -> {(oif, table): since}
    spans = collections.defaultdict(list)
    deletions = []
    for t, kind, addr, key in routes:
        keys = present[addr]
        if kind == "add":
            keys.setdefault(key, t)
        elif key in keys:
            since = keys.pop(key)
            deletions.append((t, addr, since))
            spans[addr].append((since, t))
    for addr, keys in present.items():
        spans[addr] += [(since, t1) for since in keys.values()]
    return {a: merge(s) for a, s in spans.items()}, deletions


def per_address(holds, end):
    """{address: merged intervals} of holds, each running from its connect to end(hold)."""
    found = collections.defaultdict(list)
    for h in holds:
        found[h.addr].append((h.connect, end(h)))
    return {a: merge(s) for a, s in found.items()}


def judge(events, routes, records, leaving, t0, t1, grace_ns):
    """Compare the holds with the routes: gaps (address, start, end) where an address was
    in use without a route or a route lived while nobody held its address, deletions
    while in use, and the latencies from connect/disconnect events to the route."""
    holds, unknown = holds_from(events, records, leaving, t0, t1)
    spans, deletions = route_intervals([r for r in routes if r[0] <= t1], t1)
    held = per_address(holds, lambda h: h.disconnect or t1)
    in_use = per_address(holds, lambda h: h.released or t1)
    by_address = collections.defaultdict(list)
    for h in holds:
        by_address[h.addr].append(h)

    def deleted_in_use(t, addr, since):
        # Not within the grace before a disconnect event the soak did not ask for: the
        # daemon follows `network inspect`, which drops an endpoint before that event.
        # Nor a route of the address's previous holder deleted within the grace after the
        # new connect (a restart): the daemon acted on a view read just before it.
        return any(h.connect < t < min(h.released or t1,
                                       (h.disconnect or t1 + grace_ns) - grace_ns)
                   and (since >= h.connect or t >= h.connect + grace_ns)
                   for h in by_address[addr])
    while_used = [(t, a) for t, a, since in deletions if deleted_in_use(t, a, since)]
    no_route, no_holder = [], []
    for addr in set(held) | set(spans):
        route = spans.get(addr, [])
        no_route += [(addr, s, e) for s, e in subtract(in_use.get(addr, []), route)]
        no_holder += [(addr, s, e) for s, e in subtract(route, held.get(addr, []))]
    to_route, to_gone = [], []
    for h in holds:
        span = covering(spans.get(h.addr, []), h.connect)
        if span and span[0] < (h.disconnect or t1):
            to_route.append(max(0, span[0] - h.connect))
        if h.disconnect is None:
            continue
        span = covering(spans.get(h.addr, []), h.disconnect)
        following = covering(held[h.addr], h.disconnect + 1)
        if span is None or span[0] > h.disconnect:
            to_gone.append(0)    # gone before the event (the daemon follows the view)
        elif not following or span[1] < following[0]:
            to_gone.append(span[1] - h.disconnect)
        # else the route lived on into the address's next holder: nothing to time
    return dict(holds=holds, unknown=unknown, addresses=len(held), spans=spans,
                no_route=no_route, no_holder=no_holder, while_used=while_used,
                to_route=to_route, to_gone=to_gone,
                route_count=sum(1 for _t, kind, *_ in routes if kind == "add"))


# --------------------------------------------------------------------------- printing

def ms(ns):
    return f"{ns / MS:.1f} ms"


def latency(values):
    if not values:
        return "none"
    return (f"p50 {ms(percentile(values, 0.5))}, p99 {ms(percentile(values, 0.99))}, "
            f"max {ms(max(values))} (n={len(values)})")


def gaps(found, grace_ns):
    beyond = [e - s for _a, s, e in found if e - s > grace_ns]
    longest = max((e - s for _a, s, e in found), default=0)
    if not beyond:
        return f"none (longest gap of any length: {ms(longest)})"
    return (f"{len(beyond)} gaps, {sum(beyond) / NS:.3f} s in all, max {ms(max(beyond))}")


def report(args, ch, verdict, events, facts):
    grace_ns = args.grace_ms * MS
    c = ch.counts

    def total(prefix):
        return sum(n for key, n in c.items() if key.startswith(prefix))
    v6 = sum(1 for h in verdict["holds"] if ":" in h.addr)
    starts = sum(1 for e in events if e[1] == "container" and e[2] == "start")
    rows = [
        ("run", f"{facts['minutes']:.1f} min, grace {args.grace_ms} ms, {args.min_alive}-"
                f"{args.max_alive} containers alive, bursts of {args.burst}, seed {args.seed}; "
                f"load average {facts['load'][0]:.1f} before, {facts['load'][1]:.1f} after "
                f"on {os.cpu_count()} CPUs"),
        ("containers cycled", f"{total('started')} started ({c['started singly']} singly, "
                              f"{c['started in bursts']} in bursts), {total('removed')} "
                              f"removed, {total('restarted')} restarted, "
                              f"{total('reconnected')} reconnected to a network, in "
                              f"{c['single operations']} single steps and {total('bursts')} "
                              f"bursts; Docker saw {starts} container starts"),
        ("addresses held (connect .. disconnect)",
         f"{len(verdict['holds'])} holds of {verdict['addresses']} addresses "
         f"({len(verdict['holds']) - v6} IPv4, {v6} IPv6); {verdict['route_count']} route "
         f"additions seen"),
        ("connect event -> route present", latency(verdict["to_route"])),
        ("disconnect event -> route gone", latency(verdict["to_gone"])),
        (f"address in use without a route, gaps > {args.grace_ms} ms",
         gaps(verdict["no_route"], grace_ns)),
        (f"route without a holder, gaps > {args.grace_ms} ms",
         gaps(verdict["no_holder"], grace_ns)),
        ("routes deleted while their address was in use",
         f"{len(verdict['while_used'])} (must be 0)"),
        ("at the end: routes = addresses held", facts["final"]),
        ("daemon RSS at start / half-time / end (peak)",
         f"{facts['rss'][0] / 1024:.1f} / {facts['rss'][1] / 1024:.1f} / "
         f"{facts['rss'][2] / 1024:.1f} MiB ({facts['hwm'] / 1024:.1f} MiB)"),
        ("daemon CPU time during the churn",
         f"{facts['cpu']:.1f} s ({100 * facts['cpu'] / (facts['minutes'] * 60):.1f} % of a "
         f"core)"),
        ("daemon at the end", facts["state"]),
    ]
    print("\n| Figure | Measured |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print()
    for label, found in (("in use without a route", verdict["no_route"]),
                         ("route without a holder", verdict["no_holder"])):
        for addr, start, end in sorted(found, key=lambda g: g[1] - g[2])[:5]:
            if end - start > grace_ns:
                print(f"longest gaps, {label}: {addr} at +{(start - facts['t0']) / NS:.3f} s "
                      f"for {ms(end - start)}")
    for error, n in ch.errors.most_common(10):
        print(f"Docker refused {n}x: {error}")
    problems = []
    if verdict["while_used"]:
        problems.append(f"{len(verdict['while_used'])} ROUTES WERE DELETED WHILE THEIR "
                        f"ADDRESS WAS IN USE: "
                        + ", ".join(f"{a} at +{(t - facts['t0']) / NS:.3f} s"
                                    for t, a in verdict["while_used"][:10]))
    if facts["overflows"]:
        problems.append(f"the netlink monitor overflowed {facts['overflows']} times: the "
                        f"route figures are incomplete")
    if facts["shims_deleted"]:
        problems.append(f"shims deleted during the soak: {facts['shims_deleted']}")
    if verdict["unknown"]:
        problems.append(f"{verdict['unknown']} connect events had no recorded addresses, "
                        f"so their holds were not judged")
    if not facts["final_ok"]:
        problems.append("the routes at the end are not the addresses held (see the table)")
    if not facts["healthy"]:
        problems.append("the daemon was not healthy at the end (see the table)")
    for line in problems:
        print(f"!! {line}")
    return not problems


# --------------------------------------------------------------------------- main

def final_picture(lab, t1, verdict):
    """The kernel's routes vs. the monitor's vs. the addresses Docker says are held."""
    kernel = {norm(labmod.norm_dst(r["dst"]).split("/")[0]) for r in lab.owned_routes()
              if r.get("dst") and labmod.norm_dst(r["dst"]).split("/")[1] in ("32", "128")}
    seen = {a for a, spans in verdict["spans"].items() if spans and spans[-1][1] == t1}
    held = {h.addr for h in verdict["holds"] if h.disconnect is None}
    same = kernel == held
    agree = "the monitor agrees" if seen == kernel else \
        f"THE MONITOR DISAGREES ({len(seen ^ kernel)} addresses differ)"
    text = f"{len(kernel)} routes, {len(held)} addresses held: " + \
        ("the same" if same else f"DIFFERENT (missing {sorted(held - kernel)[:5]}, "
                                 f"extra {sorted(kernel - held)[:5]})") + f"; {agree}"
    return text, same and seen == kernel


def daemon_state(daemon):
    """Alive?, then SIGTERM: exit status, tracebacks, warnings and errors in its log."""
    alive = daemon.alive()
    with contextlib.redirect_stdout(io.StringIO()):   # the lab prints the daemon's log
        rc = daemon.stop()
    log = daemon.stderr
    traceback = "Traceback (most recent call last)" in log
    warnings = sum(1 for line in log.splitlines() if " WARNING " in line)
    errors = sum(1 for line in log.splitlines() if " ERROR " in line)
    text = (f"{'alive' if alive else 'DEAD'} after the churn, exit {rc} on SIGTERM, "
            f"{'A TRACEBACK' if traceback else 'no traceback'}, {warnings} warnings, "
            f"{errors} errors in its log")
    return text, alive and rc == 0 and not traceback


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long to churn")
    parser.add_argument("--grace-ms", type=int, default=250,
                        help="gaps up to this long are not counted (Docker's view leads its "
                             "events by up to ~200 ms; default 250)")
    parser.add_argument("--burst", type=int, default=8, help="operations per burst")
    parser.add_argument("--burst-share", type=float, default=0.3,
                        help="share of steps that are bursts (default 0.3)")
    parser.add_argument("--min-alive", type=int, default=20)
    parser.add_argument("--max-alive", type=int, default=40)
    parser.add_argument("--pause-ms", type=int, default=300,
                        help="longest random pause between steps (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", type=Path, help="copy the daemon's log here")
    parser.add_argument("--save", type=Path,
                        help="write what was recorded (events, routes, addresses) here as JSON")
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be above 0 and at most a day")
    if not 1 <= args.burst <= args.max_alive - args.min_alive:
        parser.error("--burst must be at least 1 and at most --max-alive minus --min-alive")
    if not 1 <= args.min_alive <= args.max_alive <= 60:
        parser.error("need 1 <= --min-alive <= --max-alive <= 60 (32 chosen addresses "
                     "and 128 IPAM addresses per network)")
    return args


def main():
    args = parse_args()
    problem = labmod.prereq_problem()
    if problem:
        sys.exit(f"cannot run the soak: {problem}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rng = random.Random(args.seed)
    stop = threading.Event()
    load_before = os.getloadavg()[0]
    lab = labmod.make_lab()
    monitor = events = daemon = pool = None
    try:
        client = lab.engine.client
        for net, lan in NETWORKS.items():
            lab.engine.network(net, parent=lan["parent"], v6=True)
        monitor = RouteMonitor(lab)
        events = EventLog(client)
        t0 = time.time_ns()
        daemon = lab.daemon(config={})
        pid = daemon.proc.pid
        for shim in SHIMS:   # IPv6 routes wait for the shim's address to pass DAD
            labmod.shim_addr(lab, shim, 6)
        rss_start = status_kib(pid, "VmRSS")
        ch = Churn(client, rng, stop)
        pool = ThreadPoolExecutor(max_workers=args.burst)
        run_together(pool, [lambda: ch.start_new("to begin")] * args.min_alive, ch,
                     "first population")
        print(f"daemon pid {pid}; {ch.alive()} containers up; churning for "
              f"{args.minutes:g} min (Ctrl-C ends early)", flush=True)
        cpu_start, began = cpu_seconds(pid), time.monotonic()
        marks = {}
        try:
            churn(ch, args, rng, stop, pool, pid, marks)
        except KeyboardInterrupt:
            print("interrupted: judging what was recorded", flush=True)
        stop.set()
        pool.shutdown(wait=True)
        marks.setdefault("middle", status_kib(pid, "VmRSS"))   # ended before half-time
        minutes = (time.monotonic() - began) / 60
        time.sleep(SETTLE)
        t1 = time.time_ns()
        cpu = cpu_seconds(pid) - cpu_start
        load = (load_before, os.getloadavg()[0])
        rss_end, hwm = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
        if args.save:
            args.save.write_text(json.dumps(dict(
                t0=t0, t1=t1, events=events.snapshot(), routes=monitor.snapshot(),
                records=[[cid, net, stamp, addrs] for (cid, net), found in ch.records.items()
                         for stamp, addrs in found],
                leaving=[[cid, net, stamp] for (cid, net), found in ch.leaving.items()
                         for stamp in found])))
        verdict = judge(events.snapshot(), monitor.snapshot(), ch.records, ch.leaving, t0, t1,
                        args.grace_ms * MS)
        final, final_ok = final_picture(lab, t1, verdict)
        state, healthy = daemon_state(daemon)
        facts = dict(t0=t0, minutes=minutes, rss=(rss_start, marks["middle"], rss_end),
                     hwm=hwm, cpu=cpu, final=final, final_ok=final_ok, state=state,
                     healthy=healthy, overflows=monitor.overflows, load=load,
                     shims_deleted=[n for t, n in monitor.shims_deleted if t <= t1])
        ok = report(args, ch, verdict, events.snapshot(), facts)
        print("RESULT: " + ("ok" if ok else "PROBLEMS (see above)"))
        return 0 if ok else 1
    finally:
        stop.set()
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
        for part in (events, monitor):
            if part:
                part.close()
        if daemon and args.log:
            shutil.copy(daemon.stderr_path, args.log)
        with contextlib.redirect_stdout(io.StringIO()):   # the lab prints the daemon's log
            lab.teardown()


if __name__ == "__main__":
    sys.exit(main())
