"""The package on a booted Debian 13 VM (QEMU, Debian's stock kernel, systemd as PID 1).

One VM run serves every test here: the guest installs the .deb under test, runs each
tests/vm/guest/check_*.py with --phase boot1, reboots, runs them with --phase boot2 and
powers off (tests/vm/vm_host.py). Each (check file, phase) is one test; a "FAIL NAME
detail" line the guest printed fails it with that line, and so does a file that printed
nothing or exited non-zero.
"""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vm_host as vm  # noqa: E402
from vm_host import e2e  # noqa: E402

pytestmark = e2e.marks("the VM tests")

CHECKS = sorted(p.stem for p in (vm.VM_DIR / "guest").glob("check_*.py"))
# Booting twice under software emulation, a docker restart, repairs: generous, but bounded.
RUN_TIMEOUT = 2400


@pytest.fixture(scope="module")
def results():
    vm.install_host_tools()
    t = time.monotonic()
    deb, _changes = e2e.build_deb(nocheck=True)
    print(f"vm: built {deb.name} in {time.monotonic() - t:.1f}s")
    with vm.vm_run(deb) as machine:
        t = time.monotonic()
        rc = machine.boot_until_poweroff(RUN_TIMEOUT)
        files = machine.read_results()
        print(f"vm: QEMU exited {rc} after {time.monotonic() - t:.1f}s (two boots)")
        if not files:
            pytest.fail("the VM wrote no results to its second disk; console tail:\n"
                        + machine.console_tail())
        yield files, machine.console_tail()


def _outcome(files, name):
    out = files.get(f"results/{name}.out")
    rc = files.get(f"results/{name}.rc", "").split()
    return out, rc


def test_package_installs(results):
    files, console = results
    out, rc = _outcome(files, "install")
    assert out is not None, f"the guest never installed the package; console:\n{console}"
    assert rc[:1] == ["0"], f"apt-get install of the .deb failed in the VM:\n{out[-3000:]}"


@pytest.mark.parametrize("phase", ["boot1", "boot2"])
@pytest.mark.parametrize("check", CHECKS)
def test_guest_check(results, check, phase):
    files, console = results
    out, rc = _outcome(files, f"{phase}-{check}")
    assert out is not None, (f"{check} --phase {phase} never ran in the VM; results: "
                             f"{sorted(files)}; console:\n{console}")
    lines = vm.parse_lines(out)
    for line in lines:
        print(line)
    print(f"{check} --phase {phase}: exit {rc[:1]}, {rc[1:2]} s")
    failed = [line for line in lines if line.startswith("FAIL ")]
    assert not failed, ("\n".join(failed) + f"\n\nfull output:\n{out[-6000:]}\n\n"
                        "journal of the second boot (macvlan-router, docker, networkd):\n"
                        + files.get("results/journal.out", "(none)")[-8000:])
    assert lines, f"{check} --phase {phase} printed no check line:\n{out[-3000:]}"
    assert rc[:1] == ["0"], f"{check} --phase {phase} exited {rc}:\n{out[-3000:]}"
