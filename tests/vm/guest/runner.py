"""Runs in the VM at every boot (mvr-vm.service, after multi-user.target).

First boot: install /mnt/run/macvlan-router.deb with apt (offline: its dependencies are in
the image), run every tests/vm/guest/check_*.py with --phase boot1 (check_podman.py last),
reboot. Second boot:
run them with --phase boot2, write /var/lib/mvr-vm/results to /dev/vdb as a tar stream,
power off: once this exits, the unit's ExecStopPost does what /run/mvr-vm-next says.
Every step is bounded; what a step prints goes to the results and the console.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

GUEST = Path(__file__).resolve().parent
VAR = Path("/var/lib/mvr-vm")
RESULTS = VAR / "results"
PHASE_FILE = VAR / "phase"
NEXT = Path("/run/mvr-vm-next")   # what the unit's ExecStopPost does once we exited
DEB = Path("/mnt/run/macvlan-router.deb")
CHECK_TIMEOUT = 900
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
       "DEBIAN_FRONTEND": "noninteractive",
       "PYTHONDONTWRITEBYTECODE": "1"}


def say(text):
    print(f"mvr-vm: {text}", flush=True)


def step(name, argv, timeout):
    """Run argv, keep its output as results/NAME.out and its exit status as NAME.rc."""
    t = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV,
                           stdin=subprocess.DEVNULL)
        rc, out = p.returncode, p.stdout + (f"\n--- stderr\n{p.stderr}" if p.stderr else "")
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
        out += f"\nFAIL {name} timed out after {timeout}s\n"
    took = time.monotonic() - t
    (RESULTS / f"{name}.out").write_text(out)
    (RESULTS / f"{name}.rc").write_text(f"{rc}\n{took:.1f}\n")
    say(f"{name}: rc={rc} in {took:.1f}s")
    for line in out.splitlines():
        print(f"  {line}", flush=True)
    return rc


def run_checks(phase):
    # check_podman switches the service to Podman and back: after every other check, so
    # none of theirs runs while the service follows another engine.
    last = ("check_podman",)
    for check in sorted(GUEST.glob("check_*.py"), key=lambda p: (p.stem in last, p.name)):
        step(f"{phase}-{check.stem}", [sys.executable, str(check), "--phase", phase],
             CHECK_TIMEOUT)


def main():
    RESULTS.mkdir(parents=True, exist_ok=True)
    phase = PHASE_FILE.read_text().strip() if PHASE_FILE.exists() else "boot1"
    say(f"phase {phase}, uptime {Path('/proc/uptime').read_text().split()[0]}s")
    (RESULTS / f"{phase}-uptime").write_text(Path("/proc/uptime").read_text())
    if phase == "boot1":
        # A persistent journal, so boot2 can show what boot1 logged.
        step("journal-persist", ["sh", "-c", "mkdir -p /var/log/journal && "
                                 "systemd-tmpfiles --create --prefix /var/log/journal && "
                                 "journalctl --flush"], 60)
        step("install", ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                         str(DEB)], 600)
        step("versions", ["dpkg-query", "-W", "macvlan-router", "docker.io", "systemd",
                          "linux-image-amd64", "python3", "python3-docker",
                          "python3-pyroute2", "python3-systemd"], 60)
        run_checks("boot1")
        PHASE_FILE.write_text("boot2\n")
        os.sync()
        say("rebooting")
        NEXT.write_text("reboot\n")
        return
    run_checks("boot2")
    step("journal", ["journalctl", "--no-pager", "-o", "short-monotonic", "-b", "-u",
                     "macvlan-router", "-u", "docker", "-u", "systemd-networkd"], 120)
    step("journal-boot1", ["journalctl", "--no-pager", "-o", "short-monotonic", "-b", "-1",
                           "-u", "macvlan-router"], 120)
    subprocess.run(["tar", "-C", str(VAR), "-cf", "/dev/vdb", "results"], timeout=120)
    os.sync()
    say("results written to /dev/vdb, powering off")
    NEXT.write_text("poweroff\n")


if __name__ == "__main__":
    main()
