"""The device families qemud has had from the start, each realized in real QEMU 7.2 and read
back over QMP: CD-ROMs and floppies with and without media, disk I/O settings, NIC models,
VNC and SPICE, video models, sound and audio backends, inputs, RNG backends, watchdogs with
their actions, panic devices, the guest agent channel, and the balloon's statistics period."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qemud.argv import build_argv
from qemud.caps import probe
from qemud.domain import parse_domain
from qemud.launch import prepare
from qemud.paths import GuestPaths
from tests.support.realize import realize_sync
from tools.conformance import tuner

pytestmark = pytest.mark.qemu

Probe = Callable[[Any], Awaitable[dict[str, Any]]]


def realize(devices: str, probe_fn: Probe | None = None, machine: str = "pc", features: str = "<acpi/>",
            files: dict[str, int] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Start a guest with ``devices`` paused in QEMU; returns what ``probe_fn`` read over QMP and
    the peripheral devices by id -> QOM type. ``files``: scratch images to make ({name: MiB})."""
    with tempfile.TemporaryDirectory(prefix="qb", dir="/tmp") as tmp:
        t = Path(tmp)
        for name, mib in (files or {}).items():
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(t / name), f"{mib}M"], check=True)
        text = (f"<domain type='qemu'><name>basics</name><memory unit='MiB'>64</memory>"
                f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os><features>{features}</features>"
                f"<devices>{devices.replace('SCRATCH', tmp)}</devices></domain>")
        domain = parse_domain(text)
        caps = probe("/usr/bin/qemu-system-x86_64")
        cmd = build_argv(domain, caps, GuestPaths(t / "run", t / "st"), paused=True)
        prepare(cmd)
        seen: dict[str, Any] = {}
        setup, untune = tuner(cmd, caps, "test-basics")

        async def after_start(qmp: Any, pid: int) -> None:
            if setup is not None:
                await setup(qmp, pid)
            if probe_fn is not None:
                seen.update(await probe_fn(qmp))

        try:
            r = realize_sync(domain, cmd.argv, cmd.env, cmd.qmp, after_start=after_start)
        finally:
            untune()
        assert r.error is None and r.ok, (r.error, r.failed_checks, cmd.argv)
        peripherals = {p["name"]: p["type"][6:-1] for p in r.queries["qom-list /machine/peripheral"]
                       if p["type"].startswith("child<")}
        return seen, peripherals


def test_cdroms_and_floppies_with_and_without_media() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        return {"block": {b["qdev"]: b for b in await q.execute("query-block")}}
    seen, _ = realize("""
        <disk type='file' device='cdrom'><source file='SCRATCH/cd.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>
        <disk type='file' device='cdrom'><target dev='hdd' bus='ide'/><readonly/></disk>
        <disk type='file' device='floppy'><source file='SCRATCH/fd.img'/><target dev='fda' bus='fdc'/></disk>
        <disk type='file' device='floppy'><target dev='fdb' bus='fdc'/></disk>""",
        probe_fn, files={"cd.iso": 1, "fd.img": 1})
    by_dev = {b.get("qdev", ""): b for b in seen["block"].values()}
    media = {q: ("inserted" in b) for q, b in by_dev.items()}
    cds = sorted(q for q in media if "ide" in q)
    assert [media[q] for q in cds] == [True, False]
    assert sorted(media[q] for q in media if "fd" in q.lower() or "floppy" in q.lower()) == [False, True]
    assert all(b["removable"] for b in by_dev.values())


def test_disk_io_discard_detect_zeroes_and_cache_reach_the_block_layer() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        return {"block": await q.execute("query-block")}
    seen, peripherals = realize("""
        <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none' io='threads'
              discard='unmap' detect_zeroes='unmap'/><source file='SCRATCH/a.img'/><target dev='vda' bus='virtio'/></disk>
        <disk type='file' device='disk'><driver name='qemu' type='raw' cache='writethrough'/>
              <source file='SCRATCH/b.img'/><target dev='sda' bus='sata'/></disk>""",
        probe_fn, machine="q35", files={"a.img": 1, "b.img": 1})
    inserted = [b["inserted"] for b in seen["block"] if "inserted" in b]
    a = next(i for i in inserted if i["file"].endswith("a.img"))
    b = next(i for i in inserted if i["file"].endswith("b.img"))
    assert a["detect_zeroes"] == "unmap" and a["cache"]["direct"] is True and a["cache"]["no-flush"] is False
    assert b["cache"] == {"writeback": False, "direct": False, "no-flush": False}
    assert "virtio-blk-pci" in peripherals.values() and "ide-hd" in peripherals.values()


@pytest.mark.parametrize("model, qom", [("virtio", "virtio-net-pci"), ("e1000", "e1000"), ("e1000e", "e1000e"),
                                        ("rtl8139", "rtl8139"), ("ne2k_pci", "ne2k_pci"), ("vmxnet3", "vmxnet3")])
def test_nic_models(model: str, qom: str) -> None:
    _, peripherals = realize(f"<interface type='user'><mac address='52:54:00:12:34:56'/><model type='{model}'/></interface>")
    assert qom in peripherals.values()  # the MAC itself is one of realize's checks


def test_vnc_on_a_listen_address_and_spice_on_a_port() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        return {"vnc": await q.execute("query-vnc-servers"), "spice": await q.execute("query-spice")}
    seen, _ = realize("""
        <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
        <graphics type='spice' port='5931' listen='127.0.0.1'/>""", probe_fn)
    [server] = [s["server"] for s in seen["vnc"]]
    assert [(x["family"], x["host"]) for x in server] == [("ipv4", "127.0.0.1")]
    assert seen["spice"]["enabled"] and seen["spice"]["port"] == 5931 and seen["spice"]["host"] == "127.0.0.1"


def test_vnc_on_a_unix_socket() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        # QEMU does not tell the socket's path; it is there once QEMU listens
        seen_sock = [p.is_socket() for p in Path("/tmp").glob("qb*/vnc.sock")]
        return {"vnc": await q.execute("query-vnc-servers"), "socket": seen_sock}
    seen, _ = realize("<graphics type='vnc' socket='SCRATCH/vnc.sock'/>", probe_fn)
    [server] = [s["server"] for s in seen["vnc"]]
    assert [x["family"] for x in server] == ["unix"] and True in seen["socket"]


@pytest.mark.parametrize("model, qom", [("vga", "VGA"), ("cirrus", "cirrus-vga"), ("qxl", "qxl-vga"),
                                        ("virtio", "virtio-vga"), ("bochs", "bochs-display"),
                                        ("ramfb", "ramfb")])
def test_video_models(model: str, qom: str) -> None:
    _, peripherals = realize(f"<graphics type='vnc' autoport='yes' listen='127.0.0.1'/><video><model type='{model}'/></video>")
    assert qom in peripherals.values(), peripherals


def test_video_none_gives_the_guest_no_display_device() -> None:
    _, peripherals = realize("<video><model type='none'/></video>")
    assert not {"VGA", "cirrus-vga", "qxl-vga", "virtio-vga", "bochs-display"} & set(peripherals.values())


@pytest.mark.parametrize("model, qoms", [("ich6", {"intel-hda", "hda-duplex"}), ("ich9", {"ich9-intel-hda", "hda-duplex"}),
                                         ("ac97", {"AC97"}), ("es1370", {"ES1370"}), ("sb16", {"sb16"}),
                                         ("usb", {"usb-audio"})])
def test_sound_models_on_a_silent_audio_backend(model: str, qoms: set[str]) -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        # the HDA codec hangs below its controller, not in /machine/peripheral
        found = await q.execute("qom-list", {"path": "/machine/peripheral/sound0"})
        codecs = [c["type"][6:-1] for c in found if c["type"].startswith("child<hda-")]
        return {"codecs": codecs}
    seen, peripherals = realize(f"<controller type='usb' model='qemu-xhci'/><sound model='{model}'/><audio id='1' type='none'/>",
                                probe_fn if model.startswith("ich") else None)
    assert qoms <= set(peripherals.values()) | set(seen.get("codecs", ())), (peripherals, seen)


def test_audio_to_a_wav_file() -> None:
    made: list[bool] = []

    async def probe_fn(q: Any) -> dict[str, Any]:
        [path] = [a for a in Path("/tmp").glob("qb*/out.wav")] or [None]
        made.append(path is not None and path.exists())
        return {}
    realize("<sound model='ich9'/><audio id='1' type='file' path='SCRATCH/out.wav'/>", probe_fn, machine="q35")
    assert made == [True], "QEMU's wav backend opens the file at start"


def test_inputs_tablet_mouse_keyboard() -> None:
    _, peripherals = realize("""<controller type='usb' model='qemu-xhci'/>
        <input type='tablet' bus='usb'/><input type='mouse' bus='virtio'/><input type='keyboard' bus='virtio'/>""")
    assert {"usb-tablet", "virtio-mouse-pci", "virtio-keyboard-pci"} <= set(peripherals.values()), peripherals


def test_rng_backends_random_and_builtin() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        return {"objects": await q.execute("qom-list", {"path": "/objects"})}
    seen, peripherals = realize("""<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
        <rng model='virtio'><rate bytes='1024' period='1000'/><backend model='builtin'/></rng>""", probe_fn)
    kinds = {o["type"] for o in seen["objects"]}
    assert {"child<rng-random>", "child<rng-builtin>"} <= kinds
    assert list(peripherals.values()).count("virtio-rng-pci") == 2


@pytest.mark.parametrize("model, action, qom", [("i6300esb", "poweroff", "i6300esb"), ("ib700", "pause", "ib700"),
                                                ("i6300esb", "none", "i6300esb")])
def test_watchdogs_and_their_actions(model: str, action: str, qom: str) -> None:
    _, peripherals = realize(f"<watchdog model='{model}' action='{action}'/>")
    assert qom in peripherals.values()


def test_the_q35_itco_watchdog_is_armed_through_the_ich9_lpc() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        found = await q.execute("qom-list", {"path": "/machine/unattached"})
        [lpc] = [f"/machine/unattached/{c['name']}" for c in found if c["type"] == "child<ICH9-LPC>"]
        return {"noreboot": await q.execute("qom-get", {"path": lpc, "property": "noreboot"})}
    seen, _ = realize("<watchdog model='itco' action='reset'/>", probe_fn, machine="q35")
    assert seen["noreboot"] is False  # libvirt's -global ICH9-LPC.noreboot=off: the iTCO may reset the guest


def test_panic_devices() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        return {"anon": await q.execute("qom-list", {"path": "/machine/peripheral-anon"})}
    seen, _ = realize("<panic model='isa'/><panic model='pvpanic'/>", probe_fn)
    assert {"child<pvpanic>", "child<pvpanic-pci>"} <= {c["type"] for c in seen["anon"]}, seen


def test_guest_agent_channel_on_virtio_serial() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        return {"chardevs": await q.execute("query-chardev")}
    seen, peripherals = realize("""<channel type='unix'><source mode='bind' path='SCRATCH/ga.sock'/>
        <target type='virtio' name='org.qemu.guest_agent.0'/></channel>""", probe_fn)
    assert "virtserialport" in peripherals.values() and "virtio-serial-pci" in peripherals.values()
    [agent] = [c for c in seen["chardevs"] if c["label"] != "qmp"]
    assert "unix:" in agent["filename"] and agent["filename"].endswith("/ga.sock,server=on"), agent


def test_balloon_statistics_period_is_set_over_qmp_as_libvirt_does() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        return {"period": await q.execute("qom-get", {"path": "/machine/peripheral/balloon0",
                                                      "property": "guest-stats-polling-interval"})}
    seen, _ = realize("<memballoon model='virtio'><stats period='10'/></memballoon>", probe_fn)
    assert seen["period"] == 10


def test_usb_cdroms_are_cd_drives_with_or_without_media() -> None:
    async def probe_fn(q: Any) -> dict[str, Any]:
        return {"block": await q.execute("query-block")}
    seen, peripherals = realize("""<controller type='usb' model='qemu-xhci'/>
        <disk type='file' device='cdrom'><source file='SCRATCH/cd.iso'/><target dev='sda' bus='usb'/><readonly/></disk>
        <disk type='file' device='cdrom'><target dev='sdb' bus='usb'/><readonly/></disk>""",
        probe_fn, files={"cd.iso": 1})
    assert list(peripherals.values()).count("usb-bot") == 2 and list(peripherals.values()).count("scsi-cd") == 2
    cds = {b["qdev"]: b for b in seen["block"] if "scsi-cd" in b.get("qdev", "") or b["qdev"].endswith("-cd")}
    assert len(cds) == 2 and all(b["removable"] for b in cds.values())
    assert sorted("inserted" in b for b in cds.values()) == [False, True]
