"""The VM test's host side: a Debian 13 VM image, built once and cached, booted under QEMU.

    this machine (nothing here touches its interfaces, addresses or routes)
      qemu-system-x86_64, software emulation (TCG; KVM does not run stock kernels here),
      no network device at all (-nic none)
        /dev/vda   a fresh qcow2 overlay over the cached raw image (ext4, no partitions)
        /dev/vdb   a small raw disk the guest writes its results to (a tar stream)
        9p "src"   this checkout, read-only, at /mnt/src
        9p "run"   this run's directory, read-only, at /mnt/run (the .deb under test)
        ttyS0      the serial console, written to console.log

The image (DESIGN.md section 4) is debootstrapped with Debian's stock kernel, systemd as
PID 1, docker.io, the package's dependencies and everything the guest checks use, since
the guest has no network. It is cached under /var/cache/macvlan-router-tests/, keyed by
IMAGE_RECIPE, the package list and the files and units it adds, like tests/e2e's rootfs.
A unit in the image, mvr-vm.service, runs tests/vm/guest/runner.py at every boot: it
installs the .deb and runs the checks (phase boot1), reboots, runs them again (phase
boot2), writes the results to /dev/vdb and powers off. Every wait is bounded.
"""

import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

VM_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(VM_DIR.parent / "e2e"))
import e2e_host as e2e  # noqa: E402  (build_deb, run, debian_env, the mirror and the cache)
import lab  # noqa: E402  (tests/lab.py: process and tree helpers)

SUITE = "trixie"
# Bump when anything _prepare_image does changes (the package list is part of the key).
IMAGE_RECIPE = "3"
IMAGE_PACKAGES = (
    "linux-image-amd64", "initramfs-tools", "systemd", "systemd-sysv", "udev", "kmod",
    "apparmor", "dbus", "python3", "python3-docker", "python3-pyroute2", "python3-systemd",
    "docker.io", "docker-cli", "busybox-static", "iproute2", "procps", "tar",
    # check_podman.py: rootful Podman 5 with netavark, as a user installs it.
    "podman", "netavark", "aardvark-dns", "crun",
    # check_nm.py: NetworkManager beside systemd-networkd.
    "network-manager",
)
IMAGE_SIZE = "4G"
STALE_AFTER = 86400       # seconds an image of another recipe is kept after its last use
RESULTS_SIZE = 64 << 20
# The parent the image's systemd-networkd manages (tests/vm/guest/check_macvlan.py uses it):
# a dummy link, since the guest has no network card; macvlan children in bridge mode reach
# each other on any parent.
NETWORKD_PARENT = "vmlan0"
# The one link NetworkManager may manage (tests/vm/guest/check_nm.py makes it, and its
# profile): every other link stays networkd's or nobody's. The package's shims (mvr-*) are
# left out of the rule on purpose: that NM leaves them alone must come from the package's
# own NM drop-in, or the check that says so could not fail.
NM_PARENT = "nmp0"
# {path in the image: text}
IMAGE_FILES = {
    "etc/systemd/network/20-vmlan0.netdev": f"[NetDev]\nName={NETWORKD_PARENT}\nKind=dummy\n",
    "etc/systemd/network/20-vmlan0.network": (
        f"[Match]\nName={NETWORKD_PARENT}\n\n[Network]\n"
        "Address=198.51.100.2/26\nAddress=2001:db8:a::2/64\nLinkLocalAddressing=no\n"),
    # After NM's own 85-nm-unmanaged.rules, which leaves veth links (NM_PARENT is one) alone.
    "etc/udev/rules.d/90-mvr-vm-nm.rules": (
        'SUBSYSTEM!="net", GOTO="mvr_vm_nm_end"\n'
        f'KERNEL=="{NM_PARENT}", ENV{{NM_UNMANAGED}}="0", GOTO="mvr_vm_nm_end"\n'
        'KERNEL!="mvr-*", ENV{NM_UNMANAGED}="1"\n'
        'LABEL="mvr_vm_nm_end"\n'),
    # No "Wired connection 1" on the NM parent: only the check's own profile.
    "etc/NetworkManager/conf.d/90-mvr-vm.conf": "[main]\nno-auto-default=*\n",
}
RUNNER_UNIT = """\
[Unit]
Description=macvlan-router VM test: install the package, run the guest checks
# After the boot settled, so the checks see the machine as a user would.
After=multi-user.target
# Never leave the VM running: the host side bounds the whole run as well.
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStartPre=/bin/mkdir -p /mnt/src /mnt/run
ExecStartPre=/bin/mount -t 9p -o trans=virtio,version=9p2000.L,ro src /mnt/src
ExecStartPre=/bin/mount -t 9p -o trans=virtio,version=9p2000.L,ro run /mnt/run
ExecStart=/usr/bin/python3 /mnt/src/tests/vm/guest/runner.py
# The runner names the next step (reboot after boot1, poweroff after boot2) and exits: a
# oneshot still running when the reboot stops it counts as failed (SIGTERM is clean only
# for daemons), and FailureAction= would turn the reboot into a poweroff.
ExecStopPost=/bin/sh -c 'systemctl --no-block "$(cat /run/mvr-vm-next || echo poweroff)"'
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=1800

[Install]
WantedBy=multi-user.target
"""
# Nothing to log in on; nothing periodic that could run during a check.
MASKED = ("getty.target", "serial-getty@ttyS0.service", "apt-daily.timer",
          "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer", "man-db.timer",
          "dpkg-db-backup.timer", "systemd-timesyncd.service")
ENABLED = {  # unit -> the target that wants it
    "mvr-vm.service": "multi-user.target",
    "systemd-networkd.service": "multi-user.target",
    "systemd-networkd-wait-online.service": "network-online.target",
    # As Debian's network-manager enables them.
    "NetworkManager.service": "multi-user.target",
    "NetworkManager-wait-online.service": "network-online.target",
}
KERNEL_ARGS = "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=1"


class VMError(Exception):
    """The VM could not be built or booted (not a failure of the package)."""


def image_key():
    text = " ".join((SUITE, IMAGE_RECIPE, RUNNER_UNIT, KERNEL_ARGS, *IMAGE_PACKAGES, *MASKED,
                     *sorted(f"{k}={v}" for k, v in (*ENABLED.items(), *IMAGE_FILES.items()))))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def missing_host_tools():
    need = ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debootstrap", "tar")
    return [t for t in need if not shutil.which(t, path=e2e.DEBIAN_PATH)]


def host_packages():
    lines = (VM_DIR / "apt-packages").read_text().splitlines()
    return [p.strip() for p in lines if p.strip() and not p.startswith("#")]


def install_host_tools():
    """apt-get install tests/vm/apt-packages when a tool is missing (run-all did not)."""
    if not missing_host_tools():
        return
    env = e2e.debian_env(DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-y", "-q", "-o", "Acquire::Retries=5", "--no-install-recommends"]
    with e2e.no_service_starts():
        if e2e.run(apt + ["install", *host_packages()], check=False, timeout=900,
                   env=env).returncode != 0:
            e2e.run(["apt-get", "-q", "-o", "Acquire::Retries=5", "update"], timeout=600,
                    env=env)
            e2e.run(apt + ["install", *host_packages()], timeout=900, env=env)
    if missing_host_tools():
        raise VMError(f"still missing after apt-get install: {missing_host_tools()}")


# --------------------------------------------------------------------------- the image

def cached_image(log=print):
    """(image directory, whether it was cached): vmlinuz, initrd.img and root.raw."""
    e2e.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    dest = e2e.CACHE_DIR / f"vm-{SUITE}-{image_key()}"
    if (dest / "root.raw").is_file():
        os.utime(dest)              # last used: other checkouts' images age from there
        return dest, True
    for stale in e2e.CACHE_DIR.glob(f"vm-{SUITE}-*"):
        m = re.search(r"\.(\d+)\.tmp$", stale.name)
        if m:
            gone = not lab.pid_alive(int(m.group(1)))
        else:
            # Another recipe's image may serve another checkout on this machine right now.
            gone = time.time() - stale.stat().st_mtime > STALE_AFTER
        if gone:
            lab.remove_tree(stale)
    work = e2e.CACHE_DIR / f"build-{os.getpid()}"
    tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
    mirror = e2e.debian_mirror()
    last = None
    try:
        for attempt in range(1, 4):
            lab.remove_tree(work)
            log(f"vm: debootstrap {SUITE} from {mirror} (attempt {attempt})")
            p = e2e.run(["debootstrap", "--variant=minbase",
                         f"--include={','.join(IMAGE_PACKAGES)}", SUITE, work, mirror],
                        check=False, timeout=1800, env=e2e.debian_env())
            if p.returncode == 0:
                break
            last = p.stdout[-2000:] + p.stderr[-2000:]
            time.sleep(5 * attempt)
        else:
            raise VMError(f"debootstrap {SUITE} failed three times:\n{last}")
        _prepare_image(work)
        tmp.mkdir()
        boot = work / "boot"
        shutil.copy(next(boot.glob("vmlinuz-*")), tmp / "vmlinuz")
        shutil.copy(next(boot.glob("initrd.img-*")), tmp / "initrd.img")
        e2e.run(["mkfs.ext4", "-q", "-L", "mvr-vm", "-d", work, tmp / "root.raw", IMAGE_SIZE],
                timeout=900)
        tmp.rename(dest)
    finally:
        lab.remove_tree(work)
        lab.remove_tree(tmp)
    return dest, False


def _prepare_image(root):
    root = Path(root)
    (root / "etc/hostname").write_text("mvr-vm\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost mvr-vm\n::1 localhost\n")
    # A fixed machine id: the shim's MAC is derived from it, and must survive the reboot.
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    units = root / "etc/systemd/system"
    (units / "mvr-vm.service").write_text(RUNNER_UNIT)
    for unit in MASKED:
        link = units / unit
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")
    for unit, target in ENABLED.items():
        wants = units / f"{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        src = next((p for p in (units / unit, root / "usr/lib/systemd/system" / unit,
                                root / "lib/systemd/system" / unit) if p.exists()), None)
        if src is None:
            raise VMError(f"unit {unit} is missing from the image")
        with contextlib.suppress(FileNotFoundError):
            (wants / unit).unlink()
        (wants / unit).symlink_to("/" + str(src.relative_to(root)))
    for path, text in IMAGE_FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    # The package is installed offline from a file: no lists, no recommends.
    (root / "etc/apt/apt.conf.d/99vm").write_text(
        'APT::Install-Recommends "false";\nAcquire::Languages "none";\n')
    e2e.run(["chroot", root, "apt-get", "clean"], check=False, env=e2e.debian_env())
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- one run

def sweep_stale():
    """Run directories (and their QEMU) of runs whose pytest process is gone."""
    for d in Path("/tmp").glob("mvr-vm-*"):
        m = re.fullmatch(r"mvr-vm-(\d+)", d.name)
        if m and not lab.pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError, ValueError):
                pid = int((d / "qemu.pid").read_text())
                if "qemu" in Path(f"/proc/{pid}/comm").read_text():
                    os.kill(pid, 9)
            lab.remove_tree(d)


class VM:
    """One boot-to-poweroff run of the image with the .deb under test."""

    def __init__(self, image_dir, deb, workdir):
        self.image_dir = Path(image_dir)
        self.deb = Path(deb)
        self.dir = Path(workdir)
        self.console = self.dir / "console.log"
        self.results = self.dir / "results.raw"

    def qemu_command(self):
        overlay = self.dir / "overlay.qcow2"
        return [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-m", "2048", "-smp", "2", "-no-user-config", "-nodefaults",
            "-display", "none", "-monitor", "none", "-nic", "none",
            "-serial", f"file:{self.console}", "-pidfile", self.dir / "qemu.pid",
            "-device", "virtio-rng-pci",
            "-kernel", self.image_dir / "vmlinuz", "-initrd", self.image_dir / "initrd.img",
            "-append", KERNEL_ARGS,
            "-drive", f"file={overlay},format=qcow2,if=virtio,cache=unsafe",
            "-drive", f"file={self.results},format=raw,if=virtio,cache=writeback",
            "-virtfs", f"local,path={e2e.REPO_ROOT},mount_tag=src,security_model=none,"
                       "readonly=on",
            "-virtfs", f"local,path={self.dir / 'run'},mount_tag=run,security_model=none,"
                       "readonly=on",
        ]

    def prepare(self):
        self.dir.mkdir(mode=0o700)
        (self.dir / "run").mkdir()
        shutil.copy(self.deb, self.dir / "run" / "macvlan-router.deb")
        e2e.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                 "-b", self.image_dir / "root.raw", self.dir / "overlay.qcow2"])
        with open(self.results, "wb") as f:
            f.truncate(RESULTS_SIZE)

    def boot_until_poweroff(self, timeout):
        """Run QEMU until the guest powers off; kill it after `timeout` seconds."""
        with open(self.dir / "qemu.log", "w") as qlog:
            proc = subprocess.Popen([str(c) for c in self.qemu_command()],
                                    stdin=subprocess.DEVNULL, stdout=qlog,
                                    stderr=subprocess.STDOUT, env=e2e.debian_env(),
                                    start_new_session=True)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
                raise VMError(f"the VM did not power off within {timeout}s; console tail:\n"
                              f"{self.console_tail()}") from None

    def console_tail(self, chars=6000):
        with contextlib.suppress(OSError):
            return self.console.read_text(errors="replace")[-chars:]
        return ""

    def read_results(self):
        """{relative path: text} of what the guest wrote to /dev/vdb."""
        out = {}
        try:
            with tarfile.open(self.results, "r:") as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        out[member.name] = tar.extractfile(member).read().decode(
                            errors="replace")
        except tarfile.ReadError:
            return {}
        return out


@contextlib.contextmanager
def vm_run(deb, log=print):
    """Build or reuse the image, boot it with `deb`, yield the VM after it powered off."""
    sweep_stale()
    t = time.monotonic()
    image_dir, cached = cached_image(log=log)
    log(f"vm: image {image_dir.name} {'cached' if cached else 'built'} "
        f"in {time.monotonic() - t:.1f}s")
    vm = VM(image_dir, deb, Path("/tmp") / f"mvr-vm-{os.getpid()}")
    try:
        vm.prepare()
        yield vm
    finally:
        lab.remove_tree(vm.dir)


def parse_lines(text):
    """The guest checks' "ok NAME detail" / "FAIL NAME detail" lines."""
    return [line for line in text.splitlines() if re.match(r"(ok|FAIL) \S", line)]


def results_text(files):
    """All results as one readable text, file by file (for failure messages)."""
    buf = io.StringIO()
    for name in sorted(files):
        buf.write(f"--- {name}\n{files[name].rstrip()}\n")
    return buf.getvalue()
