"""Property tests: no string in a domain file can add, remove or change a QEMU option.

For each place where text from the file reaches QEMU's command line, an arbitrary string (commas,
'=', quotes, newlines, braces, unicode; only what XML cannot carry is left out) either makes
qemud refuse the file with a DomainError, or reaches QEMU exactly:

* read back the way QEMU reads it: QemuOpts values split on single commas with ',,' as a comma,
  JSON values with json.loads, plain arguments (-kernel, -append) as they are;
* and the command line keeps its shape: the same options in the same order, the same QemuOpts
  keys and JSON keys as with a benign value in the same place.

XML element text loses leading and trailing whitespace when parsed (xmltodict strips it), so for
text slots the string expected at QEMU is the stripped one.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qemud.argv import Command, build_argv
from qemud.caps import HostCaps
from qemud.domain import parse_domain
from qemud.errors import DomainError
from qemud.paths import MAX_SOCKET_PATH
from tests.record_caps import load as load_caps
from tests.conftest import FLAG_OPTIONS, guest_paths, json_options, option_names, options, opts_dict

# ---- the strings ------------------------------------------------------------------------------

#: what XML 1.0 can carry: no NUL, no other C0 controls but tab/newline/CR, no surrogates,
#: no U+FFFE/U+FFFF
XML_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff").filter(
    lambda c: c in "\t\n\r" or ord(c) >= 0x20)
#: the characters that mean something to QEMU's option parsers, drawn often
SPECIAL = st.sampled_from(list(",,,==\"' \n\t\r:;{}[]-/\\#?@&%") + [",,", ",id=x", ",file=/etc/shadow",
                                                                  "\",\"x\":\"", "-cmd:", "unix:", "chardev:"])
STRINGS = st.lists(st.one_of(SPECIAL, XML_CHARS), max_size=24).map("".join)

#: the recorded caps, as a module constant so that falsifying examples do not print them
CAPS = load_caps()

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def attr_escape(v: str) -> str:
    return escape(v, {"'": "&apos;", '"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


def text_escape(v: str) -> str:
    return escape(v, {"\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


# ---- the command line's shape -----------------------------------------------------------------

QEMUOPTS = {"-name": "guest", "-chardev": "backend", "-vnc": "vnc", "-machine": "type", "-m": "size",
            "-smp": "cpus", "-boot": None, "-rtc": None, "-mon": None, "-spice": None, "-action": None,
            "-msg": None, "-tpmdev": "type", "-smbios": None, "-fw_cfg": None, "-acpitable": None, "-fsdev": "backend"}
JSON_OPTIONS = {"-device", "-blockdev", "-netdev", "-object", "-audiodev"}


def _json_shape(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_shape(x) for x in v]
    return type(v).__name__


def shape(argv: list[str]) -> list[Any]:
    """The options of an argv with their QemuOpts keys / JSON structure, values left out."""
    out: list[Any] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt in FLAG_OPTIONS:
            out.append(opt)
            i += 1
            continue
        value = argv[i + 1]
        if opt in QEMUOPTS:
            keys = [k for k, _ in _pairs(value, QEMUOPTS[opt])]
            out.append((opt, keys))
        elif opt in JSON_OPTIONS:
            out.append((opt, _json_shape(json.loads(value))))
        elif opt == "-cpu":
            out.append((opt, [t.split("=")[0] for t in value.split(",")]))
        else:
            out.append((opt,))
        i += 2
    return out


def _pairs(value: str, implied: str | None) -> list[tuple[str, str | None]]:
    from tests.conftest import parse_qemuopts
    return parse_qemuopts(value, implied)


# ---- where strings go -------------------------------------------------------------------------

def domain_xml(name: str = "inj", os: str = "", devices: str = "", extra: str = "", machine: str = "pc") -> str:
    return (f"<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>64</memory>\n"
            f"  <os>\n    <type arch='x86_64' machine='{machine}'>hvm</type>{os}\n  </os>\n{extra}"
            f"  <devices>\n{devices}\n  </devices>\n</domain>\n")


def _chardev_of(cmd: Command, device_driver: str, n: int = 0) -> dict[str, str | None]:
    dev = [d for d in json_options(cmd.argv, "-device") if d["driver"] == device_driver][n]
    for v in options(cmd.argv, "-chardev"):
        c = opts_dict(v, "backend")
        if c["id"] == dev["chardev"]:
            return c
    raise AssertionError(f"no chardev {dev['chardev']}")


def _chardev(cmd: Command, cid: str) -> dict[str, str | None]:
    (c,) = [c for c in (opts_dict(v, "backend") for v in options(cmd.argv, "-chardev")) if c["id"] == cid]
    return c


def _smbios(cmd: Command, type_: str, key: str) -> list[Any]:
    out = []
    for v in options(cmd.argv, "-smbios"):
        pairs = _pairs(v, None)
        if ("type", type_) in pairs:
            out += [val for k, val in pairs if k == key]
    return out


def _acpitable_files(cmd: Command) -> list[Any]:
    """QEMU 7.2 hw/acpi/core.c acpi_table_add() splits file= on ':' and reads every piece."""
    (v,) = options(cmd.argv, "-acpitable")
    return (opts_dict(v, None)["file"] or "").split(":")


def _blockdev(cmd: Command, node: str) -> dict[str, Any]:
    (b,) = [b for b in json_options(cmd.argv, "-blockdev") if b["node-name"] == node]
    return b


def _device(cmd: Command, driver: str) -> dict[str, Any]:
    (d,) = [d for d in json_options(cmd.argv, "-device") if d["driver"] == driver]
    return d


@dataclass(frozen=True)
class Slot:
    id: str
    text: bool  # element text (stripped by the parser) rather than an attribute value
    make: Callable[[str], str]  # escaped value -> domain XML
    carried: Callable[[Command], list[Any]]  # where the value shows up in the command
    expect: Callable[[str], list[Any]] = field(default=lambda s: [s])
    benign: str = "benign"
    empty_ok: bool = False  # an empty value reaches QEMU as such (not dropped, not defaulted)
    host: Callable[[HostCaps], HostCaps] | None = None  # a host that has what the slot needs


def _name_carried(cmd: Command) -> list[Any]:
    qmp = [opts_dict(v, "backend") for v in options(cmd.argv, "-chardev")]
    (path,) = [c["path"] for c in qmp if c["id"] == "qmp"]
    return [opts_dict(options(cmd.argv, "-name")[0], "guest")["guest"], path, str(cmd.prepare[0].dest)]


def _vnc_expect(s: str) -> list[Any]:
    host = f"[{s}]" if ":" in s and not s.startswith("[") else s
    return [f"{host}:0"]


def _guestfwd(cmd: Command) -> list[Any]:
    (nd,) = [n for n in json_options(cmd.argv, "-netdev") if "guestfwd" in n]
    fwd = nd["guestfwd"][0]["str"]
    return [_parse_guestfwd(fwd)]


def _parse_guestfwd(s: str) -> tuple[str, str, str]:
    """QEMU 7.2 net/slirp.c slirp_guestfwd(): 'tcp:' ADDR ':' PORT '-' TARGET (TARGET is
    'chardev:ID' or 'cmd:COMMAND', which QEMU runs)."""
    assert s.startswith("tcp:")
    rest = s[4:]
    addr, _, rest = rest.partition(":")
    port, _, target = rest.partition("-")
    return addr, port, target


def _url(cmd: Command) -> list[Any]:
    u = urllib.parse.urlsplit(_blockdev(cmd, "drive0-file")["url"])
    return [(u.scheme, u.netloc, urllib.parse.unquote(u.path), u.query, u.fragment)]


class _Everything(frozenset):  # type: ignore[type-arg]
    """A host where every device node asked for exists (HostFacts.present)."""

    def __contains__(self, _: object) -> bool:
        return True


def _with_every_node(caps: HostCaps) -> HostCaps:
    import dataclasses
    return dataclasses.replace(caps, host=dataclasses.replace(caps.host, present=_Everything()))


def _with_virtiofsd(caps: HostCaps) -> HostCaps:
    import dataclasses
    return dataclasses.replace(caps, host=dataclasses.replace(
        caps.host, helpers={**caps.host.helpers, "virtiofsd": "/usr/lib/qemu/virtiofsd"}))


def parse_fuse_opts(text: str) -> list[str]:
    """Split a ``-o`` list the way libfuse's fuse_opt (process_real_option_group, copied into
    QEMU 7.2's tools/virtiofsd) does: ',' separates, '\\' escapes the next character, '\\NNN'
    is an octal byte."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i <= len(text):
        if i == len(text) or text[i] == ",":
            out.append("".join(cur))
            cur = []
        elif text[i] == "\\" and i + 1 < len(text):
            i += 1
            if re.fullmatch(r"[0-3][0-7][0-7]", text[i:i + 3]):
                cur.append(chr(int(text[i:i + 3], 8)))
                i += 2
            else:
                cur.append(text[i])
        else:
            cur.append(text[i])
        i += 1
    return out


def _virtiofsd_opts(cmd: Command) -> list[Any]:
    (h,) = cmd.helpers
    return parse_fuse_opts(h.argv[h.argv.index("-o") + 1])


def _cookies(cmd: Command) -> list[Any]:
    """The Cookie header curl sends (QEMU's block/curl.c: CURLOPT_COOKIE), read as a server
    would: pairs split on '; ', and a line break is a header of its own."""
    header = _blockdev(cmd, "drive0-file")["cookie"]
    if "\r" in header or "\n" in header:
        return ["<a second header>"]
    return [tuple(p.split("=", 1)) for p in header.split("; ")]


SLOTS = [
    Slot("domain-name", True, lambda v: domain_xml(name=v), _name_carried,
         lambda s: [s, f"/run/qemud/domains/{s}/qmp.sock", f"/run/qemud/domains/{s}"]),
    Slot("disk-source-file", False,
         lambda v: domain_xml(devices=f"<disk type='file'><source file='{v}'/><target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["filename"]], empty_ok=False),
    Slot("disk-source-dev", False,
         lambda v: domain_xml(devices=f"<disk type='block'><source dev='{v}'/><target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["filename"]]),
    Slot("disk-serial", True,
         lambda v: domain_xml(devices=f"<disk><source file='/a.img'/><target dev='vda' bus='virtio'/><serial>{v}</serial></disk>"),
         lambda c: [_device(c, "virtio-blk-pci")["serial"]]),
    Slot("scsi-vendor", True,
         lambda v: domain_xml(devices="<controller type='scsi' model='virtio-scsi'/>"
                              f"<disk><source file='/a.img'/><target dev='sda' bus='scsi'/><vendor>{v}</vendor></disk>"),
         lambda c: [_device(c, "scsi-hd")["vendor"]]),
    Slot("kernel", True, lambda v: domain_xml(os=f"<kernel>{v}</kernel>"), lambda c: options(c.argv, "-kernel")),
    Slot("initrd", True, lambda v: domain_xml(os=f"<kernel>/vmlinuz</kernel><initrd>{v}</initrd>"),
         lambda c: options(c.argv, "-initrd")),
    Slot("kernel-cmdline", True, lambda v: domain_xml(os=f"<kernel>/vmlinuz</kernel><cmdline>{v}</cmdline>"),
         lambda c: options(c.argv, "-append")),
    Slot("serial-file-path", False,
         lambda v: domain_xml(devices=f"<serial type='file'><source path='{v}'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["path"]]),
    Slot("serial-unix-path", False,
         lambda v: domain_xml(devices=f"<serial type='unix'><source mode='bind' path='{v}'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["path"]]),
    Slot("serial-tcp-host", False,
         lambda v: domain_xml(devices=f"<serial type='tcp'><source mode='bind' host='{v}' service='4555'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["host"]]),
    Slot("serial-tcp-service", False,
         lambda v: domain_xml(devices=f"<serial type='tcp'><source mode='connect' host='127.0.0.1' service='{v}'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["port"]]),
    Slot("serial-udp-bind-host", False,
         lambda v: domain_xml(devices="<serial type='udp'><source mode='connect' host='127.0.0.1' service='1'/>"
                              f"<source mode='bind' host='{v}' service='2'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["localaddr"]]),
    Slot("chardev-log-file", False,
         lambda v: domain_xml(devices=f"<serial type='pty'><log file='{v}'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["logfile"]], empty_ok=True),
    Slot("channel-unix-path", False,
         lambda v: domain_xml(devices=f"<channel type='unix'><source mode='bind' path='{v}'/>"
                              "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"),
         lambda c: [_chardev_of(c, "virtserialport")["path"]]),
    Slot("channel-target-name", False,
         lambda v: domain_xml(devices=f"<channel type='pty'><target type='virtio' name='{v}'/></channel>"),
         lambda c: [_device(c, "virtserialport")["name"]]),
    Slot("guestfwd-address", False,
         lambda v: domain_xml(devices="<interface type='user'><mac address='52:54:00:00:00:01'/></interface>"
                              f"<channel type='pty'><target type='guestfwd' address='{v}' port='4600'/></channel>"),
         _guestfwd, lambda s: [(s, "4600", "chardev:charchannel0")], benign="10.0.2.100"),
    Slot("vnc-listen-address", False,
         lambda v: domain_xml(devices=f"<graphics type='vnc' port='5900' autoport='no' listen='{v}'/>"),
         lambda c: [opts_dict(options(c.argv, "-vnc")[0], "vnc")["vnc"]], _vnc_expect, benign="127.0.0.1"),
    Slot("vnc-socket", False,
         lambda v: domain_xml(devices=f"<graphics type='vnc' socket='{v}'/>"),
         lambda c: [opts_dict(options(c.argv, "-vnc")[0], "vnc")["vnc"]], lambda s: [f"unix:{s}"]),
    Slot("bridge-name", False,
         lambda v: domain_xml(devices=f"<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='{v}'/></interface>"),
         lambda c: [json_options(c.argv, "-netdev")[0]["br"]], benign="br0"),
    Slot("tap-device", False,
         lambda v: domain_xml(devices=f"<interface type='ethernet'><mac address='52:54:00:00:00:01'/><target dev='{v}'/></interface>"),
         lambda c: [json_options(c.argv, "-netdev")[0]["ifname"]], benign="tap0", empty_ok=True),
    Slot("nic-rom-file", False,
         lambda v: domain_xml(devices=f"<interface type='user'><mac address='52:54:00:00:00:01'/><rom file='{v}'/></interface>"),
         lambda c: [_device(c, "rtl8139")["romfile"]]),
    Slot("loader-path", True,
         lambda v: domain_xml(os=f"<loader type='pflash' readonly='yes'>{v}</loader>"
                              "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>", machine="q35",
                              extra="  <features><acpi/></features>\n"),
         lambda c: [_blockdev(c, "pflash0-file")["filename"]]),
    Slot("nvram-path", True,
         lambda v: domain_xml(os="<loader type='pflash' readonly='yes'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
                              f"<nvram>{v}</nvram>", machine="q35", extra="  <features><acpi/></features>\n"),
         lambda c: [_blockdev(c, "pflash1-file")["filename"]],
         lambda s: [str(Path(s))]),  # a path, so '//' and a trailing '/' may be normalised
    Slot("audio-file-path", False,
         lambda v: domain_xml(devices=f"<audio id='1' type='file' path='{v}'/><sound model='ich9'/>"),
         lambda c: [json_options(c.argv, "-audiodev")[0]["path"]]),
    Slot("usb-port", False,
         lambda v: domain_xml(devices=f"<input type='tablet' bus='usb'><address type='usb' bus='0' port='{v}'/></input>"),
         lambda c: [_device(c, "usb-tablet")["port"]], benign="1"),
    Slot("nbd-export", False,
         lambda v: domain_xml(devices=f"<disk type='network'><source protocol='nbd' name='{v}'>"
                              "<host name='127.0.0.1' port='10809'/></source><target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["export"]]),
    Slot("nbd-host", False,
         lambda v: domain_xml(devices="<disk type='network'><source protocol='nbd' name='e'>"
                              f"<host name='{v}' port='10809'/></source><target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["server"]["host"]]),
    Slot("http-path", False,
         lambda v: domain_xml(devices=f"<disk type='network' device='cdrom'><source protocol='https' name='{v}'>"
                              "<host name='images.example.org' port='443'/></source><target dev='hdc' bus='ide'/></disk>"),
         _url, lambda s: [("https", "images.example.org:443", "/" + s.lstrip("/"), "", "")], benign="iso/debian.iso"),
    Slot("clock-timezone", False,
         lambda v: domain_xml(extra=f"  <clock offset='timezone' timezone='{v}'/>\n"),
         lambda c: [c.env.get("TZ")], benign="Europe/Paris"),
    Slot("cpu-model", True,
         lambda v: domain_xml(extra=f"  <cpu mode='custom'><model>{v}</model></cpu>\n"),
         lambda c: [options(c.argv, "-cpu")[0]], benign="qemu64"),
    # ---- sysinfo, fw_cfg, ACPI tables
    Slot("smbios-bios-vendor", True,
         lambda v: domain_xml(os="<smbios mode='sysinfo'/>",
                              extra=f"  <sysinfo type='smbios'><bios><entry name='vendor'>{v}</entry></bios></sysinfo>\n"),
         lambda c: _smbios(c, "0", "vendor")),
    Slot("smbios-system-serial", True,
         lambda v: domain_xml(os="<smbios mode='sysinfo'/>",
                              extra=f"  <sysinfo type='smbios'><system><entry name='serial'>{v}</entry></system></sysinfo>\n"),
         lambda c: _smbios(c, "1", "serial")),
    Slot("smbios-baseboard-product", True,
         lambda v: domain_xml(os="<smbios mode='sysinfo'/>",
                              extra=f"  <sysinfo type='smbios'><baseBoard><entry name='product'>{v}</entry></baseBoard></sysinfo>\n"),
         lambda c: _smbios(c, "2", "product")),
    Slot("smbios-chassis-asset", True,
         lambda v: domain_xml(os="<smbios mode='sysinfo'/>",
                              extra=f"  <sysinfo type='smbios'><chassis><entry name='asset'>{v}</entry></chassis></sysinfo>\n"),
         lambda c: _smbios(c, "3", "asset")),
    Slot("smbios-oem-string", True,
         lambda v: domain_xml(os="<smbios mode='sysinfo'/>",
                              extra=f"  <sysinfo type='smbios'><oemStrings><entry>{v}</entry></oemStrings></sysinfo>\n"),
         lambda c: _smbios(c, "11", "value")),
    Slot("fwcfg-string", True,
         lambda v: domain_xml(extra=f"  <sysinfo type='fwcfg'><entry name='opt/org.example/a'>{v}</entry></sysinfo>\n"),
         lambda c: [opts_dict(options(c.argv, "-fw_cfg")[0], None)["string"]]),
    Slot("fwcfg-file", False,
         lambda v: domain_xml(extra=f"  <sysinfo type='fwcfg'><entry name='opt/org.example/a' file='{v}'/></sysinfo>\n"),
         lambda c: [opts_dict(options(c.argv, "-fw_cfg")[0], None)["file"]]),
    Slot("fwcfg-name", False,
         lambda v: domain_xml(extra=f"  <sysinfo type='fwcfg'><entry name='opt/{v}'>x</entry></sysinfo>\n"),
         lambda c: [opts_dict(options(c.argv, "-fw_cfg")[0], None)["name"]], lambda s: [f"opt/{s}"]),
    Slot("acpi-table-file", True,
         lambda v: domain_xml(os=f"<acpi><table type='slic'>{v}</table></acpi>", extra="  <features><acpi/></features>\n"),
         _acpitable_files, benign="/var/lib/slic.dat"),
    # ---- filesystems, shared memory, TPM, redirection, smartcards
    Slot("fs-9p-source-dir", False,
         lambda v: domain_xml(devices=f"<filesystem type='mount' accessmode='passthrough'><source dir='{v}'/>"
                              "<target dir='tag'/></filesystem>"),
         lambda c: [opts_dict(options(c.argv, "-fsdev")[0], "backend")["path"]]),
    Slot("fs-9p-mount-tag", False,
         lambda v: domain_xml(devices="<filesystem type='mount' accessmode='passthrough'><source dir='/srv'/>"
                              f"<target dir='{v}'/></filesystem>"),
         lambda c: [_device(c, "virtio-9p-pci")["mount_tag"]]),
    Slot("shmem-name", False,
         lambda v: domain_xml(devices=f"<shmem name='{v}'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>"),
         lambda c: [json_options(c.argv, "-object")[0]["mem-path"]], lambda s: [f"/dev/shm/{s}"]),
    Slot("shmem-server-path", False,
         lambda v: domain_xml(devices=f"<shmem name='s'><model type='ivshmem-doorbell'/><server path='{v}'/></shmem>"),
         lambda c: [_chardev(c, "charshmem0")["path"]]),
    Slot("tpm-external-socket", False,
         lambda v: domain_xml(devices="<tpm model='tpm-crb'><backend type='external'>"
                              f"<source type='unix' mode='connect' path='{v}'/></backend></tpm>"),
         lambda c: [_chardev(c, "chrtpm-tpm0")["path"]]),
    Slot("redirdev-tcp-host", False,
         lambda v: domain_xml(devices="<controller type='usb' model='qemu-xhci'/><redirdev bus='usb' type='tcp'>"
                              f"<source mode='connect' host='{v}' service='4000'/></redirdev>"),
         lambda c: [_chardev(c, "charredir0")["host"]]),
    Slot("redirdev-unix-path", False,
         lambda v: domain_xml(devices="<controller type='usb' model='qemu-xhci'/><redirdev bus='usb' type='unix'>"
                              f"<source mode='bind' path='{v}'/></redirdev>"),
         lambda c: [_chardev(c, "charredir0")["path"]]),
    Slot("smartcard-passthrough-path", False,
         lambda v: domain_xml(devices="<controller type='usb' model='qemu-xhci'/><smartcard mode='passthrough' type='unix'>"
                              f"<source mode='bind' path='{v}'/></smartcard>"),
         lambda c: [_chardev(c, "charsmartcard0")["path"]]),
    Slot("smartcard-database", True,
         lambda v: domain_xml(devices="<controller type='usb' model='qemu-xhci'/><smartcard mode='host-certificates'>"
                              f"<certificate>a</certificate><certificate>b</certificate><certificate>c</certificate><database>{v}</database></smartcard>"),
         lambda c: [_device(c, "ccid-card-emulated")["db"]]),
    Slot("hostdev-iscsi-target", False,
         lambda v: domain_xml(devices="<controller type='scsi' model='virtio-scsi'/><hostdev mode='subsystem' type='scsi'>"
                              f"<source protocol='iscsi' name='{v}/1'><host name='192.0.2.1' port='3260'/></source></hostdev>"),
         lambda c: [_blockdev(c, "hostdev0-storage")["target"]], benign="iqn.2014-08.com.example:t"),
    Slot("hostdev-iscsi-host", False,
         lambda v: domain_xml(devices="<controller type='scsi' model='virtio-scsi'/><hostdev mode='subsystem' type='scsi'>"
                              f"<source protocol='iscsi' name='iqn.2014-08.com.example:t/1'><host name='{v}' port='3260'/></source></hostdev>"),
         lambda c: [_blockdev(c, "hostdev0-storage")["portal"]], lambda s: [_portal(s, "3260")]),
    Slot("virtiofs-source-dir", False,
         lambda v: domain_xml(extra="  <cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB' memAccess='shared'/></numa></cpu>\n",
                              devices=f"<filesystem type='mount'><driver type='virtiofs'/><source dir='{v}'/><target dir='tag'/></filesystem>"),
         _virtiofsd_opts, lambda s: [f"source={s}"], benign="/srv/share", host=_with_virtiofsd),
    Slot("virtiofs-tag", False,
         lambda v: domain_xml(extra="  <cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB' memAccess='shared'/></numa></cpu>\n",
                              devices=f"<filesystem type='mount'><driver type='virtiofs'/><source dir='/srv'/><target dir='{v}'/></filesystem>"),
         lambda c: [_device(c, "vhost-user-fs-pci")["tag"]], host=_with_virtiofsd),
    Slot("http-cookie-value", True,
         lambda v: domain_xml(devices="<disk type='network' device='cdrom'><source protocol='https' name='a.iso'>"
                              f"<host name='h' port='443'/><cookies><cookie name='n'>{v}</cookie></cookies></source>"
                              "<target dev='hdc' bus='ide'/></disk>"),
         _cookies, lambda s: [("n", s)], empty_ok=True),
    Slot("http-cookie-name", False,
         lambda v: domain_xml(devices="<disk type='network' device='cdrom'><source protocol='https' name='a.iso'>"
                              f"<host name='h' port='443'/><cookies><cookie name='{v}'>v</cookie></cookies></source>"
                              "<target dev='hdc' bus='ide'/></disk>"),
         _cookies, lambda s: [(s, "v")]),
    Slot("nfs-path", False,
         lambda v: domain_xml(devices=f"<disk type='network'><source protocol='nfs' name='{v}'><host name='h'/></source>"
                              "<target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["path"]], benign="/export/a.img"),
    Slot("gluster-path", False,
         lambda v: domain_xml(devices=f"<disk type='network'><source protocol='gluster' name='vol/{v}'><host name='h'/></source>"
                              "<target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["path"]]),
    Slot("nbd-unix-socket", False,
         lambda v: domain_xml(devices="<disk type='network'><source protocol='nbd' name='e'>"
                              f"<host transport='unix' socket='{v}'/></source><target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["server"]["path"]]),
    # ---- host device nodes (on a host that has whatever node is named)
    Slot("tpm-passthrough-path", False,
         lambda v: domain_xml(devices=f"<tpm model='tpm-tis'><backend type='passthrough'><device path='{v}'/></backend></tpm>"),
         lambda c: [opts_dict(options(c.argv, "-tpmdev")[0], "type")["path"]], benign="/dev/tpm0", host=_with_every_node),
    Slot("input-evdev-dev", False,
         lambda v: domain_xml(devices=f"<input type='evdev'><source dev='{v}'/></input>"),
         lambda c: [json_options(c.argv, "-object")[0]["evdev"]], benign="/dev/input/event0", host=_with_every_node),
    Slot("input-passthrough-evdev", False,
         lambda v: domain_xml(devices=f"<input type='passthrough' bus='virtio'><source evdev='{v}'/></input>"),
         lambda c: [_device(c, "virtio-input-host-pci")["evdev"]], benign="/dev/input/event0", host=_with_every_node),
    Slot("vdpa-dev", False,
         lambda v: domain_xml(devices=f"<interface type='vdpa'><mac address='52:54:00:00:00:01'/><source dev='{v}'/></interface>"),
         lambda c: [json_options(c.argv, "-netdev")[0]["vhostdev"]], benign="/dev/vhost-vdpa-0", host=_with_every_node),
    Slot("smartcard-certificate", True,
         lambda v: domain_xml(devices="<controller type='usb' model='qemu-xhci'/><smartcard mode='host-certificates'>"
                              f"<certificate>{v}</certificate><certificate>b</certificate><certificate>c</certificate></smartcard>"),
         lambda c: [_device(c, "ccid-card-emulated")["cert1"]], host=_with_every_node),
    # ---- more chardev backends, SPICE, aliases, iSCSI disks
    Slot("serial-pipe-path", False,
         lambda v: domain_xml(devices=f"<serial type='pipe'><source path='{v}'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["path"]]),
    Slot("serial-dev-path", False,
         lambda v: domain_xml(devices=f"<serial type='dev'><source path='{v}'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["path"]]),
    Slot("serial-spiceport-channel", False,
         lambda v: domain_xml(devices=f"<graphics type='spice'/><serial type='spiceport'><source channel='{v}'/></serial>"),
         lambda c: [_chardev_of(c, "isa-serial")["name"]], benign="org.qemu.console.serial.0"),
    Slot("spice-listen-address", False,
         lambda v: domain_xml(devices=f"<graphics type='spice' port='5901' autoport='no' listen='{v}'/>"),
         lambda c: [opts_dict(options(c.argv, "-spice")[0], None)["addr"]], benign="127.0.0.1"),
    Slot("spice-socket", False,
         lambda v: domain_xml(devices=f"<graphics type='spice'><listen type='socket' socket='{v}'/></graphics>"),
         lambda c: [opts_dict(options(c.argv, "-spice")[0], None)["addr"]]),
    Slot("disk-alias", False,
         lambda v: domain_xml(devices=f"<disk><source file='/a.img'/><target dev='vda' bus='virtio'/><alias name='ua-{v}'/></disk>"),
         lambda c: [_device(c, "virtio-blk-pci")["id"]], lambda s: [f"ua-{s}"]),
    Slot("interface-alias", False,
         lambda v: domain_xml(devices=f"<interface type='user'><mac address='52:54:00:00:00:01'/><alias name='ua-{v}'/></interface>"),
         lambda c: [_device(c, "rtl8139")["id"]], lambda s: [f"ua-{s}"]),
    Slot("iscsi-disk-target", False,
         lambda v: domain_xml(devices=f"<disk type='network'><source protocol='iscsi' name='{v}/0'>"
                              "<host name='192.0.2.1' port='3260'/></source><target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["target"]], benign="iqn.2024-01.org.example:t"),
    Slot("iscsi-disk-host", False,
         lambda v: domain_xml(devices="<disk type='network'><source protocol='iscsi' name='iqn.2024-01.org.example:t/0'>"
                              f"<host name='{v}' port='3260'/></source><target dev='vda' bus='virtio'/></disk>"),
         lambda c: [_blockdev(c, "drive0-file")["portal"]], lambda s: [_portal(s, "3260")], benign="192.0.2.1"),
]


def _portal(host: str, port: str) -> str:
    """An iSCSI portal: host:port, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def translate(xml: str, caps: HostCaps) -> Command:
    d = parse_domain(xml, "inj.xml")
    return build_argv(d, caps, guest_paths(d.name))


@pytest.fixture(scope="module")
def baselines(caps: HostCaps) -> dict[str, Command]:
    out = {}
    for slot in SLOTS:
        esc = text_escape(slot.benign) if slot.text else attr_escape(slot.benign)
        out[slot.id] = translate(slot.make(esc), slot.host(caps) if slot.host else caps)
    return out


def test_benign_values_arrive(baselines: dict[str, Command]) -> None:
    """The extractors find the benign value: the property below is not vacuous."""
    for slot in SLOTS:
        assert slot.carried(baselines[slot.id]) == slot.expect(slot.benign), slot.id


def check_slot(slot: Slot, s: str, caps: HostCaps, baseline: Command) -> None:
    esc = text_escape(s) if slot.text else attr_escape(s)
    xml = slot.make(esc)
    expected_value = s.strip() if slot.text else s
    try:
        cmd = translate(xml, slot.host(caps) if slot.host else caps)
    except DomainError as exc:
        assert exc.problems and all(p.path.startswith("/domain") for p in exc.problems), str(exc)
        return
    if expected_value == "" and not slot.empty_ok:
        # an empty value may be dropped or replaced by a default: nothing to carry
        return
    assert slot.carried(cmd) == slot.expect(expected_value), f"{slot.id}: {s!r} did not arrive intact"
    assert option_names(cmd.argv) == option_names(baseline.argv), f"{slot.id}: {s!r} changed the options"
    assert len(cmd.argv) == len(baseline.argv)
    assert shape(cmd.argv) == shape(baseline.argv), f"{slot.id}: {s!r} changed an option's keys"
    assert set(cmd.env) == set(baseline.env)


@pytest.mark.parametrize("slot", SLOTS, ids=[s.id for s in SLOTS])
@SETTINGS
@given(s=STRINGS)
@example(s=",")
@example(s="a,,b")
@example(s="x,id=evil")
@example(s="/tmp/a,file=/etc/shadow,format=raw")
@example(s='","driver":"evil')
@example(s="line1\nline2")
@example(s="  padded  ")
@example(s="10.0.2.100:1-cmd:touch /tmp/pwned;")
@example(s="a#b?c")
@example(s="\u00e9\u4e2d\U0001f600")
def test_string_reaches_qemu_intact_or_is_refused(slot: Slot, s: str, baselines: dict[str, Command]) -> None:
    check_slot(slot, s, CAPS, baselines[slot.id])


# ---- socket paths made from the domain name ---------------------------------------------------

SOCKET_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type>hvm</type></os>
  <devices>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='unix'/>
    <graphics type='vnc'>
      <listen type='socket'/>
    </graphics>
  </devices>
</domain>
"""


def _socket_paths(argv: list[str]) -> list[str]:
    paths = []
    for v in options(argv, "-chardev"):
        c = opts_dict(v, "backend")
        if c["backend"] == "socket" and c.get("path"):
            paths.append(c["path"])
    for v in options(argv, "-vnc"):
        spec = opts_dict(v, "vnc")["vnc"] or ""
        if spec.startswith("unix:"):
            paths.append(spec[5:])
    return paths


@SETTINGS
@given(name=st.one_of(STRINGS, st.integers(60, 100).map(lambda n: "n" * n)))
@example(name="n" * 75)
@example(name="\u00e9" * 38)
def test_unix_socket_paths_fit_or_the_name_is_refused(name: str) -> None:
    """Every unix socket qemud names after the domain fits in sun_path (107 bytes), or the file
    is refused: QEMU would fail at start otherwise."""
    try:
        cmd = translate(SOCKET_XML.format(name=text_escape(name)), CAPS)
    except DomainError:
        return
    for p in _socket_paths(cmd.argv):
        assert len(p.encode()) <= MAX_SOCKET_PATH, f"{p!r} is {len(p.encode())} bytes"


# ---- the reader of QemuOpts strings used above -------------------------------------------------

@pytest.mark.parametrize(("text", "implied", "pairs"), [
    ("a=1,b=2", None, [("a", "1"), ("b", "2")]),
    ("a=x,,y,b=2", None, [("a", "x,y"), ("b", "2")]),
    ("a=x,,,,y", None, [("a", "x,,y")]),
    ("a=,b=", None, [("a", ""), ("b", "")]),
    ("socket,id=q", "backend", [("backend", "socket"), ("id", "q")]),
    ("guest=a,,b=c,debug-threads=on", "guest", [("guest", "a,b=c"), ("debug-threads", "on")]),
    ("a=1,flag", None, [("a", "1"), ("flag", None)]),
])
def test_qemuopts_reader(text: str, implied: str | None, pairs: list[tuple[str, str | None]]) -> None:
    from tests.conftest import parse_qemuopts
    assert parse_qemuopts(text, implied) == pairs


def test_fuse_opts_reader() -> None:
    assert parse_fuse_opts("source=/a\\,b,xattr") == ["source=/a,b", "xattr"]
    assert parse_fuse_opts("source=/a\\\\,b") == ["source=/a\\", "b"]
    assert parse_fuse_opts("a\\101,,b") == ["aA", "", "b"]


def test_guestfwd_reader() -> None:
    assert _parse_guestfwd("tcp:10.0.2.100:4600-chardev:charchannel0") == ("10.0.2.100", "4600", "chardev:charchannel0")
    assert re.match(r"cmd:", _parse_guestfwd("tcp:1.2.3.4:1-cmd:x:4600-chardev:c")[2])
