"""The machine: type, accelerator, CPU, memory, topology, firmware, boot, clock, features, PM."""

from __future__ import annotations

import re
from pathlib import Path

from qemud.argv.builder import Builder, Prepare
from qemud.argv.qemuopts import js, opts
from qemud.domain.cpu import MAX_VCPUS
from qemud.domain.units import size_in_range

# QEMU's names for libvirt's CPU feature names where they differ
_FEATURE_ALIASES = {"pclmuldq": "pclmulqdq", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ds_cpl": "ds-cpl",
                    "lahf_lm": "lahf-lm", "cmp_legacy": "cmp-legacy", "osxsave": "osxsave"}


def add_machine(b: Builder) -> None:
    d = b.domain
    props: list[tuple[str, object]] = [("type", b.machine.name)]
    props.append(("usb", False))
    props.append(("dump-guest-core", False))
    f = d.features
    if f is not None and f.vmport is not None:
        props.append(("vmport", f.vmport.state))
    if f is not None and f.smm is not None:
        props.append(("smm", f.smm.state))
    if f is not None and f.ioapic is not None:
        # libvirt: driver='qemu' emulates the I/O APIC in QEMU (split irqchip), which an IOMMU's
        # interrupt remapping needs; driver='kvm' keeps it in the kernel
        props.append(("kernel_irqchip", "split" if f.ioapic.driver == "qemu" else "on"))
    # ACPI: libvirt turns it off when <features><acpi/> is absent
    if f is None or f.acpi is None:
        props.append(("acpi", False))
    for t in (d.clock.timer if d.clock else ()):
        if t.name == "hpet" and t.present is not None:
            props.append(("hpet", t.present))
    if d.kvm:
        if not b.caps.kvm:
            b.error("/domain/@type", f"type='kvm' needs KVM, which is not usable here: {b.caps.kvm_reason}; "
                    "use type='qemu' to emulate the CPU instead (much slower)")
    if f is not None and f.vmcoreinfo is not None and f.vmcoreinfo.state:
        pass  # a device, added with the others
    pflash = _firmware(b)
    props += pflash
    if b.secure_boot and not any(k == "smm" for k, _ in props):
        props.append(("smm", True))  # secure boot needs SMM: the firmware's variables live there
    b.add("-machine", opts(*props))
    b.add("-accel", "kvm" if d.kvm else "tcg")


def select_firmware(b: Builder) -> dict | str | None:  # type: ignore[type-arg]
    """libvirt's firmware autoselection (``<os firmware='efi'>``) through QEMU's firmware
    descriptors: the first, by priority, for this architecture and machine type that has every
    feature asked for and none refused. A message when none fits; None for firmware='bios'
    (QEMU's own SeaBIOS)."""
    import fnmatch
    d = b.domain
    if d.os.firmware != "efi":
        return None
    want: dict[str, bool] = {}
    if d.os.firmware_features is not None:
        for f in d.os.firmware_features.feature:
            want[f.name] = f.enabled
    loader = d.os.loader
    if loader is not None and loader.secure is not None:
        want.setdefault("secure-boot", loader.secure)
    arch = d.os.type.arch or "x86_64"
    for desc in b.caps.firmware:
        mapping = desc.get("mapping") or {}
        if "uefi" not in (desc.get("interface-types") or []) or mapping.get("device") != "flash":
            continue
        if not any(t.get("architecture") == arch and any(fnmatch.fnmatch(b.machine.name, m)
                                                         for m in t.get("machines", []))
                   for t in desc.get("targets", [])):
            continue
        features = set(desc.get("features") or [])
        if any((name in features) != enabled for name, enabled in want.items()):
            continue
        code = (mapping.get("executable") or {}).get("filename")
        if loader is not None and loader.path and loader.path != code:
            continue
        if not code:
            continue
        return {"code": code, "format": (mapping.get("executable") or {}).get("format", "raw"),
                "vars": (mapping.get("nvram-template") or {}).get("filename"),
                "smm": "requires-smm" in features, "file": desc.get("_file")}
    asked = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in want.items()) or "no particular features"
    if loader is not None and loader.path:
        asked += f" and loader {loader.path}"
    return (f"no UEFI firmware on this host fits machine {b.machine.name} ({arch}) with {asked}; "
            "install ovmf, or name the loader and NVRAM template in <loader> and <nvram>")


def _firmware(b: Builder) -> list[tuple[str, object]]:
    """-bios for ROM loaders; pflash drives for UEFI (read-only code + per-domain NVRAM)."""
    d = b.domain
    loader = d.os.loader
    auto = select_firmware(b)
    if isinstance(auto, str):
        b.error("/domain/os/@firmware", auto)
        return []
    if auto is not None:
        # the selection fills in what the file leaves out: libvirt's behaviour
        from qemud.domain.osxml import Loader, Nvram
        loader = Loader.model_validate({"@type": "pflash", "@readonly": "yes", "@format": auto["format"],
                                        **({"@secure": "yes"} if auto["smm"] else {}), "#text": auto["code"]})
        nv = d.os.nvram
        if auto["vars"] and (nv is None or not nv.template):
            nv = Nvram.model_validate({**({"#text": nv.path} if nv is not None and nv.path else {}),
                                       "@template": auto["vars"]})
        return _pflash(b, loader, nv)
    if loader is None or not loader.path:
        if d.os.nvram is not None:
            b.error("/domain/os/nvram", "<nvram> needs a pflash <loader>")
        return []
    ltype = loader.type or "rom"
    if ltype == "rom":
        if d.os.nvram is not None:
            b.error("/domain/os/nvram", "<nvram> needs <loader type='pflash'>")
        b.add("-bios", loader.path)
        return []
    return _pflash(b, loader, d.os.nvram)


def _pflash(b: Builder, loader, nv) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    if loader.stateless:
        b.error("/domain/os/loader/@stateless", "stateless firmware is not supported yet")
    readonly = loader.readonly if loader.readonly is not None else True
    fmt = loader.format or "raw"
    b.add("-blockdev", js({"driver": "file", "filename": loader.path, "node-name": "pflash0-file",
                           "auto-read-only": True, "discard": "unmap"}))
    b.add("-blockdev", js({"node-name": "pflash0", "read-only": readonly, "driver": fmt,
                           "file": "pflash0-file"}))
    out: list[tuple[str, object]] = [("pflash0", "pflash0")]
    if loader.secure:
        b.secure_boot = True
        b.add("-global", "driver=cfi.pflash01,property=secure,value=on")
    if not readonly:
        if nv is not None:
            b.error("/domain/os/nvram", "a writable loader keeps its own variables; <nvram> needs readonly='yes'")
        return out
    nv_path = Path(nv.path) if nv is not None and nv.path else b.paths.nvram(nv.template if nv else None)
    template = nv.template if nv is not None else None
    if template is None and nv is not None and nv.path:
        pass  # an existing NVRAM file named by the user
    elif template is None:
        template = _default_vars(loader.path)
        if template is None:
            b.error("/domain/os/nvram", f"no NVRAM template is known for loader {loader.path}; "
                    "add <nvram template='...'/>")
            return out
    if template is not None:
        b.prepare.append(Prepare("copy", nv_path, Path(template)))
    nv_fmt = (nv.format if nv is not None else None) or ("qcow2" if str(nv_path).endswith(".qcow2") else "raw")
    b.add("-blockdev", js({"driver": "file", "filename": str(nv_path), "node-name": "pflash1-file",
                           "auto-read-only": True, "discard": "unmap"}))
    b.add("-blockdev", js({"node-name": "pflash1", "read-only": False, "driver": nv_fmt,
                           "file": "pflash1-file"}))
    out.append(("pflash1", "pflash1"))
    return out


def _default_vars(code: str) -> str | None:
    """Debian's OVMF pairs: OVMF_CODE*.fd -> OVMF_VARS*.fd next to it."""
    p = Path(code)
    name = p.name.replace("CODE", "VARS")
    if name != p.name:
        name = name.replace(".secboot", "").replace(".ms", "")
        return str(p.with_name(name))
    return None


def add_cpu(b: Builder) -> None:
    d = b.domain
    cpu = d.cpu
    features: list[str] = []
    model: str | None = None
    if cpu is not None:
        if cpu.mode == "host-passthrough" or cpu.mode == "host-model":
            if not d.kvm:
                b.error("/domain/cpu/@mode", f"mode '{cpu.mode}' needs type='kvm'; "
                        "under emulation use mode='maximum' or a named model")
            model = "host"
        elif cpu.mode == "maximum":
            model = "max"
        elif cpu.model is not None and cpu.model.name:
            model = cpu.model.name
            if model not in b.caps.cpu_models:
                if cpu.model.fallback == "forbid" or True:
                    b.error("/domain/cpu/model", f"CPU model '{model}' is not known to {b.caps.emulator}")
        for i, feat in enumerate(cpu.feature):
            name = _FEATURE_ALIASES.get(feat.name, feat.name)
            if feat.policy in ("force", "require"):
                features.append(f"{name}=on")
            elif feat.policy in ("disable", "forbid"):
                features.append(f"{name}=off")
        if cpu.cache is not None:
            if cpu.cache.mode == "passthrough":
                features.append("host-cache-info=on")
            elif cpu.cache.mode == "disable":
                features.append("l3-cache=off")
            elif cpu.cache.mode == "emulate" and cpu.cache.level == 3:
                features.append("l3-cache=on")
        if cpu.maxphysaddr is not None:
            if cpu.maxphysaddr.mode == "passthrough":
                features.append("host-phys-bits=on")
            elif cpu.maxphysaddr.bits:
                features.append(f"phys-bits={cpu.maxphysaddr.bits}")
    f = d.features
    if f is not None:
        if f.pmu is not None:
            features.append(f"pmu={'on' if f.pmu.state else 'off'}")
        if f.pvspinlock is not None:
            features.append(f"kvm-pv-unhalt={'on' if f.pvspinlock.state else 'off'}")
        if f.apic is not None and f.apic.eoi is not None:
            features.append(f"kvm-pv-eoi={'on' if f.apic.eoi else 'off'}")
    for t in (d.clock.timer if d.clock else ()):
        if t.name == "kvmclock" and t.present is not None:
            features.append(f"kvmclock={'on' if t.present else 'off'}")
        elif t.name == "hypervclock" and t.present is not None:
            features.append(f"hv-time={'on' if t.present else 'off'}")
    if any(p.model == "hyperv" for p in d.devices.panic):
        features.append("hv-crash")  # <panic model='hyperv'>: the Hyper-V crash MSRs of the vCPU
    if features and model is None:
        model = "qemu64"  # QEMU's default x86 model, with the asked-for changes
    if model is not None:
        b.add("-cpu", ",".join([model, *features]))


def add_memory(b: Builder) -> None:
    d = b.domain
    for size, path in ((d.memory, "/domain/memory"), (d.currentMemory, "/domain/currentMemory"),
                       (d.maxMemory, "/domain/maxMemory")):
        msg = size_in_range(size, "memory")
        if msg:
            b.error(path, msg)
            return
    mib = d.memory.mib
    cells = d.cpu.numa.cell if d.cpu is not None and d.cpu.numa is not None else ()
    if cells:
        total = sum(c.mib for c in cells)
        if abs(total - mib) > len(cells):  # each cell is rounded up to a MiB
            b.error("/domain/memory", f"is {mib} MiB, but the NUMA cells add up to {total} MiB")
            return
        mib = total  # libvirt: the guest's memory is the sum of its cells
    if mib < 1:
        b.error("/domain/memory", f"{d.memory.value} {d.memory.unit} is less than the 1 MiB QEMU needs")
        return
    if d.currentMemory is not None and d.currentMemory.kib > d.memory.kib:
        b.error("/domain/currentMemory", "is larger than <memory>")
    parts = [f"size={mib}M"]
    if d.maxMemory is not None:
        if d.maxMemory.slots is None:
            b.error("/domain/maxMemory/@slots", "required attribute is missing")
        elif d.maxMemory.kib < d.memory.kib:
            b.error("/domain/maxMemory", "is smaller than <memory>")
        else:
            parts += [f"slots={d.maxMemory.slots}", f"maxmem={d.maxMemory.kib}k"]
    b.add("-m", ",".join(parts))
    if cells:
        _numa(b, cells)


def _numa(b: Builder, cells) -> None:  # type: ignore[no-untyped-def]
    """One memory backend and one -numa node per <cell>; distances as -numa dist."""
    from qemud.domain.cpu import parse_cpuset
    n = b.domain.vcpus
    ids = [c.id if c.id is not None else i for i, c in enumerate(cells)]
    if sorted(ids) != list(range(len(cells))):
        b.error("/domain/cpu/numa", "cell ids must be 0, 1, ... in order")
        return
    seen_cpus: set[int] = set()
    for i, c in enumerate(cells):
        path = f"/domain/cpu/numa/cell[{i + 1}]"
        cpus = sorted(parse_cpuset(c.cpus)) if c.cpus else []
        if any(x >= n for x in cpus):
            b.error(f"{path}/@cpus", f"names a vCPU beyond the {n} the guest has")
            return
        if seen_cpus & set(cpus):
            b.error(f"{path}/@cpus", "a vCPU is in two cells")
            return
        seen_cpus |= set(cpus)
        backend = {"qom-type": "memory-backend-memfd" if c.memAccess == "shared" else "memory-backend-ram",
                   "id": f"ram-node{ids[i]}", "size": c.mib * 1024 * 1024}
        if c.memAccess == "shared":
            backend["share"] = True
        if c.discard:
            backend["discard-data"] = True
        b.obj(backend)
        spec = [f"nodeid={ids[i]}"]
        for lo, hi in _ranges(cpus):
            spec.append(f"cpus={lo}" if lo == hi else f"cpus={lo}-{hi}")
        spec.append(f"memdev=ram-node{ids[i]}")
        b.add("-numa", "node," + ",".join(spec))
    for i, c in enumerate(cells):
        if c.distances is None:
            continue
        for s in c.distances.sibling:
            if s.id not in ids:
                b.error(f"/domain/cpu/numa/cell[{i + 1}]/distances", f"sibling {s.id} is not a cell")
                return
            b.add("-numa", f"dist,src={ids[i]},dst={s.id},val={s.value}")


def _ranges(xs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for x in xs:
        if out and out[-1][1] == x - 1:
            out[-1] = (out[-1][0], x)
        else:
            out.append((x, x))
    return out


def add_smp(b: Builder) -> None:
    d = b.domain
    n = d.vcpus
    if n < 1:
        b.error("/domain/vcpu", "a guest needs at least one vCPU")
        return
    limit = min(MAX_VCPUS, b.machine.cpu_max)
    if n > limit:
        b.error("/domain/vcpu", f"{n} vCPUs is more than machine {b.machine.name} takes ({limit})")
        return
    online = d.vcpus_online
    if online < 1 or online > n:
        b.error("/domain/vcpu/@current", f"must be between 1 and the vCPU count {n}")
        return
    topo = d.cpu.topology if d.cpu is not None else None
    if topo is not None:
        if 0 in (topo.sockets, topo.dies, topo.cores, topo.threads, topo.clusters):
            b.error("/domain/cpu/topology", "sockets, dies, cores and threads must all be at least 1")
            return
        total = topo.sockets * topo.dies * topo.clusters * topo.cores * topo.threads
        if total != n:
            b.error("/domain/cpu/topology", f"{topo.sockets} sockets x {topo.dies} dies x {topo.cores} cores x "
                    f"{topo.threads} threads = {total} vCPUs, but <vcpu> says {n}")
            return
        if topo.clusters != 1:
            b.error("/domain/cpu/topology/@clusters", "clusters exist on ARM only")
            return
        sockets, dies, cores, threads = topo.sockets, topo.dies, topo.cores, topo.threads
    else:
        sockets, dies, cores, threads = n, 1, 1, 1
    parts = [str(online), f"sockets={sockets}"]
    if dies != 1:
        parts.append(f"dies={dies}")
    parts += [f"cores={cores}", f"threads={threads}"]
    if online != n:
        parts.append(f"maxcpus={n}")
    b.add("-smp", ",".join(parts))


def add_identity(b: Builder) -> None:
    d = b.domain
    b.add("-uuid", d.uuid_value)
    if d.genid is not None:
        import uuid as uuidlib
        guid = d.genid.value
        if guid:
            try:
                guid = str(uuidlib.UUID(guid))
            except ValueError:
                b.error("/domain/genid", f"'{guid}' is not a UUID")
                return
        else:
            guid = str(uuidlib.uuid5(uuidlib.UUID(d.uuid_value), "genid"))
        b.device({"driver": "vmgenid", "guid": guid, "id": "vmgenid0"})


def add_clock(b: Builder) -> None:
    d = b.domain
    clock = d.clock
    rtc: list[tuple[str, object]] = []
    if clock is None or clock.offset == "utc":
        rtc.append(("base", "utc"))
    elif clock.offset == "localtime":
        rtc.append(("base", "localtime"))
    elif clock.offset == "variable":
        import datetime
        adj_s = (clock.adjustment or "0").strip()
        adj = int(adj_s) if re.fullmatch(r"[-+]?[0-9]{1,12}", adj_s) else None
        if adj is None or abs(adj) > 100 * 365 * 86400:
            b.error("/domain/clock/@adjustment", f"'{clock.adjustment}' is not a number of seconds within 100 years")
            return
        if (clock.basis or "utc") == "localtime":
            b.error("/domain/clock/@basis", "basis='localtime' is not supported; use utc")
            return
        try:
            now = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=adj)
        except OverflowError:
            b.error("/domain/clock/@adjustment", f"'{clock.adjustment}' is out of range")
            return
        rtc.append(("base", now.strftime("%Y-%m-%dT%H:%M:%S")))
    elif clock.offset == "timezone":
        tz = clock.timezone or ""
        if not tz or any(c in tz for c in "\n\0") or tz.startswith("/") or ".." in tz:
            b.error("/domain/clock/@timezone", f"'{tz}' is not a time zone name like Europe/Paris")
            return
        rtc.append(("base", "localtime"))
        b.env["TZ"] = tz
    elif clock.offset == "absolute":
        import datetime
        try:
            start = datetime.datetime.fromtimestamp(clock.start or 0, datetime.timezone.utc)
        except (ValueError, OverflowError, OSError):
            b.error("/domain/clock/@start", f"{clock.start} is not a time QEMU can start the clock at")
            return
        rtc.append(("base", start.strftime("%Y-%m-%dT%H:%M:%S")))
    for ti, t in enumerate(clock.timer if clock else ()):
        path = f"/domain/clock/timer[{ti + 1}]"
        if t.name == "rtc":
            if t.track is not None:
                rtc.append(("clock", {"boot": "vm", "guest": "vm", "wall": "host", "realtime": "rt"}[t.track]))
            if t.tickpolicy == "catchup":
                rtc.append(("driftfix", "slew"))
            elif t.tickpolicy not in (None, "delay"):
                b.error(f"{path}/@tickpolicy", f"RTC tick policy '{t.tickpolicy}' is not supported by QEMU")
        elif t.name == "pit":
            if t.tickpolicy is not None and d.kvm:
                policy = {"delay": "delay", "catchup": "slew", "discard": "discard"}.get(t.tickpolicy)
                if policy is None:
                    b.error(f"{path}/@tickpolicy", f"PIT tick policy '{t.tickpolicy}' is not supported by QEMU")
                else:
                    b.add("-global", f"kvm-pit.lost_tick_policy={policy}")
        elif t.name in ("hpet", "kvmclock"):
            pass  # machine / cpu properties
        elif t.name == "tsc":
            if t.frequency:
                b.warn(f"{path}", "the TSC frequency is only applied under KVM")
        elif t.name == "hypervclock":
            pass  # a CPU property (hv-time), with the CPU
        elif t.name == "platform":
            b.error(f"{path}/@name", "the platform timer is not supported by QEMU")
    b.add("-rtc", opts(*rtc))


def add_lifecycle(b: Builder) -> None:
    """QEMU always runs with -no-shutdown and -no-reboot: a guest poweroff or reboot leaves QEMU
    in its 'shutdown' state and qemud applies on_poweroff, on_reboot and on_crash itself, even
    when it happened while the daemon was down."""
    d = b.domain
    for name in ("on_poweroff", "on_reboot", "on_crash"):
        action = getattr(d, name)
        if action is None:
            continue
        if action.value in ("rename-restart", "coredump-destroy", "coredump-restart"):
            b.error(f"/domain/{name}", f"action '{action.value}' is not supported by qemud; use destroy, restart or preserve")
    b.add("-no-shutdown")
    # a guest reboot is a shutdown too: qemud relaunches QEMU for on_reboot='restart' (a fresh
    # QEMU boots the test guest in 1.5 s under TCG, a reset in place takes 1.7-2.5 s)
    b.add("-no-reboot")
    if d.on_crash is not None and d.on_crash.value == "preserve":
        b.add("-action", "panic=pause")
    pm = d.pm
    if pm is not None:
        lpc = "ICH9-LPC" if b.q35 else "PIIX4_PM"
        if pm.suspend_to_mem is not None:
            b.add("-global", f"{lpc}.disable_s3={0 if pm.suspend_to_mem.enabled else 1}")
        if pm.suspend_to_disk is not None:
            b.add("-global", f"{lpc}.disable_s4={0 if pm.suspend_to_disk.enabled else 1}")


def add_boot(b: Builder) -> None:
    d = b.domain
    o = d.os
    parts: list[tuple[str, object]] = []
    if o.bootmenu is not None:
        parts.append(("menu", o.bootmenu.enable))
        if o.bootmenu.timeout is not None:
            if o.bootmenu.timeout > 65535:
                b.error("/domain/os/bootmenu/@timeout", "must be at most 65535 milliseconds")
            parts.append(("splash-time", o.bootmenu.timeout))
    if o.bios is not None:
        if o.bios.useserial:
            b.error("/domain/os/bios/@useserial", "the SeaBIOS serial console (sgabios) is not in QEMU 7.2")
        if o.bios.rebootTimeout is not None:
            if not -1 <= o.bios.rebootTimeout <= 65535:
                b.error("/domain/os/bios/@rebootTimeout", "must be between -1 and 65535")
            else:
                parts.append(("reboot-timeout", o.bios.rebootTimeout))
    parts.append(("strict", True))
    b.add("-boot", opts(*parts))
    if o.kernel is not None and o.kernel.value:
        b.add("-kernel", o.kernel.value)
    if o.initrd is not None and o.initrd.value:
        if o.kernel is None:
            b.error("/domain/os/initrd", "an initrd needs a <kernel>")
        if "," in o.initrd.value:
            # with a multiboot kernel QEMU reads -initrd as 'file1 args,file2,...' (its docs):
            # '/boot/a,/etc/shadow' would load a second file into the guest
            b.error("/domain/os/initrd", f"QEMU reads ',' in an initrd path as a list of (multiboot) "
                    f"modules; {o.initrd.value!r} needs a name without ','")
        b.add("-initrd", o.initrd.value)
    if o.cmdline is not None and o.cmdline.value:
        if o.kernel is None:
            b.error("/domain/os/cmdline", "a kernel command line needs a <kernel>")
        b.add("-append", o.cmdline.value)
