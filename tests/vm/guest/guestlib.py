"""What the guest checks share (tests/vm/guest/check_*.py, run inside the VM by runner.py).

Contract (notes/s3/contract-vm.md): a check file runs as `python3 FILE --phase boot1`, then
after a reboot as `python3 FILE --phase boot2`; it prints one line per check, "ok NAME
detail" or "FAIL NAME detail", and exits non-zero if any failed. Each file has its own
parents, networks and subnets. Taken so far (documentation ranges only):
  check_macvlan.py  parent vmlan0 (a dummy systemd-networkd makes, baked into the image),
                    198.51.100.0/26 and 2001:db8:a::/64
  check_vlan.py     parents vlanp0 (dummy) and its VLANs, 198.51.100.64/26 and .128/26
  check_ipvlan.py   parent ipvp0 (veth, peer ipvpeer0), 203.0.113.0/24
  check_podman.py   parents podip0, podmv0 (dummies), 198.51.100.192/28, .208/28 and
                    2001:db8:d::/64
  check_nm.py       parent nmp0 (veth, peer nmpeer0; NetworkManager's), 198.51.100.224/27
                    and 2001:db8:c::/64
All of 198.51.100.0/24 and 203.0.113.0/24 is taken; 2001:db8::/32 has room.

The API, kept small on purpose:
  phase()                      "boot1" or "boot2", from the command line
  Report                       ok/FAIL lines; `with report.check(NAME) as c: ... c.detail = ...`
  sh(script), run(*argv), docker(*args)   bounded subprocesses (text), check=True raises
  wait_until(cond, timeout, desc=...)     a bounded poll; returns cond()'s truthy value
  busybox_image()              the image "bb:latest" (docker import of busybox-static)
  container(name, network, ip, *more)     a sleeping container, --restart=always
  config_add(KEY, *values, apply=True), config_remove(KEY, *values, apply=True)
                               edit a list key of /etc/default/macvlan-router, reload
                               (or start the service, when a bad value stopped it)
  link(name), routes(dev=None), addresses(dev)   what the kernel has (ip -j)
  ping(addr), container_ping(container, addr)    one round trip, True/False
  unit_show(unit, *props), journal(*args)        systemd's view
  Watch(addr)                  while an event happens: a ping every 50 ms and `ip monitor`
  state_file(name)             a file that survives the reboot, for boot2 to read
  route_added_this_boot(addr)  the journal line of this boot that added the route to addr
  main(NAME, boot1, boot2)     runs a check file's phase: boot1(report) or boot2(report)
Deadlines are REPAIR (a repair, under software emulation on a loaded machine) and SETTLE.
"""

import argparse
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

PROTO = "210"                     # our route protocol (the package names it macvlan-router)
SHIM_PREFIX = "mvr-"              # the shim of parent P is mvr-P by default
IMAGE = "bb:latest"
REPAIR = 15.0                     # seconds; the daemon repairs in well under one on hardware
SETTLE = 120.0                    # seconds for slower things (a container start under TCG)
STATE_DIR = Path("/var/lib/mvr-vm/state")
CONFIG = Path("/etc/default/macvlan-router")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX_LINKS = ("sh", "sleep", "ping", "ping6", "ip", "cat", "true")


class CheckError(Exception):
    """A check saw something wrong (its message is the FAIL line's detail)."""


def phase():
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("boot1", "boot2"), required=True)
    return parser.parse_args().phase


class Report:
    """Prints "ok NAME detail" / "FAIL NAME detail" lines as checks finish."""

    def __init__(self):
        self.failed = 0

    def ok(self, name, detail=""):
        print(f"ok {name} {detail}".rstrip(), flush=True)

    def fail(self, name, detail=""):
        self.failed += 1
        print(f"FAIL {name} {' '.join(str(detail).split())}".rstrip(), flush=True)

    @contextlib.contextmanager
    def check(self, name):
        """A check whose body raises on failure and may set `.detail` for the ok line."""
        class Check:
            detail = ""
        c = Check()
        try:
            yield c
        except Exception as e:  # every error is this check's failure, not the file's end
            if not isinstance(e, CheckError):
                traceback.print_exc(file=sys.stderr)
            self.fail(name, f"{type(e).__name__}: {e}" if not isinstance(e, CheckError)
                      else str(e))
        else:
            self.ok(name, c.detail)

    def done(self):
        return 1 if self.failed else 0


def run(*argv, check=True, timeout=120, input=None):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, input=input,
                       timeout=timeout, env={"PATH": PATH, "LC_ALL": "C.UTF-8"},
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise CheckError(f"`{' '.join(map(str, argv))}` failed (rc={p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()[-500:]}")
    return p


def sh(script, check=True, timeout=120):
    return run("sh", "-c", script, check=check, timeout=timeout)


def docker(*args, check=True, timeout=SETTLE):
    return run("docker", *args, check=check, timeout=timeout)


def wait_until(cond, timeout, interval=0.2, desc="the condition"):
    """Poll cond() until it is truthy (bounded in time and in tries); errors count as no."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        try:
            value = cond()
        except (CheckError, subprocess.SubprocessError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise CheckError(f"timed out after {timeout:.0f}s waiting for {desc}")


def busybox_image():
    """bb:latest, made from busybox-static (the guest has no registry)."""
    if docker("image", "inspect", IMAGE, check=False).returncode == 0:
        return IMAGE
    sh(f"""set -e
d=$(mktemp -d); mkdir -p $d/bin; cp /bin/busybox $d/bin/busybox
for l in {' '.join(BUSYBOX_LINKS)}; do ln -s busybox $d/bin/$l; done
tar -C $d -c . | docker import - {IMAGE} >/dev/null; rm -rf $d""")
    return IMAGE


def container(name, network, ip, *more):
    """A container that sleeps, comes back after the reboot (--restart=always) and stops at
    once (busybox sleep as PID 1 ignores SIGTERM: without --stop-timeout every docker
    restart and shutdown would wait 10 s for it)."""
    busybox_image()
    docker("run", "-d", "--name", name, "--restart=always", "--stop-timeout", "1",
           "--network", network, "--ip", ip, *more, IMAGE, "sleep", "1000000")


def config_add(key, *values, apply=True):
    """Append values to the space-separated list KEY in /etc/default/macvlan-router (check
    files share that file: never overwrite it), then reload macvlan-router (not `apply`:
    the caller restarts it)."""
    _config_edit(key, lambda old: old + [v for v in values if v not in old], apply)


def config_remove(key, *values, apply=True):
    """Take values out of the list KEY again, then reload (not `apply`: no reload)."""
    _config_edit(key, lambda old: [v for v in old if v not in values], apply)


def _config_edit(key, change, apply):
    lines = CONFIG.read_text().splitlines()
    index = next((i for i, line in enumerate(lines) if line.startswith(f"{key}=")), None)
    old = [] if index is None else lines[index].split("=", 1)[1].strip().strip('"').split()
    line = f'{key}="{" ".join(change(old))}"'
    if index is None:
        lines.append(line)
    else:
        lines[index] = line
    CONFIG.write_text("\n".join(lines) + "\n")
    if apply:
        # Starts it too when a bad value had stopped it.
        run("systemctl", "reload-or-restart", "macvlan-router", timeout=SETTLE)


def link(name):
    """`ip -j -d link show NAME` as a dict, or None when there is no such link."""
    p = run("ip", "-j", "-d", "link", "show", "dev", name, check=False)
    return json.loads(p.stdout)[0] if p.returncode == 0 and p.stdout.strip() else None


def routes(dev=None, proto=PROTO):
    """{destination: device} of the main table's routes with our protocol (both families)."""
    out = {}
    for fam in ("-4", "-6"):
        argv = ["ip", "-j", fam, "route", "show", "proto", proto]
        if dev:
            argv += ["dev", dev]
        p = run(*argv, check=False)
        for r in json.loads(p.stdout or "[]") if p.returncode == 0 else []:
            dst = r["dst"]
            if "/" not in dst:
                dst += "/128" if ":" in dst else "/32"
            out[dst] = r.get("dev", dev)
    return out


def host_prefix(addr):
    return f"{addr}/128" if ":" in addr else f"{addr}/32"


def routed(shim, *addrs):
    """Every one of addrs has its host route via shim."""
    have = routes(dev=shim)
    return all(have.get(host_prefix(a)) == shim for a in addrs)


def reach_both_ways(container, addrs, host_addrs, pinger=None):
    """The host pings addrs, the container host_addrs (`pinger(container, addr)`, docker
    exec's ping by default), each within SETTLE; returns what was proven."""
    pinger = pinger or container_ping
    for a in addrs:
        wait_until(lambda: ping(a), SETTLE, desc=f"host -> {a}")
    for h in host_addrs:
        wait_until(lambda: pinger(container, h), SETTLE, desc=f"{container} -> {h}")
    return f"host -> {', '.join(addrs)}; {container} -> {', '.join(host_addrs)}"


def back_after_reboot(r, prefix, routed, reachable, first, what, manager_says):
    """The checks `{prefix}routes-back-after-reboot` (`routed()` within SETTLE; `first`: the
    address whose route must be this boot's), `{prefix}reach-both-ways-after-reboot` and
    `{prefix}shim-unmanaged-after-reboot` (`manager_says()`: the network manager's word on
    the shim)."""
    with r.check(f"{prefix}routes-back-after-reboot") as c:
        wait_until(routed, SETTLE, desc=f"routes to {what}")
        c.detail = route_added_this_boot(first)
    with r.check(f"{prefix}reach-both-ways-after-reboot") as c:
        c.detail = reachable()
    with r.check(f"{prefix}shim-unmanaged-after-reboot") as c:
        c.detail = manager_says()
        if "unmanaged" not in c.detail:
            raise CheckError(c.detail)


def addresses(dev):
    p = run("ip", "-j", "addr", "show", "dev", dev, check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return []
    return [a["local"] for a in json.loads(p.stdout)[0].get("addr_info", [])]


def ping(addr, timeout=2):
    fam = "-6" if ":" in addr else "-4"
    return run("busybox", "ping", fam, "-c", "1", "-W", str(timeout), addr, check=False,
               timeout=timeout + 10).returncode == 0


def container_ping(container, addr, timeout=2):
    fam = "-6" if ":" in addr else "-4"
    return docker("exec", container, "ping", fam, "-c", "1", "-W", str(timeout), addr,
                  check=False, timeout=timeout + 30).returncode == 0


def unit_show(unit, *props):
    p = run("systemctl", "show", unit, *(f"--property={x}" for x in props))
    return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


def journal(*args):
    return run("journalctl", "--no-pager", *args, check=False, timeout=60).stdout


def route_added_this_boot(address):
    """The line of this boot's journal in which macvlan-router added its route to
    `address`: proof that the route was made anew, not left from before."""
    added = [line for line in journal("-b", "-u", "macvlan-router", "-o", "cat").splitlines()
             if "ip route replace" in line and address in line]
    if not added:
        raise CheckError(f"the journal of this boot has no route to {address} added by "
                         "macvlan-router")
    return added[0]


def main(name, boot1, boot2):
    """A check file's exit status: boot1(report) or boot2(report), by the phase asked for.
    A command that failed outside any check fails the file, with a line saying so."""
    report = Report()
    try:
        (boot1 if phase() == "boot1" else boot2)(report)
    except subprocess.SubprocessError as e:
        print(f"FAIL {name} {e}", flush=True)
        return 1
    return report.done()


def state_file(name):
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    return STATE_DIR / name


class Watch:
    """While an event happens: `busybox ping -i 0.05 ADDR` and `ip -ts monitor` in the
    background, bounded by `limit` seconds. After the block: `lost` (sequence numbers
    with no reply, the one in flight at the end not counted), `longest` (the longest run
    of them, in seconds; infinite when ping ended early, `ended_early`) and
    `deleted(*texts)` (monitor lines deleting something)."""

    INTERVAL = 0.05

    def __init__(self, addr, limit=300):
        self.addr = addr
        self.limit = limit
        self.lost = []
        self.longest = 0.0
        self.monitor = []

    def __enter__(self):
        fam = "-6" if ":" in self.addr else "-4"
        self.mon = subprocess.Popen(
            ["timeout", str(self.limit), "ip", "-ts", "-o", "monitor", "link", "address",
             "route"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL)
        self.pinger = subprocess.Popen(
            ["timeout", str(self.limit), "busybox", "ping", fam, "-i", str(self.INTERVAL),
             self.addr], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL)
        self.replies = []
        time.sleep(1)
        return self

    def settle(self, seconds=2.0):
        """Let the ping run on after an event so a repair shows up in it."""
        time.sleep(seconds)

    def __exit__(self, *exc):
        # SIGINT (forwarded by timeout) makes busybox ping print how many it sent.
        # busybox ping exits at the first send that fails (no route to the address): the
        # rest of the event went unmeasured, and the count below cannot tell.
        self.ended_early = self.pinger.poll() is not None
        self.pinger.send_signal(signal.SIGINT)
        self.mon.terminate()
        out = {}
        for name, p in (("ping", self.pinger), ("mon", self.mon)):
            try:
                out[name] = p.communicate(timeout=10)[0]
            except subprocess.TimeoutExpired:
                p.kill()
                out[name] = p.communicate(timeout=10)[0]
        seen = {int(n) for n in re.findall(r"seq=(\d+)", out["ping"])}
        sent = re.search(r"(\d+) packets transmitted", out["ping"])
        sent = int(sent.group(1)) if sent else max(seen, default=-1) + 2
        self.replies = sorted(seen)
        # The last one sent may still be in flight: it does not count.
        self.lost = sorted(set(range(sent - 1)) - seen)
        run_len = best = 0
        prev = None
        for n in self.lost:
            run_len = run_len + 1 if prev is not None and n == prev + 1 else 1
            best = max(best, run_len)
            prev = n
        self.longest = float("inf") if self.ended_early else best * self.INTERVAL
        self.ping_end = (out["ping"].strip().splitlines() or [""])[-1]
        self.monitor = out["mon"].splitlines()
        return False

    def deleted(self, *texts):
        """`ip monitor` lines that delete something and contain every one of texts."""
        return [line for line in self.monitor
                if "Deleted" in line and all(t in line for t in texts)]

    def summary(self):
        if self.ended_early:
            return (f"ping ended early after {len(self.replies)} replies, "
                    f"{len(self.lost)} lost: {self.ping_end!r}")
        return (f"{len(self.lost)} of {len(self.replies) + len(self.lost)} pings lost "
                f"(longest gap {self.longest:.2f}s)")
