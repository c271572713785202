"""Run one command as root inside a throw-away qemu VM that boots Debian's stock kernel.

This machine's kernel has no IPVS; Debian's `linux-image-amd64` has it (and every netfilter
piece) as modules. The guest sees the host's whole filesystem read-only over 9p with a RAM
overlay on top (writes succeed and vanish), so the project's .venv, ipvsadm, ipset, iptables, nft
and ip run unchanged inside. The guest has no network device: only the namespaces a test makes.

    kpx vm -- CMD [ARGS...]        # or: python -m kpx.vm CMD [ARGS...]

The command's output streams to our stdout; its exit status becomes ours. 124 = timeout,
125 = the VM itself failed (no kernel, no busybox, boot failure). Whatever happens — timeout,
Ctrl-C, SIGKILL of the caller — no qemu is left behind (PR_SET_PDEATHSIG + kill on exit).

Settings (environment): KPX_VM_TIMEOUT (s, 1800), KPX_VM_MEM (768M), KPX_VM_KVER (newest in
/boot), KPX_VM_CACHE (/var/cache/kpx/vm), KPX_VM_CONSOLE=1 (print the kernel log at the end).
"""

from __future__ import annotations

import ctypes
import glob
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125

# Loaded in the guest before the command runs (on-demand loading works too; preloading makes
# the first packet of a test not pay for modprobe under emulation). Missing ones are ignored.
GUEST_MODULES = (
    "ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_sed ip_vs_nq ip_vs_dh ip_vs_mh "
    "nf_conntrack nf_conntrack_netlink nf_nat nf_defrag_ipv4 dummy veth bridge br_netfilter "
    "ip_set ip_set_hash_ip ip_set_hash_ipport ip_set_hash_ipportip ip_set_hash_ipportnet "
    "ip_set_hash_net ip_set_bitmap_port xt_set iptable_nat iptable_filter iptable_mangle "
    "ip6table_nat ip6table_filter nf_tables nft_compat nft_chain_nat nft_ct nft_nat nft_numgen "
    "nft_reject_inet nft_masq xt_MASQUERADE xt_conntrack xt_ipvs xt_mark xt_comment xt_addrtype "
    "xt_statistic xt_recent xt_nat xt_tcpudp xt_multiport xt_physdev xt_REJECT nf_reject_ipv4"
).split()

INIT = r"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null || echo "kpx-vm: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /mnt/lower \
  || { echo "kpx-vm: 9p mount of the host root failed"; echo o > /proc/sysrq-trigger; }
mount -t tmpfs -o mode=755 rw /mnt/rw; mkdir /mnt/rw/u /mnt/rw/w
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/u,workdir=/mnt/rw/w overlay /newroot
mkdir -p /newroot/.kpxvm; cp /bin/busybox /stage2 /newroot/.kpxvm/
for d in proc sys dev; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /.kpxvm/busybox sh /.kpxvm/stage2
"""
# switch_root (not chroot) so that the kernel's module helper (/sbin/modprobe, run in PID 1's
# root) finds the host's modprobe and /lib/modules.

STAGE2 = r"""B=/.kpxvm/busybox
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
$B mount -t tmpfs shm /dev/shm
$B mount -t tmpfs -o mode=755 run /run; $B mkdir -p /run/netns /run/lock
$B mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
$B hostname kpx-vm; $B ip link set lo up
RUN=$($B sed -n 's/.*kpxvm.run=\([^ ]*\).*/\1/p' /proc/cmdline)
/sbin/modprobe -a -q $($B cat "$RUN/modules") 2>/dev/null
echo "kpx-vm: ready at uptime $($B cut -d' ' -f1 /proc/uptime)s" > /dev/console
$B stty -F /dev/ttyS1 raw -echo 115200
$B stty -F /dev/ttyS2 raw -echo 115200
/bin/bash "$RUN/cmd.sh" </dev/null >/dev/ttyS1 2>&1
rc=$?
echo "kpx-vm: command done at uptime $($B cut -d' ' -f1 /proc/uptime)s rc=$rc" > /dev/console
echo "$rc" > /dev/ttyS2
$B sync
$B poweroff -f
"""

# Environment variables that belong to this host session, not to the guest command.
_SKIP_ENV = {"PWD", "OLDPWD", "SHLVL", "_", "HOSTNAME", "TERM", "TMPDIR"}


class VMError(Exception):
    """The VM could not be prepared or booted (exit 125)."""


@dataclass(frozen=True)
class VMSettings:
    timeout: float = float(os.environ.get("KPX_VM_TIMEOUT", "1800"))
    memory: str = os.environ.get("KPX_VM_MEM", "768M")
    kver: str = os.environ.get("KPX_VM_KVER", "")
    cache: Path = Path(os.environ.get("KPX_VM_CACHE", "/var/cache/kpx/vm"))
    console: bool = os.environ.get("KPX_VM_CONSOLE", "") == "1"


def newest_kernel() -> str:
    vers = [p.removeprefix("/boot/vmlinuz-") for p in glob.glob("/boot/vmlinuz-*")]
    vers = [v for v in vers if os.path.isdir(f"/lib/modules/{v}")]
    if not vers:
        raise VMError("no Debian kernel in /boot with modules in /lib/modules: apt-get install linux-image-amd64")

    def key(v: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", v)]

    return max(vers, key=key)


def _vmlinux(kver: str, cache: Path) -> Path:
    """The uncompressed ELF kernel (qemu boots it via PVH, skipping seconds of XZ under TCG)."""
    out = cache / f"vmlinux-{kver}"
    if out.exists() and out.stat().st_size > 0:
        return out
    data = Path(f"/boot/vmlinuz-{kver}").read_bytes()
    off = data.find(b"\xfd7zXZ\x00")
    if off < 0:
        return Path(f"/boot/vmlinuz-{kver}")  # not XZ-compressed: boot the bzImage as is
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        elf = dec.decompress(data[off:])
    except lzma.LZMAError:
        return Path(f"/boot/vmlinuz-{kver}")
    if not elf.startswith(b"\x7fELF"):
        return Path(f"/boot/vmlinuz-{kver}")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    tmp.replace(out)
    return out


def _busybox() -> str:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(cand):
            r = subprocess.run([cand, "--list"], capture_output=True, text=True)
            if "switch_root" in r.stdout.split():
                return cand
    raise VMError("need a static busybox with switch_root: apt-get install busybox-static")


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data); directories and symlinks by mode."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nm = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nm), 0)
        )
        out += hdr.encode() + nm
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _initramfs(kver: str, cache: Path) -> Path:
    busybox = _busybox()
    key = hashlib.sha256((INIT + STAGE2 + kver + busybox).encode()).hexdigest()[:16]
    out = cache / f"initramfs-{kver}-{key}.cpio.gz"
    if out.exists():
        return out
    deps = subprocess.run(
        ["modprobe", "-S", kver, "-a", "--show-depends", "virtio_pci", "9pnet_virtio", "9p", "overlay"],
        capture_output=True, text=True,
    )
    if deps.returncode != 0:
        raise VMError(f"cannot resolve the guest's boot modules for {kver}: {deps.stderr.strip()} (apt-get install kmod)")
    kos: list[str] = []
    for line in deps.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "insmod" and parts[1] not in kos:
            kos.append(parts[1])
    d, f, link = 0o040755, 0o100755, 0o120777
    entries: list[tuple[str, int, bytes]] = [
        (n, d, b"") for n in ("bin", "dev", "proc", "sys", "mnt", "mnt/lower", "mnt/rw", "newroot", "mods")
    ]
    entries.append(("bin/busybox", f, Path(busybox).read_bytes()))
    entries += [(f"bin/{a}", link, b"busybox") for a in ("sh", "mount", "mkdir", "insmod", "cp", "switch_root", "cat", "echo")]
    order = []
    for ko in kos:
        base = os.path.basename(ko)
        raw = Path(ko).read_bytes()
        if base.endswith(".xz"):
            raw, base = lzma.decompress(raw), base[:-3]
        elif base.endswith(".zst"):
            raise VMError(f"zstd-compressed module {ko}: not supported by this harness")
        entries.append((f"mods/{base}", 0o100644, raw))
        order.append(base)
    entries.append(("mods/order", 0o100644, ("\n".join(order) + "\n").encode()))
    entries.append(("init", f, INIT.encode()))
    entries.append(("stage2", f, STAGE2.encode()))
    for old in cache.glob(f"initramfs-{kver}-*.cpio.gz"):
        old.unlink()
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=1))
    tmp.replace(out)
    return out


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: qemu dies with us, even on SIGKILL
    os.setsid()


def _command_script(argv: list[str]) -> str:
    lines = []
    for k, v in os.environ.items():
        if k in _SKIP_ENV or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            continue
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append("export KPX_IN_VM=1")
    if not sys.stdout.isatty():  # the guest's output port is a tty; don't colour a log file
        lines.append("export PY_COLORS=0 NO_COLOR=1")
    lines.append(f"cd {shlex.quote(os.getcwd())} 2>/dev/null || cd /")
    if len(argv) == 1:
        lines.append(argv[0])
    else:
        lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def run(argv: list[str], settings: VMSettings | None = None) -> int:
    """Boot the VM, run argv (one string = a shell command line) as root, return its exit status."""
    s = settings or VMSettings()
    if not argv:
        raise VMError("nothing to run")
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise VMError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    s.cache.mkdir(parents=True, exist_ok=True)
    kver = s.kver or newest_kernel()
    kernel = _vmlinux(kver, s.cache)
    initrd = _initramfs(kver, s.cache)
    rundir = Path(tempfile.mkdtemp(prefix="run.", dir=s.cache))
    proc: subprocess.Popen[bytes] | None = None
    try:
        (rundir / "modules").write_text(" ".join(GUEST_MODULES) + "\n")
        (rundir / "cmd.sh").write_text(_command_script(argv))
        (rundir / "rc").write_text("")
        append = f"console=ttyS0 loglevel=4 panic=-1 mitigations=off kpxvm.run={rundir}"
        cmd = [
            qemu, "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-no-reboot",
            "-machine", "pc", "-accel", "tcg,tb-size=256", "-cpu", "max", "-smp", "1", "-m", s.memory,
            "-nic", "none", "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
            "-chardev", f"file,id=con,path={rundir}/console.log", "-serial", "chardev:con",
            "-chardev", "stdio,id=out,signal=off", "-serial", "chardev:out",
            "-chardev", f"file,id=rc,path={rundir}/rc", "-serial", "chardev:rc",
        ]  # fmt: skip
        sys.stdout.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_set_pdeathsig)
        deadline = time.monotonic() + s.timeout
        timed_out = False
        while proc.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
        text = (rundir / "rc").read_text(errors="replace")
        digits = re.sub(r"\D", "", text)
        if digits:
            rc = int(digits)
        elif timed_out:
            sys.stderr.write(f"kpx vm: timeout after {s.timeout:.0f}s\n")
            rc = EXIT_TIMEOUT
        else:
            sys.stderr.write(f"kpx vm: the VM ended without a result (qemu exit {proc.returncode})\n")
            _tail_console(rundir, 40)
            rc = EXIT_VM_FAILED
        if s.console:
            _tail_console(rundir, 10**6)
        return rc
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)


def _tail_console(rundir: Path, n: int) -> None:
    log = rundir / "console.log"
    if log.exists():
        lines = log.read_text(errors="replace").splitlines()[-n:]
        sys.stderr.write("\n".join(lines) + "\n")


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser(
        "vm", help="run one command as root in a qemu VM booting Debian's kernel (IPVS etc.)",
        description="Run one command as root in a throw-away qemu VM that boots Debian's stock kernel "
        "with the host filesystem shared read-only. Example: kpx vm -- ipvsadm -Ln",
    )
    p.add_argument("argv", nargs="+", metavar="CMD", help="command (one argument = a shell command line)")
    p.set_defaults(func=lambda a: main(a.argv))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.stderr.write("usage: kpx vm -- CMD [ARGS...]\n")
        return 2
    try:
        return run(args)
    except VMError as e:
        sys.stderr.write(f"kpx vm: {e}\n")
        return EXIT_VM_FAILED


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
