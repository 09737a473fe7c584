"""Faults between the daemon and the real engine, and on the host's netlink.

The daemon talks to the lab's dockerd through tests/faultproxy.py, which delays, fails,
resets, truncates or rewrites chosen calls; a RouteWatcher (ip monitor in namespace T)
records every deletion of one of our routes and every shim that went down or away, so
"no route that should stay was lost" holds even for a moment. Each test prints the
recovery time it measured.
"""

import contextlib
import json
import re
import signal
import threading
import time

import pytest

from faultproxy import FaultProxy
from lab import (SHIM0, SHIM1, RouteWatcher, assert_no_traceback, host_prefix,
                 netlink_sockets, norm_dst, wait_until)

pytestmark = pytest.mark.integration

A1, A2, A3 = "198.51.100.130", "198.51.100.131", "198.51.100.132"
B1 = "203.0.113.130"
INSPECT = r"/networks/[^/]+"     # GET /networks/<id>: one network with its endpoints
API_TIMEOUT = 10                 # what the daemon allows a Docker call (docker_source.py)
EMPTY_STATUS = re.compile(r"^0 networks?, 0 routes?")


@pytest.fixture
def proxy(lab):
    p = FaultProxy(lab.engine.sock, lab.path(lab.unique("docker-proxy-") + ".sock")).start()
    try:
        yield p
    finally:
        print(f"----- proxy: requests {dict(p.counts)}; last ones:\n{p.history()}")
        p.close()


@pytest.fixture
def watcher(lab):
    w = RouteWatcher(lab).start()
    try:
        yield w
    finally:
        w.stop()


def routed(lab, *addrs):
    """Every address has our route, through the shim of its LAN."""
    return all(lab.route_via(a, SHIM0 if a.startswith("198.51.100.") else SHIM1)
               for a in addrs)


def wait_routed(lab, *addrs, timeout=20, desc=None):
    return wait_until(lambda: routed(lab, *addrs), timeout=timeout,
                      desc=desc or f"routes for {', '.join(addrs)}")


def settled(lab, shim):
    """Wait until the new shim's IPv6 link-local address has passed duplicate address
    detection: its arrival (about 1.5 s after the shim) is a netlink change that would
    make the daemon reconcile, and hide whether it retries on its own."""
    def done():
        return [a for a in lab.addrs(shim, 6) if str(a.get("scope")) in ("link", "253")
                and "tentative" not in a["flags"]]
    wait_until(done, timeout=10, desc=f"{shim}'s link-local address")
    time.sleep(0.2)


def timed_wait(cond, timeout, desc):
    """Seconds until cond() holds (raises after timeout)."""
    start = time.monotonic()
    wait_until(cond, timeout=timeout, desc=desc)
    return time.monotonic() - start


def assert_nothing_lost(watcher, dsts, links):
    assert not watcher.blind, "the route watcher itself overflowed: it may have missed a loss"
    lost = watcher.lost(dsts=dsts, links=links)
    assert not lost, "routes or shims that should have stayed were lost:\n" + "\n".join(
        f"  {kind} {what}: {line}" for _, kind, what, line in lost)


def two_lans(engine):
    """alpha on lan0 with alpha-1 and alpha-2; bravo on lan1 with bravo-1."""
    engine.network("alpha")
    engine.network("bravo", parent="lan1")
    engine.container("alpha-1", "alpha", ip=A1)
    engine.container("alpha-2", "alpha", ip=A2)
    engine.container("bravo-1", "bravo", ip=B1)
    return engine.client.api.inspect_network("alpha")["Id"], \
        engine.client.api.inspect_network("bravo")["Id"]


# ---------------------------------------------------------------- start over leftovers

INSPECT_FAULTS = {
    # (how to inject, how long to keep it after the first hit)
    "timeout": (lambda p: p.delay("GET", INSPECT, API_TIMEOUT + 2), API_TIMEOUT + 0.5),
    "http500": (lambda p: p.error("GET", INSPECT, 500), 3.0),
    "reset": (lambda p: p.reset("GET", INSPECT), 3.0),
    "truncate": (lambda p: p.truncate("GET", INSPECT), 3.0),
}


@pytest.mark.parametrize("fault", list(INSPECT_FAULTS))
def test_start_over_leftovers_while_inspect_fails(lab, engine, proxy, watcher, fault):
    two_lans(engine)
    first = lab.daemon({})
    wait_routed(lab, A1, A2, B1)
    first.kill()
    assert lab.link(SHIM0) and lab.link(SHIM1) and routed(lab, A1, A2, B1), \
        "SIGKILL cannot clean up: the shims and routes should be left"
    # Joins while no daemon runs: routing it proves the new daemon converged.
    engine.container("alpha-3", "alpha", ip=A3)

    inject, hold = INSPECT_FAULTS[fault]
    rule = inject(proxy)
    second = lab.daemon({}, docker_host=proxy.url, ready=False)
    wait_until(lambda: rule.hits, timeout=20, desc=f"the daemon's first inspect ({fault})")
    time.sleep(hold)   # the daemon meets the fault (and retries) meanwhile
    proxy.clear(rule)
    print(f"{fault}: {rule.hits} inspect(s) failed")
    assert_nothing_lost(watcher, [A1, A2, B1], [SHIM0, SHIM1])
    statuses = [m[len("STATUS="):] for m in second.notified() if m.startswith("STATUS=")]
    assert not [s for s in statuses if EMPTY_STATUS.match(s)], \
        f"reported an empty view over a failed read: {statuses}"

    recovery = timed_wait(lambda: routed(lab, A1, A2, A3, B1), timeout=20,
                          desc="the new daemon's routes for every container")
    print(f"{fault}: every container routed {recovery:.2f} s after the fault cleared")
    second.wait_ready(timeout=10)
    assert_nothing_lost(watcher, [A1, A2, B1], [SHIM0, SHIM1])
    assert second.alive()
    assert_no_traceback(second.stderr, "the daemon's log")


# ---------------------------------------------------------------- malformed records

def _endpoint(field, value):
    def mutate(network, bad_id):
        network["Containers"][bad_id][field] = value
    return mutate


def _null_endpoint(network, bad_id):
    network["Containers"][bad_id] = None


def _drop(key):
    def mutate(network, _):
        network.pop(key, None)
    return mutate


def _ipam(key, value):
    def mutate(network, _):
        network["IPAM"]["Config"][0][key] = value
    return mutate


def _labels_list(network, _):
    network["Labels"] = ["org.example.a", "org.example.b"]


# id: (record corrupted: an endpoint of alpha or the network bravo, field, mutation)
MALFORMED = {
    "address-garbage": ("endpoint", "IPv4Address", _endpoint("IPv4Address", "garbage")),
    "address-prefix-99": ("endpoint", "IPv4Address",
                          _endpoint("IPv4Address", "198.51.100.140/99")),
    "address-300": ("endpoint", "IPv4Address", _endpoint("IPv4Address", "300.1.1.1")),
    "container-null": ("endpoint", "Containers", _null_endpoint),
    "network-no-id": ("network", "Id", _drop("Id")),
    "network-no-name": ("network", "Name", _drop("Name")),
    "subnet-garbage": ("network", "Subnet", _ipam("Subnet", "203.0.113.0/garbage")),
    "gateway-garbage": ("network", "Gateway", _ipam("Gateway", "203.0.113.999")),
    "labels-list": ("network", "Labels", _labels_list),
}


def _mentions(text, word):
    """word in text as a word of its own (case aside); an id prefix may go on."""
    after = "" if re.fullmatch(r"[0-9a-f]{12}", word) else "(?![A-Za-z0-9])"
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}{after}", text, re.IGNORECASE)


def corrupting(proxy, engine, case):
    """Two networks (two_lans), and a rule rewriting Docker's answers for `case`.

    Returns (the addresses whose records stay intact, what a report of the fault must
    name: the network, the container (by id when its record is null; the network by id
    when it has no name) and the field)."""
    target, field, mutate = MALFORMED[case]
    alpha_id, bravo_id = two_lans(engine)
    bad_id = engine.client.api.inspect_container("alpha-2")["Id"]
    if target == "endpoint":
        victim_id, served = alpha_id, [A1, B1]
        names = ("alpha", "alpha-2" if field != "Containers" else bad_id[:12], field)
    else:
        victim_id, served = bravo_id, [A1, A2]
        names = ("bravo" if field != "Name" else bravo_id[:12], field)

    def corrupt(body):
        for network in body if isinstance(body, list) else [body]:
            # the list call has no endpoints: only a network's record changes there
            if network.get("Id") == victim_id and (target == "network"
                                                   or network.get("Containers")):
                mutate(network, bad_id)
        return body

    proxy.rewrite("GET", r"/networks(/[^/]+)?", corrupt)
    return served, names


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_record_costs_only_itself(lab, engine, proxy, case):
    served, names = corrupting(proxy, engine, case)
    d = lab.daemon({}, docker_host=proxy.url, ready=False)
    d.wait_ready(timeout=20)
    wait_routed(lab, *served, timeout=10, desc=f"routes for the records left intact ({case})")
    print(f"{case}: the intact records routed {time.monotonic() - d.started_at:.2f} s "
          "after the daemon started")
    assert d.alive()
    warnings = [line for line in d.stderr.splitlines() if " WARNING " in line]
    named = [w for w in warnings if all(_mentions(w, n) for n in names)]
    assert named, (f"no warning naming {', '.join(names)}; warnings:\n" + "\n".join(warnings))
    assert_no_traceback(d.stderr, "the daemon's log")


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_record_in_check_and_status(lab, engine, proxy, case):
    _, names = corrupting(proxy, engine, case)
    field = names[-1]
    for args in (("check",), ("status",), ("status", "--json")):
        rc, out, err = lab.mvr(*args, config={}, docker_host=proxy.url)
        cmd = "macvlan-router " + " ".join(args)
        assert_no_traceback(out + err, cmd)
        if args[-1] == "--json":
            try:
                report = json.loads(out)
            except ValueError:
                pytest.fail(f"{cmd} printed no JSON (rc {rc}):\n{out}{err}")
            shown = " ".join(n["name"] for n in report["networks"])
            told = json.dumps(report["problems"])
        else:
            shown = told = out + err
        assert _mentions(shown, "alpha"), f"{cmd} does not show the served network:\n{out}{err}"
        assert _mentions(told, field), \
            f"{cmd} does not report the bad field {field} (rc {rc}):\n{out}{err}"


# ---------------------------------------------------------------- retries

def test_failed_refresh_is_retried_soon(lab, engine, proxy):
    engine.network("alpha")
    engine.container("alpha-1", "alpha", ip=A1)
    alpha_id = engine.client.api.inspect_network("alpha")["Id"]
    # RESYNC_INTERVAL at its default (60 s): only a retry can route the new container soon.
    d = lab.daemon({"LOG_LEVEL": "debug"}, docker_host=proxy.url)
    wait_routed(lab, A1)
    settled(lab, SHIM0)

    # Held for a second, so that every read the container's own events and netlink
    # changes cause fails: after that, nothing but a retry reads the network again.
    rule = proxy.error("GET", rf"/networks/{alpha_id}", 500)
    engine.container("alpha-2", "alpha", ip=A2, start=False)
    started = time.monotonic()
    engine.cli("start", "alpha-2")
    wait_until(lambda: rule.hits >= 2, timeout=10, desc="two failed reads of alpha")
    time.sleep(max(0.0, started + 1.0 - time.monotonic()))
    proxy.clear(rule)
    cleared = time.monotonic()
    try:
        wait_until(lambda: routed(lab, A2), timeout=15, desc="a route for alpha-2")
    finally:
        now = time.monotonic()
        print(f"retry: {rule.hits} reads of alpha answered 500; route for alpha-2 "
              f"{now - started:.2f} s after docker start, {now - cleared:.2f} s after the "
              "fault cleared")
    assert now - started < 5, f"alpha-2's route took {now - started:.1f} s " \
                              "(a retry should take about a second)"
    assert d.alive()
    assert_no_traceback(d.stderr, "the daemon's log")


def test_event_stream_cut_is_followed_again(lab, engine, proxy, watcher):
    engine.network("alpha")
    engine.container("alpha-1", "alpha", ip=A1)
    d = lab.daemon({}, docker_host=proxy.url)
    wait_routed(lab, A1)
    settled(lab, SHIM0)
    subscriptions = proxy.count("GET", "/events")
    # The engine stays up; only the stream breaks (what a proxy or a socket timeout does).
    rule = proxy.reset("GET", "/events", times=1)
    assert rule.hits == 1, "no event stream was being relayed to cut"
    cut = time.monotonic()
    engine.container("alpha-2", "alpha", ip=A2)
    wait_until(lambda: routed(lab, A2), timeout=15,
               desc="a route for a container started after the cut")
    print(f"stream cut: alpha-2, started after the cut, routed "
          f"{time.monotonic() - cut:.2f} s after it")
    assert proxy.count("GET", "/events") > subscriptions, "the daemon never subscribed again"
    assert_nothing_lost(watcher, [A1], [SHIM0])
    assert d.alive()
    assert_no_traceback(d.stderr, "the daemon's log")


# ---------------------------------------------------------------- a slow engine

WATCHDOG_SEC = 3.0
SLOW_CALL = 1.5


def test_watchdog_pings_continue_while_the_engine_is_slow(lab, engine, proxy):
    two_lans(engine)
    rule = proxy.delay("*", r".*", SLOW_CALL)
    d = lab.daemon({}, docker_host=proxy.url, ready=False,
                   env={"WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1e6)), "WATCHDOG_PID": None})
    d.wait_ready(timeout=45)
    wait_routed(lab, A1, A2, B1, timeout=30)
    # A reload re-reads every network; a new container one of them.
    d.send_signal(signal.SIGHUP)
    engine.container("alpha-3", "alpha", ip=A3)
    wait_routed(lab, A3, timeout=30)
    wait_until(lambda: d.count("READY=1") >= 2, timeout=30, desc="READY=1 after the reload")
    end = time.monotonic()

    pings = d.notify_times("WATCHDOG=1")
    marks = [d.started_at] + [t for t in pings if t <= end] + [end]
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    worst = max(gaps)
    print(f"slow engine ({SLOW_CALL} s per call, {rule.hits} calls delayed): "
          f"{len(pings)} pings, longest gap {worst:.2f} s (WatchdogSec {WATCHDOG_SEC} s)")
    assert rule.hits >= 6, "the delay rule hardly applied"
    assert worst <= WATCHDOG_SEC, (
        f"no WATCHDOG=1 for {worst:.2f} s (systemd would kill the daemon after "
        f"{WATCHDOG_SEC} s); gaps: {[round(g, 2) for g in gaps]}")
    assert d.alive()
    assert_no_traceback(d.stderr, "the daemon's log")


# ---------------------------------------------------------------- dockerd killed

BURST = [f"198.51.100.{n}" for n in range(140, 152)]


@contextlib.contextmanager
def dockerd_options(engine, *options):
    """Run the engine with more options for one test, and as before after it."""
    if not options:
        yield
        return
    engine.stop()
    engine.extra_args = list(options)
    engine.start()
    try:
        yield
    finally:
        engine.stop()
        engine.extra_args = []
        engine.start()


# id: (dockerd options, container options). Without --live-restore, a restarted dockerd
# stops the containers it finds running; with --restart always it then starts them again.
RESTARTS = {
    "live-restore": (["--live-restore"], []),
    "restart-always": ([], ["--restart", "always"]),
}


@pytest.mark.parametrize("mode", list(RESTARTS))
def test_dockerd_sigkilled_mid_burst_and_restarted(lab, engine, watcher, mode):
    options, extra = RESTARTS[mode]
    with dockerd_options(engine, *options):
        engine.network("alpha")
        engine.container("alpha-1", "alpha", ip=A1, extra=extra)
        engine.container("alpha-2", "alpha", ip=A2, extra=extra)
        d = lab.daemon({})
        wait_routed(lab, A1, A2)
        started, refused = [], []

        def burst():
            for i, addr in enumerate(BURST):
                try:
                    engine.container(f"burst-{i}", "alpha", ip=addr, extra=extra)
                except Exception as exc:  # noqa: BLE001 - the engine died under this one
                    refused.append(f"{addr}: {str(exc)[-200:]}")
                else:
                    started.append(addr)

        thread = threading.Thread(target=burst, daemon=True)
        thread.start()
        wait_until(lambda: len(started) >= 3, timeout=30, desc="3 containers of the burst")
        before = {c["Id"]: c["State"]["StartedAt"] for c in running_containers(engine)}
        engine.crash()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the burst did not end after the engine died"
        time.sleep(1)
        engine.start()

        def converged():
            """Our routes are those of the running containers, through the shim."""
            running = addresses(running_containers(engine))
            have = {norm_dst(r["dst"] if "/" in r["dst"] else host_prefix(r["dst"]))
                    for r in lab.owned_routes()}
            return have == {host_prefix(a) for a in running} and routed(lab, *running)
        recovery = timed_wait(converged, timeout=30,
                              desc="routes for exactly the running containers")
        running = running_containers(engine)
        survivors = [c for c in running if before.get(c["Id"]) == c["State"]["StartedAt"]]
        print(f"dockerd SIGKILL ({mode}): {len(started)} of {len(BURST)} burst containers "
              f"started ({len(refused)} refused by the dead engine), {len(running)} running "
              f"after, {len(survivors)} never stopped; "
              f"routes right {recovery:.2f} s after dockerd answered again")
        if mode == "live-restore":
            assert survivors, "no container survived the engine's restart: nothing to judge"
        assert_nothing_lost(watcher, addresses(survivors), [SHIM0])
        assert d.alive()
        assert_no_traceback(d.stderr, "the daemon's log")


def running_containers(engine):
    api = engine.client.api
    return [api.inspect_container(c["Id"])
            for c in api.containers(filters={"label": "org.macvlan-router.test"})]


def addresses(containers):
    return [net["IPAddress"] for c in containers
            for net in c["NetworkSettings"]["Networks"].values() if net.get("IPAddress")]


# ---------------------------------------------------------------- netlink overflow

FLOOD_ROUTES = 6000     # a round of 12000 messages overflows pyroute2's 1 MiB buffer 4 times
FLOOD_ROUNDS = 8        # whatever buffer the monitor has, up to about 64 MiB
FLOOD_TABLE = "100"


def test_netlink_monitor_overflow_leads_to_resync(lab, engine):
    engine.network("alpha")
    engine.container("alpha-1", "alpha", ip=A1)
    engine.container("alpha-2", "alpha", ip=A2)
    d = lab.daemon({})
    wait_routed(lab, A1, A2)
    batch = lab.path("flood.batch")
    # Routes in another table: the monitor's socket receives them, no reconcile needs them.
    prefixes = [f"198.18.{n // 250}.{n % 250 + 1}/32" for n in range(FLOOD_ROUTES)]
    batch.write_text("".join(f"route add {p} dev lan0 table {FLOOD_TABLE}\n" for p in prefixes)
                     + "".join(f"route del {p} dev lan0 table {FLOOD_TABLE}\n"
                               for p in prefixes))
    d.send_signal(signal.SIGSTOP)
    try:
        sent = 0
        for _ in range(FLOOD_ROUNDS):
            lab.ipc("-batch", str(batch))
            sent += 2 * FLOOD_ROUTES
            # The daemon's monitor is its netlink socket subscribed to link, address and
            # route groups; Drops counts what the kernel could not queue for it.
            sockets = [s for s in netlink_sockets(d.proc.pid) if s["groups"]]
            assert sockets, f"no subscribed netlink socket: {netlink_sockets(d.proc.pid)}"
            monitor = max(sockets, key=lambda s: s["drops"])
            if monitor["drops"]:
                break
        assert monitor["drops"] > 0, \
            f"{sent} messages did not overflow {monitor}"
        lab.ipc("route", "del", f"{A1}/32", "proto", "210")
        after = {s["inode"]: s for s in netlink_sockets(d.proc.pid)}[monitor["inode"]]
        assert after["drops"] > monitor["drops"], "the deletion's message was not dropped too"
    finally:
        d.send_signal(signal.SIGCONT)
        continued = time.monotonic()
        lab.ipc("route", "flush", "table", FLOOD_TABLE, check=False)
    print(f"overflow: of {sent} messages, the daemon's monitor socket dropped "
          f"{after['drops']} (receive queue {after['rmem']} bytes)")
    try:
        wait_until(lambda: routed(lab, A1), timeout=15, desc="the deleted route back")
    finally:
        elapsed = time.monotonic() - continued
        print(f"overflow: route back {elapsed:.2f} s after SIGCONT")
    assert elapsed < 5, f"the route took {elapsed:.1f} s: no resync on ENOBUFS?"
    assert routed(lab, A2)
    assert d.alive()
    assert_no_traceback(d.stderr, "the daemon's log")
