"""``<graphics>``, ``<video>``, ``<input>``, ``<sound>`` and ``<audio>``."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.qemuopts import js, opts
from qemud.argv.virtio import add_virtio_props, refuse_virtio_options
from qemud.domain.devices.misc import Graphics, Listen

AUDIO_DRIVERS = {"none": "none", "alsa": "alsa", "pulseaudio": "pa", "sdl": "sdl", "spice": "spice",
                 "file": "wav", "oss": "oss", "jack": "jack", "dbus": "dbus"}


def add_graphics(b: Builder) -> None:
    gfx = b.domain.devices.graphics
    if not gfx:
        b.add("-display", "none")
        return
    kinds = [g.type for g in gfx]
    gl = [i for i, g in enumerate(gfx) if g.type == "egl-headless" or (g.gl is not None and g.gl.enable)]
    if len(gl) > 1:
        b.error(f"/domain/devices/graphics[{gl[1] + 1}]", "multiple OpenGL displays are not supported by QEMU")
        return
    for i, g in enumerate(gfx):
        path = f"/domain/devices/graphics[{i + 1}]"
        if kinds.count(g.type) > 1:
            b.error(f"{path}/@type", f"only one {g.type} display is possible")
            continue
        listen = g.listen[0] if g.listen else None
        addr = g.listen_ or (listen.address if listen is not None and listen.type == "address" else None)
        if listen is not None and listen.type == "network":
            net = listen.network
            known = net in b.caps.networks if net else False
            b.error(f"{path}/listen/@network" if net else f"{path}/listen",
                    f"listening on the address of libvirt network '{net}' is not supported: qemud knows "
                    f"{'it' if known else 'no such network'} as a bridge, not by address; give "
                    "<listen type='address' address=...>" if net else "a network listen needs a network name")
            continue
        if g.type == "vnc":
            _vnc(b, g, path, listen, addr)
        elif g.type == "spice":
            _spice(b, g, path, listen, addr)
        elif g.type == "egl-headless":
            rn = g.gl.rendernode if g.gl is not None else None
            b.add("-display", "egl-headless," + opts(("rendernode", rn)) if rn else "egl-headless")
            _render_node(b, path + ("/gl" if g.gl is not None else ""), "an egl-headless display")
        elif g.type == "dbus":
            _dbus(b, g, path)
        elif g.type in ("sdl", "desktop", "rdp"):
            b.error(f"{path}/@type", f"a {g.type} display needs a desktop session; qemud runs guests headless (use vnc or spice)")


def _render_node(b: Builder, path: str, what: str) -> None:
    """OpenGL needs a DRM render node: a host limit, checked after the translation."""
    if not b.caps.host.has("/dev/dri"):
        b.error(path, f"{what} renders with OpenGL on a DRM render node (/dev/dri/renderD*), which this host "
                "lacks (no GPU or no DRM driver loaded)")


def _graphics_audio(b: Builder, g: Graphics, path: str) -> str | None:
    """The audiodev a display carries (<graphics><audio id>): audioN of an <audio> of that id."""
    if g.audio is None:
        return None
    if not any(a.id == g.audio.id for a in b.domain.devices.audio):
        b.error(f"{path}/audio/@id", f"no <audio> backend has id {g.audio.id}")
        return None
    return f"audio{g.audio.id}"


def _vnc(b: Builder, g: Graphics, path: str, listen: Listen | None, addr: str | None) -> None:
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
                return
            spec = f"{host}:{port - 5900}"
    creds = None
    if "vnc" in b.caps.tls_dirs:  # libvirt's vnc_tls: every VNC display of the host uses TLS
        creds = "vnc-tls-creds0"
        b.obj({"qom-type": "tls-creds-x509", "id": creds, "dir": b.caps.tls_dirs["vnc"],
               "endpoint": "server", "verify-peer": False})
    b.add("-vnc", opts(("vnc", spec), ("to", 99) if auto else None,
                       ("password", True) if g.passwd else None,
                       ("websocket", g.websocket) if g.websocket is not None and g.websocket > 0 else None,
                       ("share", g.sharePolicy) if g.sharePolicy else None,
                       ("tls-creds", creds) if creds else None,
                       ("power-control", True) if g.powerControl else None,
                       ("audiodev", _graphics_audio(b, g, path)) if g.audio is not None else None))
    if g.keymap:
        b.warn(f"{path}/@keymap", "QEMU's VNC keymaps are deprecated; the keymap is not set")
    if g.passwd:
        b.warn(f"{path}/@passwd", "the VNC password is set over QMP by qemud at start; run by hand, "
               "QEMU refuses every VNC client until it is set")


SPICE_IMAGE = ("auto_glz", "auto_lz", "quic", "glz", "lz", "off")
SPICE_WAN = ("auto", "never", "always")


def _spice(b: Builder, g: Graphics, path: str, listen: Listen | None, addr: str | None) -> None:
    parts: list[tuple[str, object] | None] = []
    if g.port is not None and g.port > 0:
        parts.append(("port", g.port))
    elif g.autoport is not False and g.port in (None, -1) and g.tlsPort in (None, -1):
        b.warn(path, "SPICE autoport: QEMU picks no port by itself; using unix socket")
    secure = [c.name for c in g.channel if c.mode == "secure"]
    tls = (g.tlsPort is not None and g.tlsPort > 0) or bool(secure) or g.defaultMode == "secure"
    if tls:
        tls_dir = b.caps.tls_dirs.get("spice")
        if g.tlsPort is None or g.tlsPort <= 0:
            b.error(f"{path}/@tlsPort", "secure SPICE channels need a TLS port (tlsPort)")
            return
        if tls_dir is None:
            b.error(f"{path}/@tlsPort", "SPICE TLS port set, but TLS is disabled in qemud.conf (set "
                    "[spice] tls = true and tls_x509_cert_dir to a directory with ca-cert.pem, "
                    "server-cert.pem and server-key.pem)")
            return
        parts.append(("tls-port", g.tlsPort))
    if listen is not None and listen.type == "socket":
        parts += [("unix", True), ("addr", listen.socket or b.socket_path(b.paths.run / "spice.sock", path))]
    elif addr:
        parts.append(("addr", addr))
    if not g.passwd:
        parts.append(("disable-ticketing", True))
    if g.mouse is not None:
        parts.append(("agent-mouse", g.mouse.mode == "client"))
    if tls:
        parts.append(("x509-dir", b.caps.tls_dirs["spice"]))
        if g.defaultMode == "secure":
            parts.append(("tls-channel", "default"))
        elif g.defaultMode == "insecure":
            parts.append(("plaintext-channel", "default"))
    for c in g.channel:
        if c.mode == "secure":
            parts.append(("tls-channel", c.name))
        elif c.mode == "insecure":
            parts.append(("plaintext-channel", c.name))
    for el, key, allowed in ((g.image, "image-compression", SPICE_IMAGE),
                             (g.jpeg, "jpeg-wan-compression", SPICE_WAN),
                             (g.zlib, "zlib-glz-wan-compression", SPICE_WAN)):
        if el is not None:
            if el.compression not in allowed:
                b.error(f"{path}/{key.split('-')[0]}/@compression",
                        f"'{el.compression}' is not one of {', '.join(allowed)}")
                return
            parts.append((key, el.compression))
    if g.playback is not None:
        if g.playback.compression not in ("on", "off"):
            b.error(f"{path}/playback/@compression", f"'{g.playback.compression}' is not one of on, off")
            return
        parts.append(("playback-compression", g.playback.compression == "on"))
    if g.streaming is not None:
        parts.append(("streaming-video", g.streaming.mode))
    if g.clipboard is not None and not g.clipboard.copypaste:
        parts.append(("disable-copy-paste", True))
    if g.filetransfer is not None and not g.filetransfer.enable:
        parts.append(("disable-agent-file-xfer", True))
    gl = g.gl is not None and g.gl.enable
    if gl:
        assert g.gl is not None
        parts.append(("gl", True))
        if g.gl.rendernode:
            parts.append(("rendernode", g.gl.rendernode))
    parts.append(("seamless-migration", True))
    if not any(p and p[0] in ("port", "unix", "tls-port") for p in parts):
        parts += [("unix", True), ("addr", b.socket_path(b.paths.run / "spice.sock", path))]
    b.add("-spice", opts(*parts))
    if gl:
        _render_node(b, f"{path}/gl", "SPICE with OpenGL")


#: the bus configuration of the guest's private dbus-daemon (Debian's dbus package): a session
#: bus, which lets the user who started it (qemud's, as QEMU's) own any name
DBUS_SESSION_CONF = "/usr/share/dbus-1/session.conf"
#: dbus-daemon takes its listening socket as systemd socket activation does (fd 3, LISTEN_FDS,
#: LISTEN_PID = its own pid, which ``exec`` keeps from the shell); qemud hands it {fd} (bash:
#: dash reads only one-digit descriptors in redirections)
_DBUS_SCRIPT = ("[ {fd} = 3 ] || exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec %s --nofork "
                "--config-file=%s --address=systemd:")


def _private_bus(b: Builder, path: str) -> str | None:
    """libvirt's private D-Bus bus for a D-Bus display without p2p or address: a dbus-daemon
    beside QEMU (a supervised helper), on a socket in the guest's runtime directory."""
    daemon = b.caps.host.helpers.get("dbus-daemon")
    if daemon is None or not b.caps.host.has(DBUS_SESSION_CONF):
        b.error(f"{path}/@type", "a D-Bus display on a bus needs dbus-daemon and its session bus "
                f"configuration ({DBUS_SESSION_CONF}), which this host lacks (install the dbus "
                "package), or use p2p='yes'")
        return None
    from pathlib import Path
    from qemud.argv.builder import HelperSpec
    sock = b.socket_path(b.paths.run / "dbus.sock", path)
    b.helpers.append(HelperSpec(name="dbus-daemon", socket=Path(sock), log=b.paths.run / "dbus-daemon.log",
                                argv=["/bin/bash", "-c", _DBUS_SCRIPT % (daemon, DBUS_SESSION_CONF)]))
    return f"unix:path={sock}"


def _dbus(b: Builder, g: Graphics, path: str) -> None:
    """QEMU's D-Bus display: p2p (clients are handed a socket over QMP add_client) or on a bus."""
    if g.p2p and g.address:
        b.error(f"{path}/@address", "a peer-to-peer D-Bus display has no bus address")
        return
    address = g.address
    if not g.p2p and not address:
        address = _private_bus(b, path)
        if address is None:
            return
    gl = g.gl is not None and g.gl.enable
    rn = g.gl.rendernode if g.gl is not None else None
    audio = _graphics_audio(b, g, path)
    b.add("-display", "dbus," + opts(("p2p", True) if g.p2p else None, ("addr", address) if address else None,
                                     ("gl", True) if gl else None, ("rendernode", rn) if gl and rn else None,
                                     ("audiodev", audio) if audio else None))
    if gl:
        _render_node(b, f"{path}/gl", "a D-Bus display with OpenGL")


VIDEO_PRIMARY = {"vga": "VGA", "cirrus": "cirrus-vga", "vmvga": "vmware-svga", "qxl": "qxl-vga",
                 "virtio": "virtio-vga", "bochs": "bochs-display", "ramfb": "ramfb"}
VIDEO_SECONDARY = {"qxl": "qxl", "virtio": "virtio-gpu-pci", "bochs": "bochs-display"}


def add_video(b: Builder) -> None:
    videos = list(b.domain.devices.video)
    if not videos and b.domain.devices.graphics:
        # libvirt adds a VGA card when a display is asked for without one
        from qemud.domain.devices.misc import Video
        videos = [Video.model_validate({"model": {"@type": "vga"}})]
    primaries = [i for i, v in enumerate(videos) if v.model is not None and v.model.primary]
    if len(primaries) > 1:
        b.error(f"/domain/devices/video[{primaries[1] + 1}]/model/@primary", "only one primary video device is supported")
        return
    order = list(range(len(videos)))
    if primaries and primaries[0] != 0:  # libvirt moves the primary card first
        order.remove(primaries[0])
        order.insert(0, primaries[0])
    for i, n in enumerate(order):
        v = videos[n]
        path = f"/domain/devices/video[{n + 1}]"
        model = v.model.type if v.model is not None else "vga"
        if model == "ramfb" and v.address is not None:
            b.error(f"{path}/address", "address not supported for video type ramfb (it is not a PCI device)")
            continue
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
        if not _audio_backend_props(b, a, path, props):
            continue
        for tag, key in (("input", "in"), ("output", "out")):
            io = getattr(a, tag)
            if io is not None:
                sub = _audio_io(b, a.type, io, f"{path}/{tag}")
                if sub is None:
                    break
                if sub:
                    props[key] = sub
        else:
            b.add("-audiodev", js(props))
        if b.audiodev is None:
            b.audiodev = f"audio{a.id}"
    if not audios and (dev.sound or dev.graphics):
        # libvirt's default backend: spice's own when a spice display exists, else none
        driver = "spice" if any(g.type == "spice" for g in dev.graphics) else "none"
        b.add("-audiodev", js({"id": "audio1", "driver": driver}))
        b.audiodev = "audio1"


#: per-direction settings that only some backends have: XML attribute -> (QEMU key, backends)
AUDIO_IO_ONLY = {
    "dev": ("dev", ("alsa", "oss")), "tryPoll": ("try-poll", ("alsa", "oss")),
    "bufferCount": ("buffer-count", ("oss", "sdl", "coreaudio")),
    "name": ("name", ("pulseaudio",)), "streamName": ("stream-name", ("pulseaudio",)),
    "latency": ("latency", ("pulseaudio",)), "serverName": ("server-name", ("jack",)),
    "clientName": ("client-name", ("jack",)), "connectPorts": ("connect-ports", ("jack",)),
    "exactName": ("exact-name", ("jack",)),
}


def _audio_io(b: Builder, kind: str, io: Any, path: str) -> dict[str, Any] | None:
    """QEMU's in/out settings of one <audio> direction; None (with errors) when one does not apply."""
    out: dict[str, Any] = {}
    for attr_, key in (("mixingEngine", "mixing-engine"), ("fixedSettings", "fixed-settings"),
                       ("voices", "voices"), ("bufferLength", "buffer-length")):
        if getattr(io, attr_) is not None:
            out[key] = getattr(io, attr_)
    if io.settings is not None:
        for k in ("frequency", "channels", "format"):
            if getattr(io.settings, k) is not None:
                out[k] = getattr(io.settings, k)
    ok = True
    for attr_, (key, kinds) in AUDIO_IO_ONLY.items():
        v = getattr(io, attr_)
        if v is None:
            continue
        if kind not in kinds:
            b.error(f"{path}/@{attr_}", f"{attr_} applies to {', '.join(kinds)} audio backends, not {kind}")
            ok = False
            continue
        out[key] = v
    return out if ok else None


def _audio_backend_props(b: Builder, a: Any, path: str, props: dict[str, Any]) -> bool:
    """Backend-wide settings: OSS's try-mmap/exclusive/dsp-policy, SDL's driver (environment)."""
    ok = True
    for attr_, key in (("tryMMap", "try-mmap"), ("exclusive", "exclusive"), ("dspPolicy", "dsp-policy")):
        v = getattr(a, attr_)
        if v is None:
            continue
        if a.type != "oss":
            b.error(f"{path}/@{attr_}", f"{attr_} applies to the oss audio backend, not {a.type}")
            ok = False
        else:
            props[key] = v
    if a.driver is not None:
        if a.type != "sdl":
            b.error(f"{path}/@driver", f"driver applies to the sdl audio backend, not {a.type}")
            ok = False
        else:
            b.env["SDL_AUDIODRIVER"] = a.driver
    return ok


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
