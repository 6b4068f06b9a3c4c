"""``<rng>``, ``<memballoon>``, ``<watchdog>``, ``<panic>``, and the ``vmcoreinfo`` feature."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.qemuopts import opts
from qemud.argv.virtio import add_virtio_props


def add_rngs(b: Builder) -> None:
    for i, r in enumerate(b.domain.devices.rng):
        path = f"/domain/devices/rng[{i + 1}]"
        oid = f"objrng{i}"
        be = r.backend
        if be.model == "random":
            src = be.path or "/dev/urandom"
            if src not in ("/dev/random", "/dev/urandom", "/dev/hwrng"):
                b.error(f"{path}/backend", f"'{src}' is not a random source (/dev/random, /dev/urandom or /dev/hwrng)")
                continue
            b.obj({"qom-type": "rng-random", "id": oid, "filename": src})
        elif be.model == "builtin":
            b.obj({"qom-type": "rng-builtin", "id": oid})
        elif be.model == "egd":
            from qemud.argv.chardev import chardev
            from qemud.domain.devices.chardev import CharDev
            from pydantic import ValidationError
            try:
                cd = CharDev.model_validate({"@type": be.type or "tcp",
                                         "source": [s.model_dump(by_alias=True, exclude_none=True) for s in be.source],
                                             **({"protocol": be.protocol.model_dump(by_alias=True)} if be.protocol else {})})
            except ValidationError:
                b.error(f"{path}/backend/@type", f"'{be.type}' is not a character device type")
                continue
            cid = f"charrng{i}"
            if not chardev(b, cd, cid, f"{path}/backend"):
                continue
            b.obj({"qom-type": "rng-egd", "id": oid, "chardev": cid})
        driver = {"virtio": "virtio-rng-pci", "virtio-transitional": "virtio-rng-pci-transitional",
                  "virtio-non-transitional": "virtio-rng-pci-non-transitional"}[r.model]
        props: dict[str, Any] = {"driver": driver, "rng": oid, "id": b.alias(r.alias, f"rng{i}", path)}
        if r.rate is not None:
            props["max-bytes"] = r.rate.bytes
            props["period"] = r.rate.period or 1000
        props.update(b.pci_props(r.address, path, "virtio RNG"))
        b.device(add_virtio_props(b, props, r.driver, path))


def add_balloon(b: Builder) -> None:
    mb = b.domain.devices.memballoon
    model = mb.model if mb is not None else "virtio"  # libvirt adds one when absent
    if model == "none":
        return
    path = "/domain/devices/memballoon"
    if model == "xen":
        b.error(f"{path}/@model", "a Xen balloon does not exist in QEMU guests")
        return
    driver = {"virtio": "virtio-balloon-pci", "virtio-transitional": "virtio-balloon-pci-transitional",
              "virtio-non-transitional": "virtio-balloon-pci-non-transitional"}[model]
    props: dict[str, Any] = {"driver": driver, "id": b.alias(mb.alias if mb else None, "balloon0", path)}
    if mb is not None:
        if mb.autodeflate is not None:
            props["deflate-on-oom"] = mb.autodeflate
        if mb.freePageReporting is not None:
            props["free-page-reporting"] = mb.freePageReporting
    props.update(b.pci_props(mb.address if mb else None, path, "memory balloon"))
    b.device(add_virtio_props(b, props, mb.driver if mb else None, path))
    if mb is not None and mb.stats is not None:
        # QEMU has no option for it: libvirt sets it over QMP too
        b.qmp_setup.append(("qom-set", {"path": f"/machine/peripheral/{props['id']}",
                                        "property": "guest-stats-polling-interval", "value": mb.stats.period}))


def add_watchdogs(b: Builder) -> None:
    wds = b.domain.devices.watchdog
    actions = set()
    for i, w in enumerate(wds):
        path = f"/domain/devices/watchdog[{i + 1}]"
        if w.action == "dump":
            # libvirt realizes 'dump' as QEMU's 'pause' and writes a core dump itself when the
            # WATCHDOG event comes, then resumes the guest.  qemud does the pause only: on the
            # event the guest stops (state paused, logged); nothing is dumped or resumed for it.
            b.warn(f"{path}/@action", "action 'dump' pauses the guest when the watchdog fires; qemud writes "
                   "no core dump (take one with QMP dump-guest-memory, then resume or destroy the guest)")
        actions.add(w.action)
        wid = b.alias(w.alias, f"watchdog{i}", path)
        if w.model == "i6300esb":
            b.device({"driver": "i6300esb", "id": wid, **b.pci_props(w.address, path, "watchdog")})
        elif w.model == "ib700":
            b.device({"driver": "ib700", "id": wid})
        elif w.model == "itco":
            if not b.q35:
                b.error(f"{path}/@model", "the iTCO watchdog is part of q35's ICH9 only")
                continue
            b.add("-global", "ICH9-LPC.noreboot=off")
        else:
            b.error(f"{path}/@model", f"watchdog model '{w.model}' does not exist on x86")
    if len(actions) > 1:
        b.error("/domain/devices/watchdog", "all watchdogs must have the same action")
    elif actions:
        action = actions.pop()
        qa = {"reset": "reset", "shutdown": "shutdown", "poweroff": "poweroff", "pause": "pause",
              "none": "none", "inject-nmi": "inject-nmi", "dump": "pause"}[action]
        b.add("-action", opts(("watchdog", qa)))


def add_panics(b: Builder) -> None:
    for i, p in enumerate(b.domain.devices.panic):
        path = f"/domain/devices/panic[{i + 1}]"
        model = p.model or "isa"
        if model == "isa":
            props: dict[str, Any] = {"driver": "pvpanic"}
            if p.address is not None and p.address.type == "isa" and p.address.iobase is not None:
                props["ioport"] = p.address.iobase
            b.device(props)
        elif model == "pvpanic":
            b.device({"driver": "pvpanic-pci", **b.pci_props(p.address, path, "pvpanic")})
        elif model == "hyperv":
            pass  # the vCPU's hv-crash feature (add_cpu): no device

        else:
            b.error(f"{path}/@model", f"panic model '{model}' does not exist on x86")
    f = b.domain.features
    if f is not None and f.vmcoreinfo is not None and f.vmcoreinfo.state:
        b.device({"driver": "vmcoreinfo"})
