"""The machine: type, accelerator, CPU, memory, topology, firmware, boot, clock, features, PM."""

from __future__ import annotations

import re
from pathlib import Path

from qemud.argv.builder import Builder, Prepare
from qemud.argv.memory import memory_machine_props
from qemud.argv.qemuopts import js, opts
from qemud.domain.cpu import MAX_VCPUS

# QEMU's names for libvirt's CPU feature names where they differ
_FEATURE_ALIASES = {"pclmuldq": "pclmulqdq", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ds_cpl": "ds-cpl",
                    "lahf_lm": "lahf-lm", "cmp_legacy": "cmp-legacy", "osxsave": "osxsave"}


def add_machine(b: Builder) -> None:
    d = b.domain
    props: list[tuple[str, object]] = [("type", b.machine.name)]
    props.append(("usb", False))
    props += memory_machine_props(b)
    f = d.features
    if f is not None and f.vmport is not None:
        props.append(("vmport", f.vmport.state))
    if f is not None and f.smm is not None:
        props.append(("smm", f.smm.state))
        _tseg(b)
    if f is not None and f.ps2 is not None:
        # the i8042 controller that PS/2 mouse and keyboard sit on
        props.append(("i8042", f.ps2.state))
        if not f.ps2.state:
            for i, inp in enumerate(d.devices.input):
                if inp.bus == "ps2" or (inp.bus is None and inp.type in ("mouse", "keyboard")):
                    b.error(f"/domain/devices/input[{i + 1}]/@bus", "sits on PS/2, which <features><ps2 "
                            "state='off'/> removes; use bus='usb' or 'virtio'")
    if f is not None and f.ioapic is not None:
        # libvirt: the IOAPIC in QEMU (split irqchip, what an emulated IOMMU's interrupt
        # remapping needs) or in the KVM kernel module
        if f.ioapic.driver == "kvm" and not d.kvm:
            b.error("/domain/features/ioapic/@driver", "driver='kvm' puts the IOAPIC in KVM and needs "
                    "type='kvm'; under emulation use driver='qemu'")
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
    b.add("-accel", _accel(b))


def _accel(b: Builder) -> str:
    """-accel: kvm (with its dirty ring size) or tcg (with its translation cache size)."""
    d = b.domain
    f = d.features
    accel: list[tuple[str, object]] = []
    ring = f.kvm.dirty_ring if f is not None and f.kvm is not None else None
    if ring is not None and ring.state:
        if ring.size is None:
            b.error("/domain/features/kvm/dirty-ring/@size", "state='on' needs a size (a power of 2 "
                    "between 1024 and 65536 entries)")
        elif ring.size < 1024 or ring.size > 65536 or ring.size & (ring.size - 1):
            b.error("/domain/features/kvm/dirty-ring/@size", f"{ring.size} is not a power of 2 between "
                    "1024 and 65536")
        elif d.kvm:
            accel.append(("dirty-ring-size", ring.size))
        else:
            # libvirt sets it on the KVM accelerator only; TCG tracks dirty pages itself
            b.warn("/domain/features/kvm/dirty-ring", "applies to type='kvm' only; ignored under emulation")
    tcg = f.tcg if f is not None else None
    if tcg is not None and tcg.tb_cache is not None:
        mib, rest = divmod(tcg.tb_cache.bytes, 1024 * 1024)
        if d.kvm:
            b.error("/domain/features/tcg", "TCG settings need type='qemu' (this guest runs under KVM)")
        elif rest or mib < 1:
            b.error("/domain/features/tcg/tb-cache", "must be a whole number of MiB (QEMU's tb-size unit), "
                    "at least 1 MiB")
        else:
            accel.append(("tb-size", mib))
    name = "kvm" if d.kvm else "tcg"
    return name + ("," + opts(*accel) if accel else "")


def _tseg(b: Builder) -> None:
    """<smm><tseg>: q35's extended TSEG size, in MiB (libvirt's checks)."""
    f = b.domain.features
    assert f is not None and f.smm is not None
    tseg = f.smm.tseg
    if tseg is None:
        return
    path = "/domain/features/smm/tseg"
    if not f.smm.state:
        b.error(path, "a TSEG size needs SMM on (state='on')")
    elif not b.q35:
        b.error(path, f"SMM TSEG is only supported with q35 machine types, not {b.machine.name}")
    elif tseg.bytes % (1024 * 1024):
        b.error(path, f"{tseg.value} {tseg.unit} is not a whole number of MiB (QEMU sets the TSEG in MiB)")
    elif tseg.bytes // (1024 * 1024) > 0xFFFF:
        b.error(path, f"{tseg.value} {tseg.unit} is more than the 65535 MiB QEMU takes")
    else:
        b.add("-global", f"mch.extended-tseg-mbytes={tseg.bytes // (1024 * 1024)}")


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


def _firmware_checks(b: Builder) -> bool:
    """What libvirt refuses about <os> firmware before choosing any (qemuValidateDomainDefBoot,
    virDomainDefOSValidate)."""
    d = b.domain
    o = d.os
    loader = o.loader
    ok = True
    pflash = (o.firmware == "efi" or (loader is not None and loader.type == "pflash"))
    if loader is not None and loader.stateless is False and not pflash:
        if o.firmware == "bios":
            b.error("/domain/os/loader/@stateless", "only EFI firmware keeps NVRAM; BIOS is always stateless")
        else:
            b.error("/domain/os/loader/@stateless", "only a pflash loader keeps NVRAM; a ROM loader is always stateless")
        ok = False
    if o.firmware == "efi" and loader is not None and loader.secure is False:
        b.error("/domain/os/loader/@secure", "secure='no' cannot be given when the firmware is chosen automatically "
                "(firmware='efi'); say <firmware><feature enabled='no' name='secure-boot'/></firmware> instead")
        ok = False
    if o.firmware is None and o.firmware_features is not None and o.firmware_features.feature:
        b.error("/domain/os/firmware", "firmware features choose among firmwares, which needs <os firmware='efi'>; "
                "with a loader named by hand they mean nothing")
        ok = False
    if o.firmware is None and loader is not None and loader.type == "pflash" and not loader.path:
        b.error("/domain/os/loader", "a pflash loader needs its path (or use <os firmware='efi'> to have one chosen)")
        ok = False
    if loader is not None and loader.stateless:
        nv = o.nvram
        if nv is not None and nv.template:
            b.error("/domain/os/nvram/@template", "a stateless loader has no NVRAM, so no NVRAM template")
            ok = False
        elif nv is not None:
            b.error("/domain/os/nvram", "a stateless loader keeps no NVRAM; drop <nvram> or stateless='yes'")
            ok = False
    return ok


def _firmware(b: Builder) -> list[tuple[str, object]]:
    """-bios for ROM loaders; pflash drives for UEFI (read-only code + per-domain NVRAM)."""
    d = b.domain
    loader = d.os.loader
    if not _firmware_checks(b):
        return []
    auto = select_firmware(b)
    if isinstance(auto, str):
        b.error("/domain/os/@firmware", auto)
        return []
    pflash = auto is not None or (loader is not None and loader.type == "pflash")
    if pflash and (d.features is None or d.features.acpi is None):
        # libvirt: "UEFI requires ACPI on this architecture"; OVMF boots nothing without it
        b.error("/domain/features", "UEFI firmware needs ACPI on x86: add <features><acpi/></features>")
        return []
    if auto is not None:
        # the selection fills in what the file leaves out: libvirt's behaviour
        from qemud.domain.osxml import Loader, Nvram
        loader = Loader.model_validate({"@type": "pflash", "@readonly": "yes", "@format": auto["format"],
                                        **({"@secure": "yes"} if auto["smm"] else {}),
                                        **({"@stateless": "yes"} if loader is not None and loader.stateless else {}),
                                        "#text": auto["code"]})
        nv = d.os.nvram
        if auto["vars"] and (nv is None or not nv.template) and not loader.stateless:
            nv = (Nvram.model_validate({**({"#text": nv.path} if nv is not None and nv.path else {}),
                                        "@template": auto["vars"]})
                  if nv is None or nv.source is None else nv.model_copy(update={"template": auto["vars"]}))
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
    readonly = loader.readonly if loader.readonly is not None else True
    fmt = loader.format or "raw"
    b.add("-blockdev", js({"driver": "file", "filename": loader.path, "node-name": "pflash0-file",
                           "auto-read-only": True, "discard": "unmap"}))
    b.add("-blockdev", js({"node-name": "pflash0", "read-only": readonly, "driver": fmt,
                           "file": "pflash0-file"}))
    out: list[tuple[str, object]] = [("pflash0", "pflash0")]
    b.elements["pflash0"] = "/domain/os/loader"
    b.elements["pflash1"] = "/domain/os/nvram"
    if loader.secure:
        b.secure_boot = True
        b.add("-global", "driver=cfi.pflash01,property=secure,value=on")
    if loader.stateless:
        # no variable store at all: the firmware runs with its built-in defaults, and nothing
        # the guest sets survives (libvirt's stateless='yes')
        return out
    if not readonly:
        if nv is not None:
            b.error("/domain/os/nvram", "a writable loader keeps its own variables; <nvram> needs readonly='yes'")
        return out
    if nv is not None and nv.type == "network":
        return out + _nvram_network(b, nv)
    if nv is not None and nv.source is not None and not nv.file:
        b.error("/domain/os/nvram/source", "an NVRAM <source> of type='file' needs file='...' (type='block': dev='...')")
        return out
    nv_file = nv.file if nv is not None else None
    nv_path = Path(nv_file) if nv_file else b.paths.nvram(nv.template if nv else None)
    template = nv.template if nv is not None else None
    if template is None and nv_file:
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
    driver = "host_device" if nv is not None and nv.type == "block" else "file"
    b.add("-blockdev", js({"driver": driver, "filename": str(nv_path), "node-name": "pflash1-file",
                           "auto-read-only": True, "discard": "unmap"}))
    b.add("-blockdev", js({"node-name": "pflash1", "read-only": False, "driver": nv_fmt,
                           "file": "pflash1-file"}))
    out.append(("pflash1", "pflash1"))
    return out


def _nvram_network(b: Builder, nv) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    """<nvram type='network'>: the variable store on an NBD/iSCSI/... server, as a disk's.
    No template is copied there: the store must exist on the server."""
    from types import SimpleNamespace

    from qemud.argv.disks import _network
    if nv.template:
        b.error("/domain/os/nvram/@template", "a network NVRAM is not created from a template; "
                "it must already exist on the server")
        return []
    src = nv.source
    if src is None or not src.protocol:
        b.error("/domain/os/nvram/source", "a network NVRAM needs <source protocol='...'>")
        return []
    props: dict[str, object] = {"node-name": "pflash1-file"}
    fake = SimpleNamespace(source=src, auth=None)
    n = len(b.problems)
    ok = _network(b, fake, "/domain/os/nvram", src.protocol, props)  # type: ignore[arg-type]
    if not ok or len(b.problems) > n:
        return []
    props.update({"auto-read-only": True, "discard": "unmap"})
    b.add("-blockdev", js(props))
    b.add("-blockdev", js({"node-name": "pflash1", "read-only": False, "driver": nv.format or "raw",
                           "file": "pflash1-file"}))
    return [("pflash1", "pflash1")]


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
        _check_cpu(b)
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
                b.error("/domain/cpu/model", f"CPU model '{model}' is not known to {b.caps.emulator}")
        features += _cpu_features(b)
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
        elif t.name == "tsc" and t.frequency:
            # the frequency the guest is told (CPUID); under KVM the host must be able to scale
            # its TSC to it, which QEMU checks when it starts
            features.append(f"tsc-frequency={t.frequency}")
    features += _hyperv(b)
    features += _kvm_features(b)
    if any(p.model == "hyperv" for p in d.devices.panic):
        features.append("hv-crash=on")  # the Hyper-V crash MSRs report a guest panic
    if features and model is None:
        model = "qemu64"  # QEMU's default x86 model, with the asked-for changes
    b.cpu_model = model or "qemu64"
    if model is not None:
        b.add("-cpu", ",".join([model, *features]))


def _check_cpu(b: Builder) -> None:
    """libvirt's checks of <cache> and <maxphysaddr> (qemuValidateDomainDefCpu)."""
    cpu = b.domain.cpu
    assert cpu is not None
    host_like = cpu.mode in ("host-passthrough", "maximum")
    c = cpu.cache
    if c is not None:
        if c.mode == "emulate" and c.level != 3:
            b.error("/domain/cpu/cache/@level", "CPU cache mode 'emulate' can only be used with level='3'")
        elif c.mode in ("passthrough", "disable") and c.level is not None:
            b.error("/domain/cpu/cache/@level", f"CPU cache mode '{c.mode}' takes no level "
                    "(it applies to every cache level)")
        elif c.mode == "passthrough" and not host_like:
            b.error("/domain/cpu/cache/@mode", "CPU cache mode 'passthrough' can only be used with "
                    "'host-passthrough' / 'maximum' CPUs")
    m = cpu.maxphysaddr
    if m is not None:
        if m.mode == "emulate" and m.bits is None:
            b.error("/domain/cpu/maxphysaddr/@bits", "mode='emulate' needs bits= (the guest's physical "
                    "address width)")
        elif m.mode == "passthrough" and m.bits is not None:
            b.error("/domain/cpu/maxphysaddr/@bits", "bits= cannot be used with mode='passthrough' "
                    "(the width is the host's)")
        elif m.mode == "passthrough" and not host_like:
            b.error("/domain/cpu/maxphysaddr/@mode", "mode='passthrough' can only be used with "
                    "'host-passthrough' / 'maximum' CPUs")


def _cpu_features(b: Builder) -> list[str]:
    """<feature policy name>: QEMU CPU properties.  A feature this QEMU does not know at all (no
    model it emulates has it, e.g. pconfig in 7.2) is left out when disabled, as libvirt does,
    and refused when the guest is to have it."""
    cpu = b.domain.cpu
    assert cpu is not None
    known = b.caps.cpu_props
    out: list[str] = []
    for i, feat in enumerate(cpu.feature):
        path = f"/domain/cpu/feature[{i + 1}]"
        name = _FEATURE_ALIASES.get(feat.name, feat.name)
        if known and name not in known and feat.name not in known:
            qemu = f"{b.caps.emulator} {'.'.join(map(str, b.caps.version))}"
            if feat.policy in ("force", "require"):
                b.error(f"{path}/@name", f"CPU feature '{feat.name}' is not known to {qemu}, so no "
                        f"guest CPU it emulates can have it (policy='{feat.policy}'); remove it or "
                        "use policy='optional'")
            else:
                b.warn(f"{path}/@name", f"CPU feature '{feat.name}' is not known to {qemu}; no CPU it "
                       "emulates has it, so the guest goes without it")
            continue
        if feat.policy in ("force", "require"):
            out.append(f"{name}=on")
        elif feat.policy in ("disable", "forbid"):
            out.append(f"{name}=off")
    return out


#: libvirt's <hyperv> children that are plain on/off -> QEMU's CPU property
_HV_FLAGS = {"relaxed": "hv-relaxed", "vapic": "hv-vapic", "vpindex": "hv-vpindex",
             "runtime": "hv-runtime", "synic": "hv-synic", "stimer": "hv-stimer", "reset": "hv-reset",
             "frequencies": "hv-frequencies", "reenlightenment": "hv-reenlightenment",
             "tlbflush": "hv-tlbflush", "ipi": "hv-ipi", "evmcs": "hv-evmcs", "avic": "hv-avic",
             "emsr_bitmap": "hv-emsr-bitmap", "xmm_input": "hv-xmm-input"}
#: Hyper-V enlightenments QEMU's TCG cannot provide: QEMU 7.2 refuses to start with them
#: ("kernel doesn't allow setting HyperV VP_INDEX")
_HV_NEED_KVM = {"vpindex": "the virtual processor index"}


def _hyperv(b: Builder) -> list[str]:
    """<features><hyperv>: libvirt's hv-* CPU properties; switched-off ones are left out, as
    libvirt leaves them (QEMU's default is off)."""
    from qemud.argv.qemuopts import escape
    d = b.domain
    hv = d.features.hyperv if d.features is not None else None
    if hv is None:
        return []
    base = "/domain/features/hyperv"
    out: list[str] = []
    if hv.mode == "passthrough":
        out.append("hv-passthrough=on")
        if not d.kvm:
            b.warn(f"{base}/@mode", "passthrough gives the guest the enlightenments the host's KVM "
                   "offers; under emulation that is none (name them with mode='custom' instead)")
    for name, prop in _HV_FLAGS.items():
        el = getattr(hv, name)
        if el is None or not el.state:
            continue
        if name in _HV_NEED_KVM and not d.kvm:
            b.error(f"{base}/{name}", f"{_HV_NEED_KVM[name]} ({prop}) needs type='kvm': QEMU's TCG "
                    "cannot provide it; switch it off (state='off') to emulate the guest")
            continue
        out.append(f"{prop}=on")
        if name == "stimer" and hv.stimer is not None and hv.stimer.direct is not None and hv.stimer.direct.state:
            out.append("hv-stimer-direct=on")
        if name == "tlbflush" and hv.tlbflush is not None:
            if hv.tlbflush.direct is not None and hv.tlbflush.direct.state:
                out.append("hv-tlbflush-direct=on")
            if hv.tlbflush.extended is not None and hv.tlbflush.extended.state:
                out.append("hv-tlbflush-ext=on")
    if hv.spinlocks is not None and hv.spinlocks.state:
        r = hv.spinlocks.retries
        if r is None:
            b.error(f"{base}/spinlocks/@retries", "state='on' needs retries (at least 4095)")
        elif r < 0xFFF or r > 0xFFFFFFFF:
            b.error(f"{base}/spinlocks/@retries", f"{r} is not between 4095 and 4294967295")
        else:
            out.append(f"hv-spinlocks={r:#x}")
    if hv.vendor_id is not None and hv.vendor_id.state:
        v = hv.vendor_id.value
        if not v:
            b.error(f"{base}/vendor_id/@value", "state='on' needs a value (up to 12 characters)")
        elif len(v.encode()) > 12:
            b.error(f"{base}/vendor_id/@value", f"'{v}' is longer than the 12 characters a vendor id has")
        else:
            out.append(f"hv-vendor-id={escape(v)}")
    return out


def _kvm_features(b: Builder) -> list[str]:
    """<features><kvm>: libvirt's mapping onto QEMU's CPU properties (pv-ipi is on by default,
    the others off, so only changes from that are written)."""
    d = b.domain
    k = d.features.kvm if d.features is not None else None
    if k is None:
        return []
    out: list[str] = []
    if k.hidden is not None and k.hidden.state:
        out.append("kvm=off")  # hides the KVM signature from the guest
    # KVM paravirt CPUID bits: QEMU's TCG filters them out (libvirt passes them all the same)
    for tag, el, prop in (("hint-dedicated", k.hint_dedicated, "kvm-hint-dedicated"),
                          ("poll-control", k.poll_control, "kvm-poll-control")):
        if el is not None and el.state:
            out.append(f"{prop}=on")
            if not d.kvm:
                b.warn(f"/domain/features/kvm/{tag}", "a KVM paravirtual feature: QEMU's TCG does not "
                       "offer it, so the emulated guest goes without it")
    if k.pv_ipi is not None and not k.pv_ipi.state:
        out.append("kvm-pv-ipi=off")
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
    states = _vcpu_states(b, n, online)
    if states is None:
        return
    initial, hotplugged = states
    parts = [str(initial), f"sockets={sockets}"]
    if dies != 1:
        parts.append(f"dies={dies}")
    parts += [f"cores={cores}", f"threads={threads}"]
    if initial != n:
        parts.append(f"maxcpus={n}")
    b.add("-smp", ",".join(parts))
    if not hotplugged:
        return
    driver = f"{b.cpu_model}-x86_64-cpu"
    if driver not in b.caps.devices and f"{b.cpu_model}-i386-cpu" in b.caps.devices:
        driver = f"{b.cpu_model}-i386-cpu"
    if not b.has_device(driver, "/domain/vcpus", "a hot-pluggable vCPU"):
        return
    for vid in hotplugged:
        # the vCPU's place in the topology, as QEMU numbers them (threads innermost)
        props: dict[str, object] = {"driver": driver, "id": f"vcpu{vid}",
                                    "socket-id": vid // (threads * cores * dies)}
        if dies != 1:
            props["die-id"] = vid // (threads * cores) % dies
        props["core-id"] = vid // threads % cores
        props["thread-id"] = vid % threads
        b.ids.add(f"vcpu{vid}")
        b.device(props)


def _vcpu_states(b: Builder, n: int, online: int) -> tuple[int, list[int]] | None:
    """<vcpus>: how many vCPUs QEMU creates at start, and the ids of the vCPUs that are online
    but hot-pluggable, in their hotplug order (without <vcpus>: <vcpu current>, none).
    Those go on the command line as CPU devices after the fixed ones ``-smp`` creates (libvirt
    plugs them over QMP once QEMU runs; on the command line they come up the same).  The fixed
    vCPUs must be the first ones: ``-smp k`` creates vCPUs 0..k-1.  None on an error."""
    vs = b.domain.vcpu_states
    if vs is None:
        return online, []
    base = "/domain/vcpus"
    states = vs.vcpu
    ids = [v.id for v in states]
    if sorted(ids) != list(range(n)):
        b.error(base, f"must list each of the {n} vCPUs (ids 0 to {n - 1}) once")
        return None
    enabled = sum(1 for v in states if v.enabled)
    if b.domain.vcpu is not None and b.domain.vcpu.current is not None and enabled != online:
        b.error(base, f"{enabled} vCPUs are enabled, but <vcpu current> says {online}")
        return None
    fixed = sorted(v.id for v in states if v.enabled and not v.hotpluggable)
    for i, v in enumerate(states):
        path = f"{base}/vcpu[{i + 1}]"
        if not v.enabled and v.hotpluggable is False:
            b.error(f"{path}/@hotpluggable", f"vCPU {v.id} is offline, so it must be hotpluggable")
            return None
    if 0 not in fixed:
        b.error(base, "vCPU 0 must be enabled and not hotpluggable")
        return None
    if fixed != list(range(len(fixed))):
        b.error(base, f"the vCPUs that are not hotpluggable must be the first ones (0 to {len(fixed) - 1}): "
                "QEMU creates those at start")
        return None
    plugged = [v for v in states if v.enabled and v.hotpluggable]
    orders = [v.order for v in plugged if v.order is not None]
    if len(set(orders)) != len(orders):
        b.error(base, "two vCPUs have the same order")
        return None
    plugged.sort(key=lambda v: (v.order is None, v.order or 0, v.id))
    return len(fixed), [v.id for v in plugged]


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
            # libvirt: the adjustment is from the host's local time, so the guest's clock starts
            # at UTC + the host's offset from UTC + the adjustment
            offset = datetime.datetime.now().astimezone().utcoffset()
            adj += int(offset.total_seconds()) if offset is not None else 0
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
        if t.catchup is not None:
            if t.tickpolicy != "catchup":
                b.error(f"{path}/catchup", "catch-up settings need tickpolicy='catchup'")
            else:
                b.warn(f"{path}/catchup", "QEMU catches up at its own pace (as under libvirt): threshold, "
                       "slew and limit are not applied")
        if t.name == "rtc":
            if t.track is not None:
                rtc.append(("clock", {"boot": "vm", "guest": "vm", "wall": "host", "realtime": "rt"}[t.track]))
            if t.tickpolicy == "catchup":
                rtc.append(("driftfix", "slew"))
            elif t.tickpolicy not in (None, "delay"):
                b.error(f"{path}/@tickpolicy", f"RTC tick policy '{t.tickpolicy}' is not supported by QEMU")
        elif t.name == "pit":
            if t.tickpolicy is not None:
                policy = {"delay": "delay", "catchup": "slew", "discard": "discard"}.get(t.tickpolicy)
                if policy is None:
                    b.error(f"{path}/@tickpolicy", f"PIT tick policy '{t.tickpolicy}' is not supported by QEMU")
                elif d.kvm:
                    b.add("-global", f"kvm-pit.lost_tick_policy={policy}")
                elif policy != "delay":
                    # QEMU's emulated i8254 has no lost-tick policy: only KVM's in-kernel PIT
                    b.warn(f"{path}/@tickpolicy", "the PIT tick policy applies to KVM's in-kernel PIT; "
                           "under emulation lost PIT ticks are not made up")
        elif t.name in ("hpet", "kvmclock"):
            pass  # machine / cpu properties
        elif t.name == "tsc":
            pass  # a CPU property (tsc-frequency), with the CPU
        elif t.name == "hypervclock":
            pass  # a CPU property (hv-time), with the CPU
        elif t.name == "platform":
            b.error(f"{path}/@name", "the platform timer is not supported by QEMU")
        elif t.name == "armvtimer":
            b.error(f"{path}/@name", "the ARM virtual timer exists on ARM guests only; qemud runs x86 guests")
        if t.track is not None and t.name != "rtc":
            b.error(f"{path}/@track", f"only the rtc timer follows a clock; the {t.name} timer has no track")
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
