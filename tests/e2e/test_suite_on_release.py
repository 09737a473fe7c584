"""The unit and integration tests under each release's own python3 and Debian libraries.

Root only. The machine running the suite is one Debian release; the package must work on
every release in e2e.RELEASES. So the checkout is copied into each release's e2e box
(e2e_host.py; nothing installed) and its tests run there with /usr/bin/python3 and the
release's python3-docker, python3-pyroute2, python3-systemd, python3-pytest and
python3-hypothesis; the integration tests also with the release's docker.io and podman,
as lab engines inside the box. tests/run-all runs both on the machine itself too (pass 1),
so the integration tests, which take minutes, run in the box only for the other releases.
"""

import contextlib
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_host as e2e  # noqa: E402

pytestmark = e2e.marks("e2e tests")

SRC = "/root/src"        # not /tmp: from Debian 13 on, systemd mounts a tmpfs there
VERSIONS = """import sys
from importlib.metadata import version
print("python", sys.version.split()[0])
for dist in ("docker", "pyroute2", "systemd-python", "pytest", "hypothesis"):
    print(dist, version(dist))
"""


def machine_release():
    """The codename of the Debian release this machine runs, or None."""
    with contextlib.suppress(OSError):
        m = re.search(r"^VERSION_CODENAME=(\S+)$", Path("/etc/os-release").read_text(), re.M)
        return m and m.group(1)
    return None


def run_tests(box, paths, timeout):
    """pytest on `paths` of the checkout in the box; asserts that it passed."""
    if box.sh(f"test -d {SRC}", check=False).returncode != 0:
        box.untar(e2e.checkout_tar(), SRC)
    # The labs keep their engines' storage under /tmp, and overlay cannot stack on the box's
    # overlay root (Podman 4.3: "'overlay' is not supported over overlayfs"). Debian 13's
    # systemd mounts a tmpfs there, as /tmp is on a host's own file system; Debian 12's does not.
    box.sh("mountpoint -q /tmp || mount -t tmpfs -o mode=1777,nosuid,nodev mvr-tmp /tmp")
    versions = box.sh("python3 -", input=VERSIONS).stdout
    print(f"{box.release.suite}:\n{versions}")
    p = box.sh(f"cd {SRC} && env -i PATH={e2e.DEBIAN_PATH} HOME=/root LC_ALL=C.UTF-8 "
               "PYTHONDONTWRITEBYTECODE=1 MVR_REQUIRE_INTEGRATION=1 "
               f"timeout --signal=INT --kill-after=60 {timeout} "
               f"python3 -m pytest -p no:cacheprovider -q -ra {paths}",
               check=False, timeout=timeout + 120)
    summary = (p.stdout.strip().splitlines() or [""])[-1]
    print(f"{box.release.suite}: {summary}")
    assert p.returncode == 0, \
        f"{paths} on {box.release.suite} ({versions}):\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}"
    assert re.search(r"\d+ passed", summary), summary


def test_unit_tests_pass_on_the_release(plain_box):
    run_tests(plain_box, "tests/unit", timeout=900)


def test_integration_tests_pass_on_the_release(plain_box):
    if plain_box.release.suite == machine_release():
        pytest.skip(f"{plain_box.release.suite} is this machine's release: "
                    "tests/integration runs on the machine itself")
    # The Podman tests too: every box carries its release's podman, netavark and crun.
    run_tests(plain_box, "tests/integration", timeout=1800)
