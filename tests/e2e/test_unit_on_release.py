"""The unit tests under each release's own python3 and Debian libraries.

Root only. The machine running the suite is one Debian release; the package must work on
every release in e2e.RELEASES. So the checkout is copied into each release's e2e box
(e2e_host.py; nothing installed) and tests/unit runs there with its /usr/bin/python3 and
its python3-docker, python3-pyroute2, python3-systemd, python3-pytest, python3-hypothesis.
"""

import re
import sys
from pathlib import Path

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


def test_unit_tests_pass_on_the_release(plain_box):
    box = plain_box
    box.untar(e2e.checkout_tar(), SRC)
    versions = box.sh("python3 -", input=VERSIONS).stdout
    print(f"{box.release.suite}:\n{versions}")
    p = box.sh(f"cd {SRC} && env -i PATH={e2e.DEBIAN_PATH} HOME=/root LC_ALL=C.UTF-8 "
               "PYTHONDONTWRITEBYTECODE=1 python3 -m pytest -p no:cacheprovider -q -ra "
               "tests/unit", check=False, timeout=900)
    summary = (p.stdout.strip().splitlines() or [""])[-1]
    print(f"{box.release.suite}: {summary}")
    assert p.returncode == 0, \
        f"tests/unit on {box.release.suite} ({versions}):\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}"
    assert re.search(r"\d+ passed", summary), summary
