#!/usr/bin/env python3
"""Conformance run: libvirt's x86 QEMU test corpus through qemud and real QEMU.

For every ``*.xml`` of the corpus (libvirt 9.0's qemuxml2argv inputs, see its README.md) this

1. applies the rewrite libvirt's own measurement (``libvirt-realized.json``) used, so both see
   the same host: domain type kvm -> qemu, a host-passthrough/host-model ``<cpu>`` dropped, a
   missing or absent emulator -> /usr/bin/qemu-system-x86_64, file and block disk sources -> fresh
   1 MiB scratch images of the same format (block disks become file images; a format QEMU
   removed, 'cow', a raw image), kernel/initrd -> the
   tiny test guest's, pflash loaders -> OVMF_CODE_4M.fd with the OVMF_VARS_4M.fd template (NVRAM
   into scratch), non-user interfaces -> type='user' keeping MAC and model (and other guest-side
   settings; the host side -- source, target, script, virtualport, backend -- is dropped;
   vhostuser, hostdev and vdpa interfaces stay as they are, as they did for libvirt),
   char-device, VNC/SPICE-socket and filesystem paths -> a scratch folder, files handed to the
   guest (ACPI tables, fw_cfg blobs) -> scratch files, <blkiotune> devices -> the block device
   holding the scratch folder, NBD disks -> scratch images exported by a local
   qemu-storage-daemon (TCP on 127.0.0.1, with TLS from a scratch CA where the disk asks for
   it, or a unix socket).  A unix char device that
   connects (mode='connect', or no mode) finds a listening socket at its scratch path: libvirt
   realized such inputs (serial-unix-chardev, channel-unix-guestfwd, ...), so the measurement's
   had a peer too; so does a TCP char device connecting to a local address, a pipe char device
   finds its two FIFOs, and a host serial port (type='dev') is a pseudo-terminal;
2. parses it (``parse_domain``), translates it (``build_argv(paused=True)``) with a per-file
   runtime directory under a short scratch path, and
3. starts it in QEMU and checks it over QMP (``tests/support/realize.py``).

Each input ends up as one of

* ``realized``: QEMU started and every check passed;
* ``rejected``: qemud said no with a DomainError (or a HostError), or QEMU refused to start;
* ``mismatch``: QEMU started but a check failed;
* ``crashed``: any other exception in qemud (a traceback), or a hang / timeout.

Every input runs in a forked child of its own (its own process group, with its QEMU), bounded by
a timeout; the parent kills the whole group when it runs over.

Usage (from the repository root)::

    .venv/bin/python tools/conformance.py [--corpus DIR] [--jobs N] [--only GLOB] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import glob
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qemud.argv import build_argv, element_of_qemu_error, emulator_for  # noqa: E402
from qemud.caps import probe  # noqa: E402
from qemud.domain import parse_domain  # noqa: E402
from qemud.errors import DomainError, QemudError  # noqa: E402
from qemud.launch import prepare  # noqa: E402
from qemud.paths import GuestPaths  # noqa: E402
from tests.support.realize import first_error_line, realize_sync  # noqa: E402
from tests.support.tinyguest import ensure_guest  # noqa: E402
from tests.support.vhost_user_stub import VhostUserStub  # noqa: E402

DEFAULT_EMULATOR = "/usr/bin/qemu-system-x86_64"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
SCRATCH_BASE = "/tmp/qc"
OUTCOMES = ("realized", "rejected", "mismatch", "crashed")
#: qemu-img can make an empty image in these formats; anything else becomes a raw image.
#: image formats QEMU 7.2 cannot open at all (removed): their scratch stand-in is raw
GONE_FORMATS = {"cow"}
CREATABLE = {"qcow2", "qed", "vmdk", "vdi", "vpc", "vhdx", "qcow", "parallels"}
CHARDEV_TAGS = ("serial", "parallel", "console", "channel", "smartcard", "redirdev")
#: interface types that stay as they are (they have no user-mode equivalent to become)
KEEP_IFACE = {"user", "vhostuser", "hostdev", "vdpa"}
#: interface children that only make sense for the host side of the old type
HOST_SIDE_IFACE = {"source", "target", "script", "downscript", "virtualport", "backenddomain", "backend"}


# ---- the rewrite -------------------------------------------------------------------------------

@dataclass
class Guest:
    kernel: str
    initrd: str


def make_x509_dir(d: Path, names: tuple[str, ...] = ()) -> str:
    """A scratch CA and a server certificate signed by it: ca-cert.pem, server-cert.pem,
    server-key.pem (the files QEMU's x509-dir and tls-creds-x509 read), and a client certificate
    (client-cert.pem, client-key.pem) for QEMU as a TLS client; the server's names are
    localhost, 127.0.0.1 and ``names``."""
    d.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, cwd=d, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=qemud test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1"
                                  + "".join(f",DNS:{n}" for n in names) + "\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "server.ext")
    ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "client-key.pem", "-out", "client.csr", "-subj", "/CN=qemud test client")
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=clientAuth\n")
    ssl("x509", "-req", "-in", "client.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "client-cert.pem", "-days", "2", "-extfile", "client.ext")
    return str(d)


def _acpi_table(sig: bytes, body: bytes = b"qemud conformance scratch table") -> bytes:
    """A well-formed ACPI table (36-byte header, length, checksum) with ``body``."""
    import struct
    length = 36 + len(body)
    head = struct.pack("<4sIBB6s8sI4sI", sig, length, 1, 0, b"QEMUD ", b"SCRATCH ", 1, b"QEMD", 1)
    table = bytearray(head + body)
    table[9] = (-sum(table)) & 0xFF
    return bytes(table)


def scratch_block_device(folder: Path) -> str | None:
    """The /dev node of the block device holding ``folder`` (None on tmpfs, overlays...)."""
    st = os.stat(folder)
    node = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        name = os.path.basename(os.path.realpath(node))
    except OSError:
        return None
    return f"/dev/{name}" if os.path.exists(node) and os.path.exists(f"/dev/{name}") else None


class Rewriter:
    """The measurement's rewrite of one domain XML text, with a scratch folder for its files."""

    def __init__(self, scratch: Path, guest: Guest) -> None:
        self.scratch = scratch
        self.guest = guest
        self.n = 0
        self.paths: dict[tuple[str, str], str] = {}  # (kind, original) -> scratch path
        self.notes: list[str] = []
        #: scratch paths of unix sockets the domain connects to (mode='connect'): listened on
        self.peers: list[str] = []
        #: local (host, port)s a TCP chardev connects to: listened on
        self.tcp_peers: list[tuple[str, int]] = []
        #: pseudo-terminals standing in for host serial ports (master fds, kept open meanwhile)
        self.ptys: list[int] = []
        #: qemud.conf TLS settings the input needs (service -> scratch x509 dir)
        self.tls: dict[str, str] = {}
        #: vhost-user sockets (path, QEMU's mode) a stub backend must serve
        self.vhost_users: list[tuple[str, str]] = []
        #: NBD exports the domain's network disks read: (export name, image) served by a local
        #: qemu-storage-daemon on ``nbd_ports`` (TCP; with TLS on its own port) and ``nbd_socket`` (unix)
        self.nbd_exports: dict[tuple[str, str], str] = {}  # (inet|unix, export) -> image
        self.nbd_ports: dict[str, int] = {}  # inet|tls -> its TCP port
        self.nbd_tls_dir: str | None = None  # the x509 dir of the TLS server and of QEMU
        self.nbd_socket = str(scratch / "nbd.sock")
        #: (socket, directory) of virtiofs shares served by a virtiofsd the domain does not run
        self.virtiofs_peers: list[tuple[str, str]] = []
        #: (socket, state directory) of external TPMs: an swtpm the domain does not run
        self.swtpm_peers: list[tuple[str, str]] = []

    def _new(self, kind: str, original: str, name: str) -> tuple[str, bool]:
        """A scratch path for ``original`` (the same one each time it is named); new?"""
        key = (kind, original)
        if key in self.paths:
            return self.paths[key], False
        self.n += 1
        p = str(self.scratch / f"{name}{self.n}")
        self.paths[key] = p
        return p, True

    def image(self, fmt: str) -> str:
        """A fresh 1 MiB image for one disk (never shared: two disks naming the same file
        would fight over QEMU's image lock, and the measurement gave each disk its own)."""
        self.n += 1
        p = str(self.scratch / f"s{self.n}.img")
        if fmt in CREATABLE:
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, p, "1M"], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            with open(p, "wb") as f:
                f.truncate(1024 * 1024)
        return p

    # ---- secrets and encrypted images (qemud.secrets) ----------------------------------------

    #: the value of every secret the rewrite provides: base64 text, as one usage name may serve
    #: both a passphrase and a Ceph key (which QEMU reads as base64)
    SECRET = "cWVtdWQtY29uZm9ybWFuY2Utc2VjcmV0"

    @property
    def secrets_dir(self) -> Path:
        return self.scratch / "secrets"

    def _secrets(self, root: ET.Element) -> None:
        """A file holding SECRET for every <secret uuid|usage> the domain names, in a secrets
        directory of the scratch folder (the translation is pointed at it)."""
        from qemud.secrets import secret_file_name
        refs = [(sec.get("uuid"), sec.get("usage")) for sec in root.iter("secret")]
        # a TPM's <encryption secret='UUID'> names its secret by an attribute
        refs += [(e.get("secret"), None) for e in root.findall("devices/tpm/backend/encryption")]
        for uuid, usage in refs:
            name = secret_file_name(uuid, usage)
            if not name:
                continue
            self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
            f = self.secrets_dir / name
            if not f.exists():
                value = self.SECRET
                fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(value)

    @staticmethod
    def _luks(disk: ET.Element) -> ET.Element | None:
        """The disk's LUKS <encryption> (on the disk or in its source), if any."""
        for enc in (disk.find("encryption"), disk.find("source/encryption")):
            if enc is not None and enc.get("format") == "luks":
                return enc
        return None

    def luks_image(self, fmt: str) -> str:
        """A fresh 1 MiB LUKS image (raw driver: a LUKS container; qcow2: qcow2 with LUKS
        encryption) opened by SECRET: a copy of a template made once per host (qemu-img spends
        seconds calibrating LUKS key derivation)."""
        kind = "qcow2" if fmt == "qcow2" else "luks"
        template = Path(SCRATCH_BASE) / f"luks-template-{self.SECRET[:8]}.{kind}"
        if not template.exists():
            sec = Path(SCRATCH_BASE) / f".luks-secret{os.getpid()}"
            tmp = Path(SCRATCH_BASE) / f".luks-template{os.getpid()}.{kind}"
            sec.write_text(self.SECRET)
            opts = ("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100" if kind == "qcow2"
                    else "key-secret=sec0,iter-time=100")
            try:
                # qemu-img's PBKDF calibration fails now and then on a loaded host ("Unable to
                # get accurate CPU usage"): try again
                for attempt in range(5):
                    r = subprocess.run(["qemu-img", "create", "-q", "--object", f"secret,id=sec0,file={sec}",
                                        "-f", kind, "-o", opts, str(tmp), "1M"], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    if r.returncode == 0:
                        break
                else:
                    raise RuntimeError(f"qemu-img cannot make a LUKS image: {r.stderr.strip()}")
                os.replace(tmp, template)
            finally:
                sec.unlink(missing_ok=True)
        self.n += 1
        p = str(self.scratch / f"s{self.n}.img")
        shutil.copyfile(template, p)
        return p

    def run(self, text: str) -> str:
        for prefix, uri in _namespaces(text):
            if prefix and not re.fullmatch(r"ns\d+", prefix):
                ET.register_namespace(prefix, uri)
        root = ET.fromstring(text)
        if root.tag != "domain":
            return text
        if root.get("type") == "kvm":
            root.set("type", "qemu")
        cpu = root.find("cpu")
        if cpu is not None and cpu.get("mode") in ("host-passthrough", "host-model"):
            root.remove(cpu)
        self._os(root)
        self.tls = self.tls_dirs(root)
        self._secrets(root)
        self._blkiotune(root)
        self._host_files(root)
        self._nbd(root)
        devices = root.find("devices")
        if devices is None:
            devices = ET.SubElement(root, "devices")
        emu = devices.find("emulator")
        if emu is None:
            emu = ET.Element("emulator")
            devices.insert(0, emu)
            emu.text = DEFAULT_EMULATOR
        elif not (emu.text and os.access(emu.text.strip(), os.X_OK)):
            self.notes.append(f"emulator {emu.text!r} does not exist here")
            emu.text = DEFAULT_EMULATOR
        for disk in devices.findall("disk"):
            self._disk(disk)
        for iface in devices.findall("interface"):
            self._iface(iface)
            self._vhostuser(iface)
            self._passt_log(iface)
        for tag in CHARDEV_TAGS:
            for dev in devices.findall(tag):
                self._chardev(dev, tag)
        for rng in devices.findall("rng"):
            for backend in rng.findall("backend"):
                if backend.get("model") == "egd":
                    self._chardev(backend, "rng")
        for g in devices.findall("graphics"):
            kind = g.get("type", "g")
            if g.get("socket"):
                g.set("socket", self._new("sock", g.get("socket", ""), kind)[0])
            for listen in g.findall("listen"):
                if listen.get("socket"):
                    listen.set("socket", self._new("sock", listen.get("socket", ""), kind)[0])
        for fs in devices.findall("filesystem"):
            for src in fs.findall("source"):
                for a in ("dir", "file", "socket"):
                    if src.get(a):
                        p, new = self._new("fs", src.get(a, ""), "fs")
                        src.set(a, p)
                        if new and a == "dir":
                            os.makedirs(p, exist_ok=True)
            self._virtiofs_peer(fs)
        for tpm in devices.findall("tpm"):
            self._swtpm_peer(tpm)
        return ET.tostring(root, encoding="unicode")

    def tls_dirs(self, root: ET.Element) -> dict[str, str]:
        """qemud.conf TLS settings this input needs: a scratch x509 dir (CA + server cert, as
        libvirt expects in spice_tls_x509_cert_dir) when a SPICE display asks for TLS."""
        devices = root.find("devices")
        spice = [g for g in (devices.findall("graphics") if devices is not None else [])
                 if g.get("type") == "spice"]
        if not any(g.get("tlsPort") or g.get("defaultMode") == "secure"
                   or any(c.get("mode") == "secure" for c in g.findall("channel")) for g in spice):
            return {}
        return {"spice": make_x509_dir(self.scratch / "pki")}
    def _swtpm_peer(self, tpm: ET.Element) -> None:
        """A TPM backed by an swtpm its user runs (type='external'): the measurement runs one."""
        for be in tpm.findall("backend"):
            if be.get("type") != "external":
                continue
            for src in be.findall("source"):
                if src.get("path"):
                    p, new = self._new("sock", src.get("path", ""), "swtpm")
                    src.set("path", p)
                    if new:
                        os.makedirs(p + ".state", exist_ok=True)
                        self.swtpm_peers.append((p, p + ".state"))

    def _virtiofs_peer(self, fs: ET.Element) -> None:
        """A virtiofs share whose virtiofsd runs already (<source socket>): the measurement runs
        one there, serving a scratch directory, as its user would have."""
        drv = fs.find("driver")
        if drv is None or drv.get("type") != "virtiofs":
            return
        for src in fs.findall("source"):
            sock = src.get("socket")
            if sock and all(sock != s for s, _ in self.virtiofs_peers):
                d = self._new("fsdir", sock, "fsd")[0]
                os.makedirs(d, exist_ok=True)
                self.virtiofs_peers.append((sock, d))

    def _os(self, root: ET.Element) -> None:
        osel = root.find("os")
        if osel is None:
            return
        for tag, path in (("kernel", self.guest.kernel), ("initrd", self.guest.initrd)):
            el = osel.find(tag)
            if el is not None and (el.text or "").strip():
                el.text = path
        loader = osel.find("loader")
        pflash = loader is not None and loader.get("type") == "pflash"
        if loader is not None and pflash:
            if loader.get("readonly") == "no":  # QEMU writes to it: a copy of its own
                p, _ = self._new("loader", loader.text or "", "loader")
                shutil.copyfile(OVMF_CODE, p)
                loader.text = p
            elif (loader.text or "").strip():  # a loader without a path stays without one
                loader.text = OVMF_CODE
        nvram = osel.find("nvram")
        if nvram is not None:
            if (nvram.text or "").strip():
                nvram.text = self._new("nvram", nvram.text or "", "nvram")[0] + ".fd"
            for src in nvram.findall("source"):
                if src.get("file"):
                    src.set("file", self._new("nvram", src.get("file", ""), "nvram")[0] + ".fd")
            stateless = loader is not None and loader.get("stateless") == "yes"
            if nvram.get("template") or (pflash and not stateless and nvram.get("type") != "network"):
                nvram.set("template", OVMF_VARS)

    def _nbd(self, root: ET.Element) -> None:
        """NBD disks (and NBD NVRAM) name servers of libvirt's test machine: like file disks
        become scratch images, each export becomes a scratch image served by a local
        qemu-storage-daemon, and the disk points at it (TCP hosts at 127.0.0.1, unix sockets at
        its socket); the guest-side settings stay as written."""
        sources = [d.find("source") for d in root.findall("devices/disk")
                   if d.get("type") == "network" and d.find("source") is not None]
        sources += root.findall("os/nvram/source") if root.find("os/nvram[@type='network']") is not None else []
        for src in sources:
            if src is None or src.get("protocol") != "nbd":
                continue
            tls = src.get("tls") == "yes"
            if tls and self.nbd_tls_dir is None:  # a CA, the server's certificate (for the name
                # QEMU checks: tlsHostname, else the host) and QEMU's client certificate
                self.nbd_tls_dir = make_x509_dir(self.scratch / "nbd-pki", tuple(
                    n for n in (src.get("tlsHostname"),) if n))
            name = src.get("name") or ""
            nvram = src in root.findall("os/nvram/source")
            for host in src.findall("host"):
                kind = "unix" if host.get("transport") == "unix" else "tls" if tls else "inet"
                if (kind, name) not in self.nbd_exports:
                    self.nbd_exports[(kind, name)] = self.image("raw")
                    if nvram:
                        shutil.copyfile(OVMF_VARS, self.nbd_exports[(kind, name)])
                if kind == "unix":
                    host.set("socket", self.nbd_socket)
                    continue
                if kind not in self.nbd_ports:
                    with socket.socket() as probe_sock:
                        probe_sock.bind(("127.0.0.1", 0))
                        self.nbd_ports[kind] = probe_sock.getsockname()[1]
                host.set("name", "127.0.0.1")
                host.set("port", str(self.nbd_ports[kind]))
            self.notes.append(f"nbd export {name!r} -> a local qemu-storage-daemon")

    def _host_files(self, root: ET.Element) -> None:
        """Files on the test machine a domain hands to the guest (an ACPI table, a fw_cfg blob)
        become scratch files with some content, as disk images do."""
        for table in root.findall("os/acpi/table"):
            if (table.text or "").strip():
                p, new = self._new("acpi", table.text.strip(), "acpi")
                if new:
                    Path(p).write_bytes(_acpi_table(b"SLIC"))
                table.text = p
        for entry in root.findall("sysinfo/entry"):
            if entry.get("file"):
                p, new = self._new("fwcfg", entry.get("file", ""), "fwcfg")
                if new:
                    Path(p).write_text("{}\n")
                entry.set("file", p)

    def _blkiotune(self, root: ET.Element) -> None:
        """<blkiotune><device><path> names the host block devices the guest's disks live on; the
        disks became scratch images, so the tuning follows them to the block device that holds
        the scratch folder (libvirt's measurement had no cgroups and skipped the tuning)."""
        devs = root.findall("blkiotune/device/path")
        if not devs:
            return
        dev = scratch_block_device(self.scratch)
        for p in devs:
            if dev is not None:
                self.notes.append(f"blkiotune device {p.text} -> {dev}")
                p.text = dev

    def _disk(self, disk: ET.Element) -> None:
        dtype = disk.get("type", "file")
        if dtype == "dir":  # a host directory shown as a FAT disk: a scratch directory
            for src in disk.findall("source"):
                if src.get("dir"):
                    p, _ = self._new("dir", src.get("dir", ""), "d")
                    os.makedirs(p, exist_ok=True)
                    src.set("dir", p)
            return
        if dtype not in ("file", "block"):
            return
        src = disk.find("source")
        if src is None:
            return
        original = src.get("file") if dtype == "file" else src.get("dev")
        if not original:
            return
        drv = disk.find("driver")
        fmt = (drv.get("type") if drv is not None else None) or "raw"
        if fmt == "dir":  # qemud reads <driver type='dir'> as "the source is a directory"
            p, _ = self._new("dir", original, "d")
            os.makedirs(p, exist_ok=True)
        elif self._luks(disk) is not None:
            p = self.luks_image(fmt)
        else:
            p = self.image(fmt)
            if fmt in GONE_FORMATS and drv is not None:
                # the measurement's scratch images were raw or qcow2 ("of the same format" where
                # one can be made): a format no QEMU of today opens became a raw image, which is
                # how libvirt, which refuses 'cow' itself, realized the input
                drv.set("type", "raw")
                self.notes.append(f"disk format {fmt!r} (gone from QEMU) -> a raw scratch image")
        if dtype == "block":
            disk.set("type", "file")
            del src.attrib["dev"]
        src.set("file", p)

    def _iface(self, iface: ET.Element) -> None:
        if iface.get("type") in KEEP_IFACE:
            return
        iface.set("type", "user")
        for child in list(iface):
            if child.tag in HOST_SIDE_IFACE:
                iface.remove(child)

    def _passt_log(self, iface: ET.Element) -> None:
        """A passt backend's host side: its log file moves to scratch, the host interface it
        names (<source dev>, absent here) is dropped."""
        for be in iface.findall("backend"):
            if be.get("type") != "passt":
                continue
            if be.get("logFile"):
                be.set("logFile", self._new("log", be.get("logFile", ""), "passt")[0] + ".log")
            for src in iface.findall("source"):
                iface.remove(src)

    def _vhostuser(self, iface: ET.Element) -> None:
        """A vhost-user NIC's socket moves to scratch, where a stub backend serves it (QEMU does
        not start without a backend answering; libvirt's measurement had none and hung)."""
        if iface.get("type") != "vhostuser":
            return
        for src in iface.findall("source"):
            if src.get("path"):
                p = self._new("sock", src.get("path", ""), "vu")[0]
                src.set("path", p)
                self.vhost_users.append((p, src.get("mode", "")))

    def _pty(self) -> str:
        master, slave = os.openpty()
        name = os.ttyname(slave)
        os.close(slave)
        self.ptys.append(master)
        return name

    def _chardev(self, dev: ET.Element, tag: str) -> None:
        kind = dev.get("type")
        for src in dev.findall("source"):
            if src.get("path"):
                p = self._new("char", src.get("path", ""), tag)[0]
                src.set("path", p)
                # qemud connects when no mode is given, as libvirt does for a path it did not
                # generate itself
                if kind == "unix" and src.get("mode", "connect") == "connect" and p not in self.peers:
                    self.peers.append(p)
                if kind == "pipe":  # QEMU opens PATH.in and PATH.out (or PATH): two FIFOs here
                    for suffix in (".in", ".out"):
                        if not os.path.exists(p + suffix):
                            os.mkfifo(p + suffix, 0o600)
                if kind == "dev" and tag in ("serial", "console"):
                    # a host serial port: a pseudo-terminal stands in for it (a tty all the same)
                    src.set("path", self._pty())
            if kind == "tcp" and src.get("mode", "connect") == "connect" and \
                    src.get("host", "") in ("127.0.0.1", "localhost", "::1") and (src.get("service") or "").isdigit():
                # a local TCP server the guest's chardev connects to: one listens here
                self.tcp_peers.append((src.get("host", ""), int(src.get("service", "0"))))
        for log in dev.findall("log"):
            if log.get("file"):
                log.set("file", self._new("log", log.get("file", ""), "log")[0])


def _namespaces(text: str) -> list[tuple[str, str]]:
    out = []
    try:
        for _event, (prefix, uri) in ET.iterparse(io.StringIO(text), events=("start-ns",)):
            out.append((prefix, uri))
    except ET.ParseError:
        pass
    return out


def serve_nbd(rw: Rewriter) -> list[int]:
    """Start qemu-storage-daemons serving the rewrite's NBD exports: one on TCP, one on the unix
    socket (a daemon has one NBD server), each with images of its own; their pids."""
    pids = []
    for kind in ("inet", "tls", "unix"):
        exports = sorted((name, image) for (k, name), image in rw.nbd_exports.items() if k == kind)
        if not exports:
            continue
        pidfile = rw.scratch / f"qsd-{kind}.pid"
        addr = (f"addr.type=unix,addr.path={rw.nbd_socket}" if kind == "unix"
                else f"addr.type=inet,addr.host=127.0.0.1,addr.port={rw.nbd_ports[kind]}")
        argv = ["qemu-storage-daemon", "--daemonize", "--pidfile", str(pidfile)]
        if kind == "tls":
            argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={rw.nbd_tls_dir},verify-peer=on"]
            addr += ",tls-creds=tls0"
        argv += ["--nbd-server", addr]
        for i, (name, image) in enumerate(exports):
            argv += ["--blockdev", f"driver=file,node-name=f{i},filename={image}",
                     "--blockdev", f"driver=raw,node-name=n{i},file=f{i}",
                     "--export", f"type=nbd,id=e{i},node-name=n{i},name={name},writable=on"]
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
        if r.returncode != 0:
            stop_nbd(pids)
            raise RuntimeError(f"qemu-storage-daemon: {r.stderr.decode(errors='replace').strip()}")
        pids.append(int(pidfile.read_text().strip()))
    return pids


def stop_nbd(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _listen(paths: list[str], addrs: Sequence[tuple[str, int]] = ()) -> list[socket.socket]:
    """A listening socket on each unix path and each local TCP address, so that a chardev in
    connect mode finds its peer (as the measurement's did: libvirt realized inputs whose
    chardevs connect; fixed_ports keeps inputs naming the same port apart)."""
    ends: list[tuple[int, Any]] = [(socket.AF_UNIX, p) for p in paths]
    ends += [(socket.AF_INET6 if host == "::1" else socket.AF_INET,
              ("127.0.0.1" if host == "localhost" else host, port)) for host, port in addrs]
    out = []
    for family, where in ends:
        s = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(where)
            s.listen(16)
        except OSError:
            s.close()
            continue
        out.append(s)
    return out


# ---- one input ----------------------------------------------------------------------------------

def _reason(message: str) -> str:
    """A grouping key for a rejection: indexes, paths, numbers and values taken out."""
    s = message
    s = re.sub(r"\[\d+\]", "", s)
    s = re.sub(r"^(/domain\S*: )?qemu-system-[a-z0-9_]+: ", r"\1", s)
    s = re.sub(r"^(/domain\S*: )?-[a-z-]+ (\{.*?\}|\S+): ", r"\1", s)  # QEMU's echo of the option at fault
    s = re.sub(r"/tmp/qc/[^\s'\",:]*", "<scratch>", s)
    return s


def _domain_error(exc: DomainError) -> tuple[str, str]:
    """(first line, grouping key) of a DomainError."""
    problems = [p for p in exc.problems if p.severity == "error"] or exc.problems
    if not problems:
        return str(exc) or "DomainError without problems", "DomainError without problems"
    p = problems[0]
    line = f"{p.path}: {p.message}" if p.path else p.message
    return line, _reason(line)


def run_one(xml_path: str, scratch: Path, guest: Guest, timeout: float) -> dict[str, Any]:
    """Classify one input; never raises."""
    name = os.path.basename(xml_path)
    res: dict[str, Any] = {"file": name}
    t0 = time.monotonic()
    try:
        res.update(_run_one(xml_path, name, scratch, guest, timeout))
    except Exception as exc:  # noqa: BLE001 - a bug in this harness, not in qemud
        res.update(outcome="crashed", stage="harness", message=f"harness error: {exc!r}",
                   traceback=traceback.format_exc())
    res["seconds"] = round(time.monotonic() - t0, 3)
    return res


def tuner(cmd: Any, caps: Any, label: str) -> tuple[Any, Any]:
    """What qemud does to a QEMU it started (its QMP setup, and its tuning: pinning, scheduling,
    cgroup), for
    :func:`realize_sync`'s ``after_start``, and the undoing of it; ``label`` names the cgroup
    (unique per input: parallel inputs share domain names)."""
    from qemud import tuning
    if cmd.tuning.empty and not cmd.qmp_setup:
        return None, lambda: None

    async def after_start(qmp: Any, pid: int) -> None:
        for command, arguments in cmd.qmp_setup:  # what qemud's guest does before `cont`
            await qmp.execute(command, arguments)
        await tuning.apply_over_qmp(qmp, cmd.tuning, caps.host, label, pid)

    def undo() -> None:
        try:
            tuning.release(caps.host, label)
        except QemudError:
            pass
    return after_start, undo


def _run_one(xml_path: str, name: str, scratch: Path, guest: Guest, timeout: float) -> dict[str, Any]:
    scratch.mkdir(parents=True, exist_ok=True)
    text = Path(xml_path).read_text(encoding="utf-8", errors="surrogateescape")
    rw = Rewriter(scratch, guest)
    try:
        text = rw.run(text)
    except ET.ParseError as exc:  # qemud gets the input as it is, and will say why
        rw.notes.append(f"not rewritten: {exc}")
    out: dict[str, Any] = {"rewrite_notes": rw.notes} if rw.notes else {}

    def crashed(stage: str) -> dict[str, Any]:
        tb = traceback.format_exc()
        last = tb.strip().splitlines()[-1]
        return {**out, "outcome": "crashed", "stage": stage, "message": last, "traceback": tb}

    try:
        domain = parse_domain(text, name)
    except DomainError as exc:
        line, key = _domain_error(exc)
        return {**out, "outcome": "rejected", "stage": "parse", "message": line, "reason": key,
                "problems": [p.format() for p in exc.problems]}
    except Exception:  # noqa: BLE001
        return crashed("parse")
    try:
        caps = probe(emulator_for(domain)).with_tls(rw.tls)
        if rw.secrets_dir.is_dir():  # the secrets the rewrite made
            from dataclasses import replace
            caps = replace(caps, host=replace(caps.host, secrets_dir=str(rw.secrets_dir)))
        if rw.nbd_tls_dir is not None:  # [tls] x509_dir: QEMU's client certificate for NBD
            from dataclasses import replace
            caps = replace(caps, host=replace(caps.host, tls_x509_dir=rw.nbd_tls_dir))
        paths = GuestPaths(run=scratch / "run", state=scratch / "state")
        cmd = build_argv(domain, caps, paths, paused=True)
    except DomainError as exc:
        line, key = _domain_error(exc)
        return {**out, "outcome": "rejected", "stage": "argv", "message": line, "reason": key,
                "problems": [p.format() for p in exc.problems]}
    except QemudError as exc:
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {**out, "outcome": "rejected", "stage": "caps", "message": line, "reason": _reason(line)}
    except Exception:  # noqa: BLE001
        return crashed("argv")
    out["argv"] = cmd.argv
    if cmd.env:
        out["env"] = cmd.env
    try:
        prepare(cmd)
    except QemudError as exc:
        line = str(exc).splitlines()[0]
        return {**out, "outcome": "rejected", "stage": "prepare", "message": line, "reason": _reason(line)}
    except Exception:  # noqa: BLE001
        return crashed("prepare")
    listeners = _listen(rw.peers, rw.tcp_peers)
    after_start, untune = tuner(cmd, caps, f"conformance-{Path(xml_path).stem}")
    try:
        helpers = _start_helpers(cmd, rw, caps.host.helpers.get("virtiofsd"))
    except QemudError as exc:
        for sock in listeners:
            sock.close()
        line = str(exc).splitlines()[0]
        return {**out, "outcome": "rejected", "stage": "helpers", "message": line, "reason": _reason(line)}
    stub = VhostUserStub(rw.vhost_users) if rw.vhost_users else None
    nbd: list[int] = []
    try:
        nbd = serve_nbd(rw)
        r = realize_sync(domain, cmd.argv, cmd.env, cmd.qmp, timeout=timeout, after_start=after_start)
    finally:
        for sock in listeners:
            sock.close()
        if stub is not None:
            stub.close()
        _stop_helpers(helpers)
        stop_nbd(nbd)
        untune()
        for fd in rw.ptys:
            os.close(fd)
    out["queries"] = r.queries
    if r.timed_out and not r.started:
        return {**out, "outcome": "crashed", "stage": "qemu", "message": f"hang: {r.error}",
                "qemu_output": r.output}
    if r.error is not None and not r.started:
        line = first_error_line(r.error) or r.error.splitlines()[0]
        element = element_of_qemu_error(line, cmd.elements)
        if element is not None:  # qemud names the element behind the option QEMU refused
            line = f"{element}: {line}"
        return {**out, "outcome": "rejected", "stage": "qemu", "message": line, "reason": _reason(line),
                "qemu_output": r.output, "exit_status": r.exit_status}
    if not r.ok:
        return {**out, "outcome": "mismatch", "stage": "checks", "failed_checks": r.failed_checks,
                "message": "; ".join(r.failed_checks) or (r.error or "not ok"), "qemu_output": r.output}
    return {**out, "outcome": "realized", "stage": "checks"}


def _start_helpers(cmd: Any, rw: Rewriter, virtiofsd: str | None) -> list[Any]:
    """The Command's helper processes (swtpm, virtiofsd), started before QEMU by the code the
    daemon uses (qemud.helpers); and a virtiofsd for each share the domain expects to be served
    by someone else."""
    from qemud import helpers
    from qemud.argv import HelperSpec
    specs = list(cmd.helpers)
    if virtiofsd is not None:
        for i, (sock, d) in enumerate(rw.virtiofs_peers):
            specs.append(HelperSpec(name=f"peer-virtiofsd{i}", socket=Path(sock), log=Path(d + ".log"),
                                    argv=[virtiofsd, "--fd={fd}", "-o", f"source={d},sandbox=chroot"]))
    for i, (sock, d) in enumerate(rw.swtpm_peers):
        specs.append(HelperSpec(name=f"peer-swtpm{i}", socket=Path(sock), log=Path(d + ".log"),
                                argv=["swtpm", "socket", "--ctrl", "type=unixio,fd={fd}", "--tpmstate", f"dir={d}",
                                      "--tpm2", "--terminate"]))
    return helpers.start(specs)


def _stop_helpers(running: list[Any]) -> None:
    """Every helper ended after QEMU (none is left behind by a measurement)."""
    from qemud import helpers
    helpers.stop_sync(running)


def _child(xml_path: str, scratch: str, guest: Guest, timeout: float, result_file: str) -> None:
    """Body of the forked worker for one input: its own process group (with its QEMU)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    res = run_one(xml_path, Path(scratch), guest, timeout)
    tmp = result_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, default=str)
    os.replace(tmp, result_file)


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class Running:
    proc: multiprocessing.process.BaseProcess
    xml: str
    scratch: Path
    result_file: Path
    deadline: float
    ports: frozenset[int] = frozenset()


_HUGEPAGES_WANTED = re.compile(r"needs (\d+) free (\d+) KiB hugepages, the host has (\d+)")


_BFQ_WANTED = re.compile(r"block device (\d+:\d+) does not use the BFQ I/O scheduler")


def _with_bfq(r: dict[str, Any], dev: str, by_name: dict[str, str], guest: Guest, base: Path,
              ns: argparse.Namespace, progress: bool) -> dict[str, Any]:
    """Run an input refused for per-device I/O weights on a disk without BFQ again, with BFQ as
    that disk's I/O scheduler (the one scheduler with per-device weights), then put it back."""
    sched = Path(f"/sys/dev/block/{dev}/queue/scheduler")
    try:
        text = sched.read_text()
        before = text[text.index("[") + 1:text.index("]")]
        sched.write_text("bfq")
    except (OSError, ValueError) as exc:
        r["host_setup"] = f"could not switch {dev} to BFQ: {exc}"
        return r
    try:
        [again] = run_all([by_name[r["file"]]], 1, guest, base, ns.timeout, ns.hard_timeout, ns.keep, False)
        again["host_setup"] = f"block device {dev} switched to the BFQ I/O scheduler for this input"
        if progress:
            print(f"  {r['file']}: with BFQ on {dev}: {again['outcome']}", file=sys.stderr)
        return again
    finally:
        sched.write_text(before)


def with_hugepages(results: list[dict[str, Any]], files: list[str], guest: Guest, base: Path,
                   ns: argparse.Namespace, progress: bool) -> list[dict[str, Any]]:
    """Run again, one by one, the inputs refused only for want of hugepages, each with the host's
    pool of that page size grown by what it lacks (and put back after), and those refused for
    per-device I/O weights on a disk without BFQ with BFQ switched on for them."""
    by_name = {os.path.basename(f): f for f in files}
    out = []
    for r in results:
        bfq = _BFQ_WANTED.search(r.get("message", "")) if r["outcome"] == "rejected" else None
        if bfq is not None:
            out.append(_with_bfq(r, bfq.group(1), by_name, guest, base, ns, progress))
            continue
        m = _HUGEPAGES_WANTED.search(r.get("message", "")) if r["outcome"] == "rejected" else None
        if m is None or len(r.get("problems", [])) > 1:
            out.append(r)
            continue
        need, size, have = (int(x) for x in m.groups())
        pool = Path(f"/sys/kernel/mm/hugepages/hugepages-{size}kB/nr_hugepages")
        try:
            before = int(pool.read_text())
            pool.write_text(str(before + need - have))
            got = int(pool.read_text())
            if got - before < need - have:
                # free memory in bits and pieces: drop the page cache, compact, and ask again
                Path("/proc/sys/vm/drop_caches").write_text("3")
                Path("/proc/sys/vm/compact_memory").write_text("1")
                pool.write_text(str(before + need - have))
                got = int(pool.read_text())
        except OSError as exc:
            r["hugepages"] = f"could not grow the pool: {exc.strerror}"
            out.append(r)
            continue
        try:
            if got - before < need - have:
                r["hugepages"] = f"the kernel gave {got - before} of {need - have} {size} KiB pages"
                out.append(r)
                continue
            [again] = run_all([by_name[r["file"]]], 1, guest, base, ns.timeout, ns.hard_timeout, ns.keep, False)
            again["hugepages"] = f"{need - have} x {size} KiB pages added to the host's pool for this input"
            if progress:
                print(f"  {r['file']}: with {need - have} more {size} KiB hugepages: {again['outcome']}",
                      file=sys.stderr)
            out.append(again)
        finally:
            pool.write_text(str(before))
    return out


def run_all(files: list[str], jobs: int, guest: Guest, base: Path, timeout: float,
            hard_timeout: float, keep: bool, progress: bool) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("fork")
    pending = [(i, xml, fixed_ports(xml) | _prealloc_token(xml)) for i, xml in enumerate(files)]
    running: list[Running] = []
    results: list[dict[str, Any]] = []
    total = len(files)

    def finish(r: Running, res: dict[str, Any]) -> None:
        # Still unreaped, the child's pid is its process group id: nothing of ours survives it.
        try:
            os.killpg(r.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        r.proc.join(10)
        if not keep:
            shutil.rmtree(r.scratch, ignore_errors=True)
        results.append(res)
        if progress and (len(results) % 50 == 0 or len(results) == total):
            print(f"  {len(results)}/{total} done", file=sys.stderr, flush=True)

    try:
        while pending or running:
            while len(running) < jobs:
                busy = frozenset().union(*(r.ports for r in running))
                pick = next((n for n, (_, _, ports) in enumerate(pending) if not ports & busy), None)
                if pick is None:
                    break
                i, xml, ports = pending.pop(pick)
                scratch = base / str(i)
                scratch.mkdir(parents=True, exist_ok=True)
                result_file = scratch / "result.json"
                extra = prealloc_seconds(xml)
                p = ctx.Process(target=_child, args=(xml, str(scratch), guest, timeout + extra, str(result_file)),
                                name=f"conformance-{i}")
                p.start()
                try:
                    os.setpgid(p.pid, p.pid)
                except OSError:
                    pass  # the child did it already
                running.append(Running(p, xml, scratch, result_file, time.monotonic() + hard_timeout + extra, ports))
            ready = multiprocessing.connection.wait([r.proc.sentinel for r in running], timeout=0.5)
            now = time.monotonic()
            for r in list(running):
                name = os.path.basename(r.xml)
                if r.proc.sentinel in ready:
                    running.remove(r)
                    try:
                        res = json.loads(r.result_file.read_text())
                    except (OSError, ValueError):
                        r.proc.join(1)
                        res = {"file": name, "outcome": "crashed", "stage": "worker",
                               "message": f"worker died without a result (exit code {r.proc.exitcode})"}
                    finish(r, res)
                elif now > r.deadline:
                    running.remove(r)
                    finish(r, {"file": name, "outcome": "crashed", "stage": "timeout",
                               "message": f"hang: no result within {hard_timeout:g} s (killed)",
                               "seconds": hard_timeout})
    finally:
        for r in running:
            try:
                os.killpg(r.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            r.proc.join(5)
    return results


#: QEMU preallocates guest RAM at this rate here (14 GiB: ~75 s), before QMP answers
PREALLOC_BYTES_PER_S = 128 * 1024 * 1024
#: inputs preallocating more than this run one at a time (two 14 GiB guests would exhaust the host)
PREALLOC_ALONE = 1 << 30


def prealloc_bytes(xml_path: str) -> int:
    """Guest RAM an input has QEMU allocate before it starts (<allocation mode='immediate'>,
    <hugepages>, <locked/>): the sum of the NUMA cells, else <memory>; 0 when it cannot be told."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError):
        return 0
    mb = root.find("memoryBacking")
    if mb is None:
        return 0
    alloc = mb.find("allocation")
    locked = mb.find("locked") is not None
    if not ((alloc is not None and alloc.get("mode") == "immediate") or mb.find("hugepages") is not None
            or locked):
        return 0
    from qemud.domain.units import unit_bytes

    def size(value: str | None, unit: str | None) -> int:
        try:
            return int(str(value).strip()) * (unit_bytes(unit or "KiB") or 1024)
        except ValueError:
            return 0
    cells = root.findall("cpu/numa/cell")
    mem = root.find("memory")
    total = (sum(size(c.get("memory"), c.get("unit")) for c in cells) if cells
             else size(mem.text, mem.get("unit")) if mem is not None else 0)
    return total + (1 << 30 if locked else 0)  # mlockall() also faults in TCG's 1 GiB buffer


def prealloc_seconds(xml_path: str) -> float:
    """More time for QEMU to start an input that preallocates its RAM."""
    return prealloc_bytes(xml_path) / PREALLOC_BYTES_PER_S


def _prealloc_token(xml_path: str) -> frozenset[int]:
    """A pseudo-port (-1) that keeps big preallocating inputs from running at the same time."""
    return frozenset({-1}) if prealloc_bytes(xml_path) > PREALLOC_ALONE else frozenset()


_PORT_ATTR = re.compile(r"""\b(?:service|port|tlsPort|websocket)\s*=\s*['"](\d+)['"]""")


def fixed_ports(xml_path: str) -> frozenset[int]:
    """TCP/UDP ports an input names: two inputs naming the same one must not run at once (a
    server of one would answer the client of the other, or both would fight over the bind)."""
    try:
        text = Path(xml_path).read_text(errors="replace")
    except OSError:
        return frozenset()
    return frozenset(int(p) for p in _PORT_ATTR.findall(text) if 0 < int(p) < 65536)


def libvirt_accepts(corpus: Path, xml_name: str) -> bool:
    base = xml_name[:-4]
    return (corpus / f"{base}.args").exists() or bool(glob.glob(str(corpus / f"{glob.escape(base)}.x86_64-*.args")))


def libvirt_rejects(corpus: Path, xml_name: str) -> bool:
    """libvirt's test suite expects an error for this input (and has no command line for it)."""
    base = glob.escape(xml_name[:-4])
    errs = glob.glob(str(corpus / f"{base}.err")) + glob.glob(str(corpus / f"{base}.x86_64-*.err"))
    return bool(errs) and not libvirt_accepts(corpus, xml_name)


# ---- guest-visible PCI addresses: qemud's argv against libvirt's .args --------------------------

#: (bus index, slot, function); slot None where the argv leaves the slot to QEMU
PciAddr = tuple[int, "int | None", int]


def libvirt_args_file(corpus: Path, xml_name: str) -> Path | None:
    """libvirt's command line for an input: the ``x86_64-latest`` one, else the plain ``.args``,
    else the newest versioned one."""
    base = xml_name[:-4]
    for cand in (corpus / f"{base}.x86_64-latest.args", corpus / f"{base}.args"):
        if cand.exists():
            return cand
    versioned = glob.glob(str(corpus / f"{glob.escape(base)}.x86_64-*.args"))

    def version(p: str) -> tuple[int, ...]:
        m = re.search(r"\.x86_64-([\d.]+)\.args$", p)
        return tuple(int(x) for x in m.group(1).strip(".").split(".")) if m else ()
    return Path(max(versioned, key=version)) if versioned else None


def parse_args_file(path: Path) -> list[str]:
    """An .args file as an argv (its lines end in `` \\``, values are shell-quoted)."""
    import shlex
    text = path.read_text(errors="replace").replace("\\\n", " ")
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def _device_props(value: str) -> dict[str, Any]:
    """A ``-device`` value, JSON or QEMU's key=value form, as a dict."""
    if value.startswith("{"):
        try:
            got = json.loads(value)
            return got if isinstance(got, dict) else {}
        except ValueError:
            return {}
    parts = re.split(r"(?<!,),(?!,)", value)
    props: dict[str, Any] = {"driver": parts[0]}
    for part in parts[1:]:
        k, _, v = part.partition("=")
        props[k] = v.replace(",,", ",")
    return props


def _bus_index(bus: str) -> int | None:
    if bus in ("pci.0", "pcie.0"):
        return 0
    m = re.fullmatch(r"pci\.(\d+)", bus)
    return int(m.group(1)) if m else None


def _int(v: Any) -> int:
    return v if isinstance(v, int) else int(str(v), 0)


def pci_devices(argv: list[str]) -> list[tuple[str, str, PciAddr]]:
    """(id, driver, address) of every ``-device`` that names a PCI bus, in argv order. Devices
    without an id get ``driver#n``; a bus that is not ``pci.N``/``pcie.0`` (usb.0, ide.0, a
    virtio-serial bus) means the device is not on PCI."""
    out: list[tuple[str, str, PciAddr]] = []
    n = 0
    if "-usb" in argv:  # the PIIX3's own UHCI function
        out.append(("usb", "piix3-usb-uhci", (0, 1, 2)))
    for i, a in enumerate(argv[:-1]):
        if a != "-device":
            continue
        props = _device_props(argv[i + 1])
        bus = props.get("bus")
        index = _bus_index(str(bus)) if bus is not None else None
        if index is None:
            continue
        addr = props.get("addr")
        slot: int | None = None
        fn = 0
        if addr is not None:
            s, _, f = str(addr).partition(".")
            try:
                slot, fn = _int(s), (_int(f) if f else 0)
            except ValueError:
                slot = None
        n += 1
        did = props.get("id")
        if not did and props.get("masterbus"):  # a USB companion: named by its master and ports
            did = f"{props.get('driver')}@{props['masterbus']}:{props.get('firstport')}"
        out.append((str(did or f"{props.get('driver')}#{n}"), str(props.get("driver")), (index, slot, fn)))
    return out


def fmt_pci(a: PciAddr | None) -> str:
    if a is None:
        return "absent"
    return f"{a[0]:02x}:{a[1]:02x}.{a[2]}" if a[1] is not None else f"{a[0]:02x}:??.{a[2]}"


def compare_pci(qemud_argv: list[str], libvirt_argv: list[str]) -> list[dict[str, Any]]:
    """Devices whose guest-visible PCI address differs: matched by id where both argvs have it,
    the rest by driver and order. A device only one side has is listed with ``absent``."""
    ours = pci_devices(qemud_argv)
    theirs = pci_devices(libvirt_argv)
    our_ids = {d[0] for d in ours}
    their_ids = {d[0] for d in theirs}
    common = our_ids & their_ids
    by_id_ours = {d[0]: d for d in ours}
    diffs: list[dict[str, Any]] = []
    for did, drv, addr in theirs:
        if did in common:
            mine = by_id_ours[did][2]
            if mine != addr:
                diffs.append({"device": did, "driver": drv, "libvirt": fmt_pci(addr), "qemud": fmt_pci(mine)})
    rest_ours = [d for d in ours if d[0] not in common]
    rest_theirs = [d for d in theirs if d[0] not in common]
    pool: dict[str, list[tuple[str, str, PciAddr]]] = {}
    for d in rest_ours:
        pool.setdefault(d[1], []).append(d)
    for did, drv, addr in rest_theirs:
        cands = pool.get(drv)
        if cands:
            mid, _, mine = cands.pop(0)
            if mine != addr:
                diffs.append({"device": f"{did}/{mid}", "driver": drv, "libvirt": fmt_pci(addr), "qemud": fmt_pci(mine)})
        else:
            diffs.append({"device": did, "driver": drv, "libvirt": fmt_pci(addr), "qemud": "absent"})
    for drv, cands in pool.items():
        for mid, _, mine in cands:
            diffs.append({"device": mid, "driver": drv, "libvirt": "absent", "qemud": fmt_pci(mine)})
    return diffs


def pci_comparison(results: list[dict[str, Any]], corpus: Path) -> dict[str, Any]:
    """Per realized input with a libvirt .args: do the guest-visible PCI addresses all match?"""
    per: dict[str, list[dict[str, Any]]] = {}
    old_caps: set[str] = set()
    for r in results:
        if r.get("outcome") != "realized" or not r.get("argv"):
            continue
        args = libvirt_args_file(corpus, r["file"])
        if args is None:
            continue
        per[r["file"]] = compare_pci(r["argv"], parse_args_file(args))
        if "latest" not in args.name:
            old_caps.add(r["file"])
    return {"compared": len(per), "matching": sum(1 for d in per.values() if not d),
            "mismatching": {f: d for f, d in sorted(per.items()) if d},
            # libvirt made these .args with its older mock capabilities (no qemu-xhci, no
            # pcie-pci-bridge...), so some of their differences are not qemud's
            "old_caps": sorted(f for f in old_caps if per[f])}


def report(results: list[dict[str, Any]], corpus: Path, elapsed: float, jobs: int, top: int) -> str:
    lines: list[str] = []
    w = lines.append
    try:
        libvirt = json.loads((corpus / "libvirt-realized.json").read_text())
    except (OSError, ValueError):
        libvirt = {}
    by_file = {r["file"]: r for r in results}

    def counts(rs: list[dict[str, Any]]) -> str:
        c = collections.Counter(r["outcome"] for r in rs)
        return "  ".join(f"{o} {c.get(o, 0)}" for o in OUTCOMES)

    w(f"qemud conformance over {corpus} ({len(results)} inputs, {jobs} jobs, {elapsed:.0f} s)")
    given = [r for r in results if ("hugepages" in r or "host_setup" in r) and r["outcome"] == "realized"]
    if given:
        w(f"(--hugepages: {len(given)} inputs realized once the host was given what they lacked "
          f"(hugepages, BFQ): {', '.join(r['file'] for r in given)})")
    w("")
    w(f"all inputs ({len(results)}):              {counts(results)}")
    accepted = [r for r in results if libvirt_accepts(corpus, r["file"])]
    w(f"inputs libvirt accepts ({len(accepted)}, .args):  {counts(accepted)}")
    lv_real = [f for f, v in libvirt.items() if v.get("outcome") == "realized" and f in by_file]
    both = [f for f in lv_real if by_file[f]["outcome"] == "realized"]
    w(f"libvirt realizes {len(lv_real)} of these inputs; qemud realizes {len(both)} of them")
    lv_acc = [f for f in lv_real if libvirt_accepts(corpus, f)]
    both_acc = [f for f in lv_acc if by_file[f]["outcome"] == "realized"]
    w(f"  (of libvirt's realized with an .args: {len(lv_acc)}; qemud realizes {len(both_acc)})")
    only_qemud = [r["file"] for r in results if r["outcome"] == "realized"
                  and libvirt.get(r["file"], {}).get("outcome") not in (None, "realized")]
    w(f"qemud realizes {len(only_qemud)} inputs that libvirt does not")
    invalid = [r["file"] for r in results if r["outcome"] == "realized" and libvirt_rejects(corpus, r["file"])]
    w(f"qemud realizes {len(invalid)} inputs that libvirt refuses outright (only an .err file):")
    for i in range(0, len(invalid), 4):
        w("    " + "  ".join(invalid[i:i + 4]))
    w("")
    rej = [r for r in results if r["outcome"] == "rejected"]
    reasons = collections.Counter(r.get("reason") or r.get("message", "") for r in rej)
    w(f"top rejection reasons ({len(rej)} rejected, {len(reasons)} distinct):")
    for reason, n in reasons.most_common(top):
        w(f"  {n:4d}  {reason}")
    w("")
    lv_rej = [by_file[f] for f in lv_real if by_file[f]["outcome"] == "rejected"]
    reasons2 = collections.Counter(r.get("reason") or r.get("message", "") for r in lv_rej)
    w(f"libvirt realized, qemud rejected ({len(lv_rej)}): top reasons")
    for reason, n in reasons2.most_common(top):
        w(f"  {n:4d}  {reason}")
    w("")
    pci = pci_comparison(results, corpus)
    w(f"PCI addresses (realized inputs with a libvirt .args): {pci['matching']} of {pci['compared']} "
      f"place every device where libvirt does; {len(pci['mismatching'])} differ "
      f"({len(pci['old_caps'])} of them against an .args of libvirt's older mock capabilities, marked *):")
    for f, diffs in pci["mismatching"].items():
        w(f"  {'*' if f in pci['old_caps'] else ''}{f}: " + "; ".join(f"{d['device']} ({d['driver']}) libvirt {d['libvirt']} qemud {d['qemud']}"
                                  for d in diffs))
    w("")
    for outcome in ("crashed", "mismatch"):
        rs = sorted((r for r in results if r["outcome"] == outcome), key=lambda r: r["file"])
        w(f"{outcome} ({len(rs)}):")
        for r in rs:
            lv = libvirt.get(r["file"], {}).get("outcome", "-")
            w(f"  {r['file']} [{r.get('stage', '?')}; libvirt: {lv}]: {r.get('message', '')}")
        w("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="qemud conformance run over libvirt's x86 QEMU test corpus")
    ap.add_argument("--corpus", type=Path, default=REPO / ".." / "shared" / "libvirt-corpus",
                    help="corpus folder (default: ../shared/libvirt-corpus from the repository root)")
    ap.add_argument("--only", action="append", metavar="GLOB",
                    help="only inputs whose file name matches (repeatable)")
    ap.add_argument("--jobs", "-j", type=int, default=3, help="inputs run at once (default 3)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write per-file results here")
    ap.add_argument("--timeout", type=float, default=20, help="seconds QEMU gets to start and answer (default 20)")
    ap.add_argument("--hard-timeout", type=float, default=60,
                    help="seconds one input may take in all before it is killed as a hang (default 60)")
    ap.add_argument("--scratch", type=Path, default=Path(SCRATCH_BASE),
                    help=f"where scratch folders go (short: unix socket paths; default {SCRATCH_BASE})")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folders")
    ap.add_argument("--top", type=int, default=25, help="how many rejection reasons to list")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    ap.add_argument("--hugepages", action="store_true",
                    help="give the host the hugepages an input lacks (root): inputs refused only because "
                         "the host's hugepage pool is empty run again, one at a time, with the pool grown "
                         "to what they need, which is put back after each; likewise BFQ for per-device "
                         "I/O weights")
    ns = ap.parse_args(argv)

    corpus = ns.corpus.resolve()
    files = sorted(glob.glob(str(corpus / "*.xml")))
    if ns.only:
        files = [f for f in files if any(fnmatch.fnmatch(os.path.basename(f), g) for g in ns.only)]
    if not files:
        print(f"no inputs in {corpus}" + (f" matching {ns.only}" if ns.only else ""), file=sys.stderr)
        return 2
    tg = ensure_guest()
    guest = Guest(str(tg.kernel), str(tg.initrd))
    for emu in sorted({DEFAULT_EMULATOR, "/usr/bin/qemu-system-i386"}):
        if os.access(emu, os.X_OK):
            probe(emu)  # fill the capability cache once, before the workers read it
    ns.scratch.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="", dir=ns.scratch))
    t0 = time.monotonic()
    try:
        results = run_all(files, max(1, ns.jobs), guest, base, ns.timeout, ns.hard_timeout, ns.keep,
                          not ns.quiet)
        if ns.hugepages:
            results = with_hugepages(results, files, guest, base, ns, not ns.quiet)
    finally:
        if not ns.keep:
            shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - t0
    results.sort(key=lambda r: r["file"])
    if ns.json:
        pci = pci_comparison(results, corpus)
        for r in results:
            if r["file"] in pci["mismatching"]:
                r["pci_addresses"] = {"match": False, "differences": pci["mismatching"][r["file"]],
                                      "old_caps_args": r["file"] in pci["old_caps"]}
            elif r.get("outcome") == "realized" and libvirt_args_file(corpus, r["file"]) is not None:
                r["pci_addresses"] = {"match": True}
        ns.json.write_text(json.dumps({r["file"]: r for r in results}, indent=1, default=str))
    print(report(results, corpus, elapsed, ns.jobs, ns.top))
    return 1 if any(r["outcome"] == "crashed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
