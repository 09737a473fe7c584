"""Real systemd reads the table of tricky files, and our parser must read them alike.

Root only. The table is tests/envfile_cases.py (tests/unit/test_config.py feeds it to our
parser). Here each file becomes the EnvironmentFile= of one instance of a template unit
whose ExecStart= writes its environment (env -0) to a file, in the e2e box of each release
booted with systemd as PID 1 in docker-in-docker (e2e_host.py; no package installed).
What systemd read from a file is what its instance's environment has beyond that of an
instance with an empty file. For each case, systemd must do what the table says, and our
parser must read the same values, or report the problem the table names where systemd
takes something we cannot use.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_host as e2e  # noqa: E402  (also puts tests/ on sys.path)
from envfile_cases import CASES, REFUSED  # noqa: E402

from macvlan_router import config  # noqa: E402

pytestmark = e2e.marks("e2e tests")

CASES_DIR = "/root/envcases"
UNIT = f"""[Unit]
Description=macvlan-router test: what EnvironmentFile= puts in the environment

[Service]
Type=oneshot
EnvironmentFile={CASES_DIR}/%i.env
ExecStart=/usr/bin/env -0
StandardOutput=truncate:{CASES_DIR}/%i.out
"""
BASE = "base"       # the instance with an empty file


def systemd_reads(box, files):
    """Start one instance per file; return what each put in the environment (or REFUSED)."""
    with tempfile.TemporaryDirectory(prefix="mvr-envcases-") as local:
        local = Path(local)
        (local / "in").mkdir()
        for name, data in {BASE: b"", **files}.items():
            (local / "in" / f"{name}.env").write_bytes(data)
        box.cp_in(local / "in", CASES_DIR)
        box.write("/etc/systemd/system/envcase@.service", UNIT)
        box.sh("systemctl daemon-reload")
        # Instances whose file systemd refuses fail to start; the others still run.
        box.sh("systemctl start " + " ".join(f"envcase@{n}.service" for n in [BASE, *files]),
               check=False, timeout=300)
        box.engine.docker("cp", f"{box.name}:{CASES_DIR}/.", local / "out")
        outputs = {path.stem: path.read_bytes() for path in (local / "out").glob("*.out")}
    assert BASE in outputs, "the instance with an empty file did not run"
    base = environment(outputs[BASE])
    assert "PATH" in base
    return {name: {k: v for k, v in environment(outputs[name]).items() if k not in base}
            if name in outputs else REFUSED for name in files}


def environment(output):
    pairs = (entry.decode().split("=", 1) for entry in output.split(b"\0") if entry)
    return dict(pairs)


def systemd_version(box):
    # "systemd 252 (252.39-1~deb12u1)"
    return int(box.sh("systemctl --version").stdout.split()[1])


def test_systemd_and_our_parser_read_every_file_alike(plain_box):
    version = systemd_version(plain_box)
    names = {f"c{i}": case for i, case in enumerate(CASES)}
    read = systemd_reads(plain_box, {name: case.data for name, case in names.items()})
    wrong = []
    for name, case in names.items():
        expected = case.systemd_for(version)
        if read[name] != expected:
            wrong.append(f"{case.name}: systemd {version} read {read[name]!r}, "
                         f"the table says {expected!r}")
        ours = config.parse_environment_file(case.data.decode("utf-8", "surrogateescape"), "f")
        if case.problem is None and (ours.problems or ours.values != read[name]):
            wrong.append(f"{case.name}: we read {ours.values!r} {ours.problems}, "
                         f"systemd {read[name]!r}")
        if case.problem is not None and not any(case.problem in p for p in ours.problems):
            wrong.append(f"{case.name}: systemd read {read[name]!r}; we should report "
                         f"{case.problem!r}, and report {ours.problems}")
    assert not wrong, "\n".join(wrong)
