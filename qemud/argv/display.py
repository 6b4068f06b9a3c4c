"""``<graphics>``, ``<video>``, ``<input>``, ``<sound>`` and ``<audio>``."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.qemuopts import js, opts
from qemud.argv.virtio import add_virtio_props, refuse_virtio_options

AUDIO_DRIVERS = {"none": "none", "alsa": "alsa", "pulseaudio": "pa", "sdl": "sdl", "spice": "spice",
                 "file": "wav", "oss": "oss", "jack": "jack", "dbus": "dbus"}


def add_graphics(b: Builder) -> None:
    gfx = b.domain.devices.graphics
    if not gfx:
        b.add("-display", "none")
        return
    kinds = [g.type for g in gfx]
    for i, g in enumerate(gfx):
        path = f"/domain/devices/graphics[{i + 1}]"
        if kinds.count(g.type) > 1:
            b.error(f"{path}/@type", f"only one {g.type} display is possible")
            continue
        listen = g.listen[0] if g.listen else None
        addr = g.listen_ or (listen.address if listen is not None and listen.type == "address" else None)
        if listen is not None and listen.type == "network":
            b.error(f"{path}/listen/@type", "listening on a libvirt network's address is not supported; give an address")
            continue
        if g.type == "vnc":
            sock = g.socket or (listen.socket if listen is not None and listen.type == "socket" else None)
            if listen is not None and listen.type == "socket" and not sock:
                sock = b.socket_path(b.paths.run / "vnc.sock", path)
            auto = False
            if listen is not None and listen.type == "none":
                spec = "none"
            elif sock:
                spec = f"unix:{sock}"
            else:
                host = addr or "127.0.0.1"
                if ":" in host and not host.startswith("["):
                    host = f"[{host}]"
                if g.autoport is True or (g.autoport is None and (g.port is None or g.port == -1)):
                    spec, auto = f"{host}:0", True  # QEMU takes the first free display from :0
                else:
                    port = g.port or 5900
                    if port < 5900:
                        b.error(f"{path}/@port", "VNC ports start at 5900")
                        continue
                    spec = f"{host}:{port - 5900}"
            b.add("-vnc", opts(("vnc", spec), ("to", 99) if auto else None,
                               ("password", True) if g.passwd else None,
                               ("websocket", g.websocket) if g.websocket is not None and g.websocket > 0 else None,
                               ("share", g.sharePolicy) if g.sharePolicy else None))
            if g.keymap:
                b.warn(f"{path}/@keymap", "QEMU's VNC keymaps are deprecated; the keymap is not set")
            if g.passwd:
                b.warn(f"{path}/@passwd", "the VNC password is set over QMP by qemud at start; run by hand, "
                       "QEMU refuses every VNC client until it is set")
        elif g.type == "spice":
            parts2: list[tuple[str, object] | None] = []
            if g.port is not None and g.port > 0:
                parts2.append(("port", g.port))
            elif g.autoport is not False and g.port in (None, -1) and g.tlsPort in (None, -1):
                b.warn(path, "SPICE autoport: QEMU picks no port by itself; using unix socket")
            if g.tlsPort is not None and g.tlsPort > 0:
                b.error(f"{path}/@tlsPort", "SPICE TLS needs certificates qemud does not manage yet")
                continue
            if listen is not None and listen.type == "socket":
                parts2 += [("unix", True), ("addr", listen.socket or b.socket_path(b.paths.run / "spice.sock", path))]
            elif addr:
                parts2.append(("addr", addr))
            if not g.passwd:
                parts2.append(("disable-ticketing", True))
            parts2.append(("seamless-migration", True))
            if not any(p and p[0] in ("port", "unix") for p in parts2):
                parts2 += [("unix", True), ("addr", b.socket_path(b.paths.run / "spice.sock", path))]
            b.add("-spice", opts(*parts2))
        elif g.type == "egl-headless":
            b.add("-display", "egl-headless")
        elif g.type in ("sdl", "desktop", "rdp"):
            b.error(f"{path}/@type", f"a {g.type} display needs a desktop session; qemud runs guests headless (use vnc or spice)")
        elif g.type == "dbus":
            b.error(f"{path}/@type", "the D-Bus display is not supported by qemud yet")


VIDEO_PRIMARY = {"vga": "VGA", "cirrus": "cirrus-vga", "vmvga": "vmware-svga", "qxl": "qxl-vga",
                 "virtio": "virtio-vga", "bochs": "bochs-display", "ramfb": "ramfb"}
VIDEO_SECONDARY = {"qxl": "qxl", "virtio": "virtio-gpu-pci", "bochs": "bochs-display"}


def add_video(b: Builder) -> None:
    videos = list(b.domain.devices.video)
    if not videos and b.domain.devices.graphics:
        # libvirt adds a VGA card when a display is asked for without one
        from qemud.domain.devices.misc import Video
        videos = [Video.model_validate({"model": {"@type": "vga"}})]
    for i, v in enumerate(videos):
        path = f"/domain/devices/video[{i + 1}]"
        model = v.model.type if v.model is not None else "vga"
        if model == "none":
            if len(videos) > 1:
                b.error(f"{path}/model/@type", "type 'none' cannot be combined with other video devices")
            continue
        table = VIDEO_PRIMARY if i == 0 else VIDEO_SECONDARY
        driver = table.get(model)
        if driver is None:
            b.error(f"{path}/model/@type", f"video model '{model}' cannot be {'the primary' if i == 0 else 'a secondary'} display in QEMU")
            continue
        if not b.has_device(driver, f"{path}/model/@type", f"video model '{model}'"):
            continue
        props: dict[str, Any] = {"driver": driver, "id": b.alias(v.alias, f"video{i}", path)}
        m = v.model
        if m is not None:
            if model == "qxl":
                if m.ram:
                    props["ram_size"] = m.ram * 1024
                if m.vram:
                    props["vram_size"] = m.vram * 1024
                if m.vram64 is not None:
                    props["vram64_size_mb"] = m.vram64 // 1024
                if m.vgamem:
                    props["vgamem_mb"] = m.vgamem // 1024
                if m.heads:
                    props["max_outputs"] = m.heads
            elif model in ("vga", "vmvga") and m.vram:
                props["vgamem_mb"] = max(1, m.vram // 1024)
            elif model == "virtio" and m.heads:
                props["max_outputs"] = m.heads
        if driver != "ramfb":
            props.update(b.pci_props(v.address, path, "video card"))
            if v.acpi is not None:
                props["acpi-index"] = v.acpi.index
        props = _video_driver(b, v, props, path)
        b.device(props)


def _video_driver(b: Builder, v, props: dict[str, Any], path: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """<video><driver>: the virtio options of a virtio GPU; name='vhostuser' (a GPU rendered by
    an external vhost-user-gpu process) is served by QEMU's own virtio GPU."""
    drv = v.driver
    if drv is None:
        return props
    if drv.vgaconf is not None:
        b.error(f"{path}/driver/@vgaconf", "a bhyve setting; qemud runs QEMU guests")
    if drv.name == "vhostuser":
        if not str(props["driver"]).startswith("virtio"):
            b.error(f"{path}/driver/@name", "a vhost-user GPU is a virtio one; use <model type='virtio'>")
        else:
            b.warn(f"{path}/driver/@name", "qemud has no vhost-user-gpu support: QEMU's built-in "
                   "virtio GPU renders the display instead")
    if str(props["driver"]).startswith("virtio"):
        return add_virtio_props(b, props, drv, path)
    refuse_virtio_options(b, drv, path, f"video model '{v.model.type if v.model else 'vga'}'")
    return props


def add_hubs(b: Builder) -> None:
    for i, h in enumerate(b.domain.devices.hub):
        path = f"/domain/devices/hub[{i + 1}]"
        if b.usb_bus is None:
            b.error(path, "a USB hub needs a USB controller")
            continue
        props: dict[str, Any] = {"driver": "usb-hub", "id": b.alias(h.alias, f"hub{i}", path), "bus": b.usb_bus}
        if h.address is not None and h.address.type == "usb" and h.address.port:
            props["port"] = h.address.port
        b.device(props)


def add_inputs(b: Builder) -> None:
    for i, inp in enumerate(b.domain.devices.input):
        path = f"/domain/devices/input[{i + 1}]"
        bus = inp.bus or ("usb" if inp.type == "tablet" else "ps2")
        iid = b.alias(inp.alias, f"input{i}", path)
        if inp.model in ("virtio-transitional", "virtio-non-transitional") and inp.type != "passthrough":
            b.error(f"{path}/@model", f"virtio (non-)transitional models are not supported for input type={inp.type}")
            continue
        if inp.type in ("passthrough", "evdev"):
            _host_input(b, inp, iid, path)
            continue
        if bus == "ps2":
            if inp.type == "tablet":
                b.error(f"{path}/@bus", "a tablet cannot sit on PS/2")
            continue  # the i8042 controller of pc and q35
        if bus == "usb":
            if b.usb_bus is None:
                b.error(f"{path}/@bus", "a USB input device needs a USB controller")
                continue
            driver = {"mouse": "usb-mouse", "keyboard": "usb-kbd", "tablet": "usb-tablet"}[inp.type]
            props: dict[str, Any] = {"driver": driver, "id": iid, "bus": b.usb_bus}
            refuse_virtio_options(b, inp.driver, path, "a USB input device")
            if inp.address is not None and inp.address.type == "usb" and inp.address.port:
                props["port"] = inp.address.port
            b.device(props)
        elif bus == "virtio":
            driver = {"mouse": "virtio-mouse-pci", "keyboard": "virtio-keyboard-pci", "tablet": "virtio-tablet-pci"}[inp.type]
            props = {"driver": driver, "id": iid, **b.pci_props(inp.address, path, "virtio input device")}
            b.device(add_virtio_props(b, props, inp.driver, path))
        else:
            b.error(f"{path}/@bus", f"input bus '{bus}' does not exist on x86 QEMU")


def _host_input(b: Builder, inp: Any, iid: str, path: str) -> None:
    """A host evdev device: grabbed by QEMU and fed to the guest's PS/2 devices (type='evdev',
    -object input-linux) or passed whole to a virtio-input-host-pci (type='passthrough')."""
    src = inp.source
    attr_name = "dev" if inp.type == "evdev" else "evdev"
    dev = getattr(src, attr_name) if src is not None else None
    if not dev:
        b.error(f"{path}/source/@{attr_name}", f"an input of type='{inp.type}' needs the host's event device "
                f"(<source {attr_name}='/dev/input/eventN'/>)")
        return
    if inp.type == "evdev":
        if inp.bus not in (None, "none") or inp.address is not None:
            b.error(f"{path}/@bus", "an evdev input is the host's device fed to the guest's own keyboard "
                    "and mouse: it has no bus or address")
            return
        refuse_virtio_options(b, inp.driver, path, "an evdev input")
        props: dict[str, Any] = {"qom-type": "input-linux", "id": iid, "evdev": dev}
        if src.grab == "all":
            props["grab_all"] = True
        if src.grabToggle:
            props["grab-toggle"] = src.grabToggle
        if src.repeat is not None:
            props["repeat"] = src.repeat
        b.obj(props)
    else:
        if inp.bus not in (None, "virtio"):
            b.error(f"{path}/@bus", "a passthrough input sits on virtio")
            return
        if src.grab or src.grabToggle or src.repeat is not None:
            b.error(f"{path}/source", "grab, grabToggle and repeat belong to type='evdev' inputs")
            return
        b.device(add_virtio_props(b, {"driver": "virtio-input-host-pci", "id": iid, "evdev": dev,
                                      **b.pci_props(inp.address, path, "virtio input device")},
                                  inp.driver, path))
    if not b.caps.host.has(dev):
        b.error(f"{path}/source/@{attr_name}", f"needs {dev}, which this host lacks (no such input event device)")


def add_audio(b: Builder) -> None:
    dev = b.domain.devices
    audios = list(dev.audio)
    ids: set[int] = set()
    for i, a in enumerate(audios):
        path = f"/domain/devices/audio[{i + 1}]"
        if a.id in ids:
            b.error(f"{path}/@id", f"two audio backends have id {a.id}")
            continue
        ids.add(a.id)
        drv = AUDIO_DRIVERS.get(a.type)
        if drv is None:
            b.error(f"{path}/@type", f"audio backend '{a.type}' is not available on Linux")
            continue
        props: dict[str, Any] = {"id": f"audio{a.id}", "driver": drv}
        if a.timerPeriod:
            props["timer-period"] = a.timerPeriod
        if a.type == "file" and a.path:
            props["path"] = a.path
        if a.type == "pulseaudio" and a.serverName:
            props["server"] = a.serverName
        b.add("-audiodev", js(props))
        if b.audiodev is None:
            b.audiodev = f"audio{a.id}"
    if not audios and (dev.sound or dev.graphics):
        # libvirt's default backend: spice's own when a spice display exists, else none
        driver = "spice" if any(g.type == "spice" for g in dev.graphics) else "none"
        b.add("-audiodev", js({"id": "audio1", "driver": driver}))
        b.audiodev = "audio1"


SOUND = {"sb16": "sb16", "es1370": "ES1370", "ac97": "AC97", "ich6": "intel-hda", "ich7": "intel-hda",
         "ich9": "ich9-intel-hda", "usb": "usb-audio", "pcspk": None}


def add_sound(b: Builder) -> None:
    for i, s in enumerate(b.domain.devices.sound):
        path = f"/domain/devices/sound[{i + 1}]"
        sid = b.alias(s.alias, f"sound{i}", path)
        audiodev = f"audio{s.audio.id}" if s.audio is not None else b.audiodev
        if s.model == "pcspk":
            # part of the machine: QEMU 7.2 has no -soundhw; the speaker is given its backend
            b.add("-machine", opts(("pcspk-audiodev", audiodev)))
            continue
        driver = SOUND[s.model]
        assert driver is not None
        if not b.has_device(driver, f"{path}/@model", f"sound model '{s.model}'"):
            continue
        props: dict[str, Any] = {"driver": driver, "id": sid}
        if s.model in ("sb16",):
            props["audiodev"] = audiodev
        elif s.model == "usb":
            if b.usb_bus is None:
                b.error(f"{path}/@model", "a USB sound card needs a USB controller")
                continue
            props.update(bus=b.usb_bus, audiodev=audiodev)
            if s.multichannel:
                props["multi"] = True
        else:
            props.update(b.pci_props(s.address, path, "sound card"))
            if s.model in ("es1370", "ac97"):
                props["audiodev"] = audiodev
        b.device(props)
        if s.model in ("ich6", "ich7", "ich9"):
            codecs = s.codec or ()
            kinds = [c.type for c in codecs] or ["duplex"]
            for n, kind in enumerate(kinds):
                b.device({"driver": f"hda-{kind}", "id": f"{sid}-codec{n}", "bus": f"{sid}.0", "cad": n,
                          "audiodev": audiodev})
