"""``<sysinfo>`` and ``<os><smbios>``: the SMBIOS tables the firmware shows the guest (-smbios),
blobs for the guest over fw_cfg (``<sysinfo type='fwcfg'>``, -fw_cfg), and extra ACPI tables
(``<os><acpi><table>``, -acpitable).  Files named here are read by QEMU at start."""

from __future__ import annotations

import re
import uuid as uuidlib

from qemud.argv.builder import Builder
from qemud.argv.qemuopts import opts
from qemud.domain.sysinfo import EntryBlock, Sysinfo

#: SMBIOS structure type, the libvirt block it comes from, and the entry names QEMU takes there
_TYPES: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0, "bios", ("vendor", "version", "date", "release")),
    (1, "system", ("manufacturer", "product", "version", "serial", "uuid", "sku", "family")),
    (2, "baseBoard", ("manufacturer", "product", "version", "serial", "asset", "location")),
    (3, "chassis", ("manufacturer", "version", "serial", "asset", "sku")),
)
_DATE = re.compile(r"(0[1-9]|1[0-2])/(0[1-9]|[12][0-9]|3[01])/([0-9]{2}|[0-9]{4})\Z")


def _smbios_type(b: Builder, n: int, block: EntryBlock, names: tuple[str, ...], path: str, emit: bool) -> None:
    pairs: list[tuple[str, object]] = [("type", n)]
    for k, e in enumerate(block.entry):
        epath = f"{path}/entry[{k + 1}]"
        if e.name not in names:
            what = "an entry needs a name" if e.name is None else f"'{e.name}' is not an entry of this block"
            b.error(f"{epath}/@name", f"{what} ({', '.join(names)})")
            continue
        if n == 0 and e.name == "date" and not _DATE.match(e.value):
            b.error(epath, f"Invalid BIOS 'date' format '{e.value}': use mm/dd/yy or mm/dd/yyyy")
            continue
        if n == 1 and e.name == "uuid":
            try:
                if uuidlib.UUID(e.value) != uuidlib.UUID(b.domain.uuid_value):
                    b.error(epath, "UUID mismatch between <uuid> and <sysinfo>: the SMBIOS system UUID "
                            "is the domain's")
                    continue
            except ValueError:
                b.error(epath, f"'{e.value}' is not a UUID")
                continue
        if e.value:
            pairs.append((e.name, e.value))
    if len(pairs) > 1 and emit:
        b.add("-smbios", opts(*pairs))


def _smbios(b: Builder, si: Sysinfo, path: str, emit: bool) -> None:
    """Check the tables (libvirt does whatever the mode) and give them to QEMU when ``emit``."""
    for n, tag, names in _TYPES:
        blocks = getattr(si, tag)
        if isinstance(blocks, tuple):
            if len(blocks) > 1:
                b.error(f"{path}/{tag}[2]", "QEMU does not support more than one entry of SMBIOS type 2 "
                        "(one <baseBoard>)")
                continue
            for k, block in enumerate(blocks):
                _smbios_type(b, n, block, names, f"{path}/{tag}[{k + 1}]", emit)
        elif blocks is not None:
            _smbios_type(b, n, blocks, names, f"{path}/{tag}", emit)
    if si.oemStrings is not None and si.oemStrings.entry and emit:
        b.add("-smbios", opts(("type", 11), *[("value", e.value) for e in si.oemStrings.entry]))
    if si.processor or si.memory:
        # libvirt does not pass them to QEMU either (its SMBIOS types 4 and 17 come from QEMU)
        b.warn(f"{path}/{'processor' if si.processor else 'memory'}",
               "processor and memory SMBIOS entries are not passed to QEMU (as with libvirt)")


def _fwcfg(b: Builder, si: Sysinfo, path: str) -> None:
    seen: set[str] = set()
    for k, e in enumerate(si.entry):
        epath = f"{path}/entry[{k + 1}]"
        if not e.name:
            b.error(f"{epath}/@name", "a fw_cfg entry needs a name")
            continue
        if not e.name.startswith("opt/"):
            b.error(f"{epath}/@name", f"fw_cfg name '{e.name}' must start with 'opt/' (the rest belongs to QEMU)")
            continue
        if e.name in seen:
            b.error(f"{epath}/@name", f"fw_cfg entry '{e.name}' is given twice")
            continue
        seen.add(e.name)
        if e.file and e.value:
            b.error(epath, "a fw_cfg entry has a file or a value, not both")
        elif e.file:
            b.add("-fw_cfg", opts(("name", e.name), ("file", e.file)))
        else:
            b.add("-fw_cfg", opts(("name", e.name), ("string", e.value)))


def add_sysinfo(b: Builder) -> None:
    d = b.domain
    mode = d.os.smbios.mode if d.os.smbios is not None else None
    smbios = [(i, s) for i, s in enumerate(d.sysinfo) if s.type == "smbios"]
    if len(smbios) > 1:
        b.error(f"/domain/sysinfo[{smbios[1][0] + 1}]", "only one <sysinfo type='smbios'> is allowed")
    if mode == "host":
        b.error("/domain/os/smbios/@mode", "mode 'host' copies the host's SMBIOS tables (libvirt reads them "
                "with dmidecode); qemud does not: use mode='sysinfo' with a <sysinfo type='smbios'>")
    elif mode == "sysinfo" and not smbios:
        b.error("/domain/os/smbios/@mode", "mode 'sysinfo' needs a <sysinfo type='smbios'> element")
    if smbios:
        i, si = smbios[0]
        path = f"/domain/sysinfo[{i + 1}]" if len(d.sysinfo) > 1 else "/domain/sysinfo"
        _smbios(b, si, path, emit=mode == "sysinfo")
        if mode != "sysinfo":
            # libvirt too passes the tables only with mode='sysinfo'
            b.warn(path, "the SMBIOS tables are not given to the guest without <os><smbios mode='sysinfo'/>")
    for i, si in enumerate(d.sysinfo):
        path = f"/domain/sysinfo[{i + 1}]" if len(d.sysinfo) > 1 else "/domain/sysinfo"
        if si.type == "fwcfg":
            _fwcfg(b, si, path)
        elif si.entry:
            b.error(f"{path}/entry", "bare entries belong to <sysinfo type='fwcfg'>")


def add_acpi_tables(b: Builder) -> None:
    acpi = b.domain.os.acpi
    if acpi is None:
        return
    f = b.domain.features
    for i, t in enumerate(acpi.table):
        path = f"/domain/os/acpi/table[{i + 1}]"
        if t.type != "slic":
            b.error(f"{path}/@type", f"ACPI table type '{t.type}' is not supported on x86 QEMU (only slic)")
            continue
        if not t.value:
            b.error(path, "an ACPI table needs the path of its file")
            continue
        if f is None or f.acpi is None:
            b.error(path, "an ACPI table needs ACPI (<features><acpi/></features>)")
            continue
        if ":" in t.value:
            # QEMU splits file= on ':' and reads every piece into the table (hw/acpi/core.c):
            # 'a.dat:/etc/shadow' would hand the guest another file
            b.error(path, f"QEMU reads ':' in an ACPI table path as a list of files; {t.value!r} needs a "
                    "name without ':'")
            continue
        b.add("-acpitable", opts(("sig", "SLIC"), ("file", t.value)))
