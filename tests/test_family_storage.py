"""Storage and firmware state: throttling, iothreads, secrets and LUKS, transient disks,
stateless firmware -- translated, then realized in real QEMU 7.2 and checked over QMP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qemud.argv import Command, build_argv
from qemud.caps import HostCaps, probe
from qemud.domain import parse_domain
from qemud.errors import DomainError, HostError
from qemud.launch import discard, prepare
from qemud.paths import GuestPaths
from qemud.qmp import Qmp
from qemud.secrets import secret_file_name

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
UUID = "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def caps() -> HostCaps:
    return probe(QEMU)


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qs", dir="/tmp") as tmp:
        yield Path(tmp)


def domain(devices: str, *, os_extra: str = "", top: str = "", features: str = "") -> str:
    return f"""<domain type='qemu'><name>st</name><memory unit='MiB'>64</memory>{top}
      <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>{features}
      <devices><emulator>{QEMU}</emulator>{devices}</devices></domain>"""


def raw_image(p: Path, size: int = 1 << 20) -> Path:
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def with_secrets(caps: HostCaps, d: Path) -> HostCaps:
    return dataclasses.replace(caps, host=dataclasses.replace(caps.host, secrets_dir=str(d)))


def blockdevs(cmd: Command) -> dict[str, dict[str, Any]]:
    out = {}
    for i, a in enumerate(cmd.argv):
        if a == "-blockdev":
            props = json.loads(cmd.argv[i + 1])
            out[props["node-name"]] = props
    return out


def objects(cmd: Command) -> list[dict[str, Any]]:
    return [json.loads(cmd.argv[i + 1]) for i, a in enumerate(cmd.argv)
            if a == "-object" and cmd.argv[i + 1].startswith("{")]


def devices(cmd: Command) -> list[dict[str, Any]]:
    return [json.loads(cmd.argv[i + 1]) for i, a in enumerate(cmd.argv)
            if a == "-device" and cmd.argv[i + 1].startswith("{")]


@contextlib.asynccontextmanager
async def running(cmd: Command) -> AsyncIterator[Qmp]:
    """QEMU started from ``cmd`` (paused), its QMP connected; quit and reaped at the end.
    ``q.output()`` is what QEMU printed so far (HMP qemu-io prints there)."""
    prepare(cmd)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    q = Qmp("test")
    try:
        for _ in range(400):
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"QEMU exited: {log.read().decode(errors='replace')}")
            if cmd.qmp.exists():
                with contextlib.suppress(Exception):
                    await q.connect(str(cmd.qmp), timeout=2)
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("QMP never came up")

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")
        q.output = output  # type: ignore[attr-defined]
        yield q
        with contextlib.suppress(Exception):
            await q.execute("quit")
        await asyncio.to_thread(proc.wait, 20)
    finally:
        with contextlib.suppress(Exception):
            await q.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def build(text: str, caps: HostCaps, scratch: Path) -> Command:
    return build_argv(parse_domain(text), caps, GuestPaths(scratch / "run", scratch / "state"), paused=True)


# ---- throttling --------------------------------------------------------------------------------

def test_iotune_becomes_a_throttle_group_and_filter_that_qemu_applies(caps: HostCaps, scratch: Path) -> None:
    img = raw_image(scratch / "a.img")
    text = domain(f"""<disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{img}'/><target dev='vda' bus='virtio'/>
        <iotune><total_bytes_sec>5000000</total_bytes_sec><read_iops_sec>300</read_iops_sec>
          <read_iops_sec_max>400</read_iops_sec_max><read_iops_sec_max_length>5</read_iops_sec_max_length>
          <size_iops_sec>4096</size_iops_sec></iotune></disk>""")
    cmd = build(text, caps, scratch)
    [group] = [o for o in objects(cmd) if o["qom-type"] == "throttle-group"]
    assert group["limits"] == {"bps-total": 5000000, "iops-read": 300, "iops-read-max": 400,
                               "iops-read-max-length": 5, "iops-size": 4096}
    [dev] = [d for d in devices(cmd) if d["driver"] == "virtio-blk-pci"]
    assert blockdevs(cmd)[dev["drive"]]["driver"] == "throttle"

    async def check() -> None:
        async with running(cmd) as q:
            nodes = await q.execute("query-named-block-nodes", {"flat": True})
            throttle = [n for n in nodes if n["drv"] == "throttle"]
            assert len(throttle) == 1
            limits = await q.execute("qom-get", {"path": f"/objects/{group['id']}", "property": "limits"})
            assert limits["bps-total"] == 5000000 and limits["iops-read"] == 300
            assert limits["iops-read-max"] == 400 and limits["iops-read-max-length"] == 5
            assert limits["iops-size"] == 4096
            # the device's disk is the throttled one: its root node is the throttle filter
            block = await q.execute("query-block")
            [vda] = [b for b in block if b.get("qdev", "").endswith("virtio-disk0/virtio-backend")
                     or b.get("qdev") == "virtio-disk0" or "virtio-disk0" in b.get("qdev", "")]
            assert vda["inserted"]["node-name"] == throttle[0]["node-name"]
    asyncio.run(check())


def test_disks_of_one_group_share_one_throttle_group(caps: HostCaps, scratch: Path) -> None:
    disks = "".join(f"""<disk type='file' device='disk'><source file='{raw_image(scratch / f"{d}.img")}'/>
        <target dev='{d}' bus='virtio'/><iotune><total_iops_sec>100</total_iops_sec>
        <group_name>db</group_name></iotune></disk>""" for d in ("vda", "vdb"))
    cmd = build(domain(disks), caps, scratch)
    groups = [o for o in objects(cmd) if o["qom-type"] == "throttle-group"]
    assert [g["id"] for g in groups] == ["throttle-db"]
    assert sorted(n["throttle-group"] for n in blockdevs(cmd).values() if n["driver"] == "throttle") == ["throttle-db"] * 2


def test_iotune_total_with_read_is_refused(caps: HostCaps, scratch: Path) -> None:
    text = domain(f"""<disk type='file'><source file='{raw_image(scratch / "a.img")}'/><target dev='vda'/>
        <iotune><total_bytes_sec>1</total_bytes_sec><read_bytes_sec>1</read_bytes_sec></iotune></disk>""")
    with pytest.raises(DomainError) as exc:
        build(text, caps, scratch)
    assert exc.value.problems[0].path == "/domain/devices/disk[1]/iotune/total_bytes_sec"


# ---- iothreads ----------------------------------------------------------------------------------

def test_iothread_ids_pools_and_a_bound_virtio_disk(caps: HostCaps, scratch: Path) -> None:
    img = raw_image(scratch / "a.img")
    text = domain(f"""<disk type='file' device='disk'><driver name='qemu' type='raw' iothread='4'/>
        <source file='{img}'/><target dev='vda' bus='virtio'/></disk>""",
                  top="""<iothreads>3</iothreads><iothreadids><iothread id='4' thread_pool_min='1'
                  thread_pool_max='2'/></iothreadids><defaultiothread thread_pool_min='2' thread_pool_max='8'/>""")
    cmd = build(text, caps, scratch)
    threads = [o for o in objects(cmd) if o["qom-type"] == "iothread"]
    # the listed ids first, then the lowest free ones (libvirt's order)
    assert [t["id"] for t in threads] == ["iothread4", "iothread1", "iothread2"]
    assert threads[0]["thread-pool-min"] == 1 and threads[0]["thread-pool-max"] == 2
    assert [o for o in objects(cmd) if o["qom-type"] == "main-loop"][0]["thread-pool-max"] == 8

    async def check() -> None:
        async with running(cmd) as q:
            ids = sorted(t["id"] for t in await q.execute("query-iothreads"))
            assert ids == ["iothread1", "iothread2", "iothread4"]
            link = await q.execute("qom-get", {"path": "/machine/peripheral/virtio-disk0", "property": "iothread"})
            assert link.endswith("iothread4")
    asyncio.run(check())


def test_a_disk_naming_a_missing_iothread_is_refused(caps: HostCaps, scratch: Path) -> None:
    text = domain(f"""<disk type='file'><driver iothread='3'/><source file='{raw_image(scratch / "a.img")}'/>
        <target dev='vda' bus='virtio'/></disk>""", top="<iothreadids><iothread id='5'/></iothreadids>")
    with pytest.raises(DomainError) as exc:
        build(text, caps, scratch)
    assert exc.value.problems[0].path == "/domain/devices/disk[1]/driver/@iothread"
    assert "5" in exc.value.problems[0].message


# ---- secrets and LUKS ------------------------------------------------------------------------------

def make_secret(d: Path, name: str, value: str = PASSPHRASE, mode: int = 0o600) -> Path:
    d.mkdir(mode=0o700, exist_ok=True)
    f = d / name
    f.write_text(value)
    os.chmod(f, mode)
    return f


def luks_image(p: Path, secret: Path) -> Path:
    for _ in range(5):  # qemu-img's key-derivation calibration fails now and then under load
        r = subprocess.run(["qemu-img", "create", "-q", "--object", f"secret,id=s0,file={secret}", "-f", "luks",
                            "-o", "key-secret=s0,iter-time=100", str(p), "1M"], capture_output=True, text=True)
        if r.returncode == 0:
            return p
    raise AssertionError(r.stderr)


def test_luks_disk_is_opened_with_its_secret_file(caps: HostCaps, scratch: Path) -> None:
    secrets = scratch / "secrets"
    sec = make_secret(secrets, UUID)
    img = luks_image(scratch / "enc.img", sec)
    text = domain(f"""<disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{img}'/><target dev='vda' bus='virtio'/>
        <encryption format='luks'><secret type='passphrase' uuid='{UUID}'/></encryption></disk>""")
    cmd = build(text, with_secrets(caps, secrets), scratch)
    assert PASSPHRASE not in " ".join(cmd.argv)  # QEMU reads the value from the file itself
    [secret_obj] = [o for o in objects(cmd) if o["qom-type"] == "secret"]
    # QEMU reads a copy made in the guest's runtime directory at each start (the secrets
    # directory is root's alone; QEMU runs unprivileged), removed once QEMU runs
    assert Path(secret_obj["file"]).name == f"secret-{sec.name}"
    assert [(s.source, Path(s.dest).parent) for s in cmd.prepare if s.kind == "secret"] == [
        (sec, Path(secret_obj["file"]).parent)]
    assert blockdevs(cmd)["drive0"]["driver"] == "luks"

    async def check() -> None:
        async with running(cmd) as q:
            nodes = await q.execute("query-named-block-nodes", {"flat": True})
            assert any(n["drv"] == "luks" and str(img) in n["file"] for n in nodes), nodes
            # the decrypted payload is readable: LUKS opened with the passphrase
            await q.hmp('qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "read -P 0 0 4k"')
            assert "read 4096/4096 bytes" in q.output(), q.output()
    asyncio.run(check())


def test_a_usage_secret_is_a_percent_encoded_file_name() -> None:
    assert secret_file_name(None, "/storage/guest disks/d1") == "%2Fstorage%2Fguest%20disks%2Fd1"
    assert secret_file_name(UUID.upper(), None) == UUID
    assert secret_file_name(None, "..") == "%2E%2E"


def test_a_missing_secret_file_is_an_error_naming_element_and_file(caps: HostCaps, scratch: Path) -> None:
    secrets = scratch / "secrets"
    secrets.mkdir()
    text = domain("""<disk type='network' device='disk'><driver name='qemu' type='raw'/>
        <source protocol='iscsi' name='iqn.2013-07.com.example:t/1'><host name='example.com'/>
        <auth username='me'><secret type='iscsi' usage='my target'/></auth></source>
        <target dev='vda' bus='virtio'/></disk>""")
    cmd = build(text, with_secrets(caps, secrets), scratch)
    [blk] = [n for n in blockdevs(cmd).values() if n["driver"] == "iscsi"]
    assert blk["user"] == "me" and blk["password-secret"]
    with pytest.raises(HostError) as exc:
        prepare(cmd)
    msg = str(exc.value)
    assert "/domain/devices/disk[1]/source/auth/secret" in msg
    assert str(secrets / "my%20target") in msg


def test_a_secret_file_others_can_read_is_refused(caps: HostCaps, scratch: Path) -> None:
    secrets = scratch / "secrets"
    make_secret(secrets, UUID, mode=0o644)
    text = domain(f"""<disk type='file'><source file='{raw_image(scratch / "a.img")}'/><target dev='vda'/>
        <encryption format='luks'><secret type='passphrase' uuid='{UUID}'/></encryption></disk>""")
    cmd = build(text, with_secrets(caps, secrets), scratch)
    with pytest.raises(HostError) as exc:
        prepare(cmd)
    assert "chmod 600" in str(exc.value) and "/domain/devices/disk[1]/encryption/secret" in str(exc.value)


def test_qcow_aes_encryption_is_refused_with_qemus_reason(caps: HostCaps, scratch: Path) -> None:
    text = domain(f"""<disk type='file'><driver name='qemu' type='qcow2'/><source file='{scratch / "x.qcow2"}'/>
        <target dev='vda'/><encryption format='qcow'><secret type='passphrase' uuid='{UUID}'/></encryption></disk>""")
    with pytest.raises(DomainError) as exc:
        build(text, caps, scratch)
    p = exc.value.problems[0]
    assert p.path == "/domain/devices/disk[1]/encryption/@format" and "no longer supported" in p.message


def test_a_cow_image_is_refused_because_qemu_removed_the_format(caps: HostCaps, scratch: Path) -> None:
    text = domain(f"""<disk type='file'><driver name='qemu' type='cow'/><source file='{scratch / "x.cow"}'/>
        <target dev='vda'/></disk>""")
    with pytest.raises(DomainError) as exc:
        build(text, caps, scratch)
    p = exc.value.problems[0]
    assert p.path == "/domain/devices/disk[1]/driver/@type" and "removed from QEMU" in p.message


# ---- transient disks -----------------------------------------------------------------------------

def test_transient_disk_writes_go_to_an_overlay_and_the_base_is_unchanged(caps: HostCaps, scratch: Path) -> None:
    base = raw_image(scratch / "base.img")
    text = domain(f"""<disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{base}'/><target dev='vda' bus='virtio'/><transient/></disk>""")
    paths = GuestPaths(scratch / "run", scratch / "state")
    cmd = build_argv(parse_domain(text), caps, paths, paused=True)
    overlay = scratch / "run" / "transient" / "drive0.qcow2"
    assert blockdevs(cmd)["drive0"]["read-only"] is True  # the base is never written

    async def check() -> None:
        async with running(cmd) as q:
            assert overlay.exists()
            await q.hmp('qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0xab 0 64k"')
            assert "wrote 65536/65536 bytes" in q.output(), q.output()
            await q.hmp('qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "read -P 0xab 0 64k"')
            assert "read 65536/65536 bytes" in q.output(), q.output()
    asyncio.run(check())
    # the guest's write is in the overlay, not in the base
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xab 0 64k", str(overlay)],
                       capture_output=True, text=True)
    assert "read 65536/65536 bytes" in r.stdout, r.stdout + r.stderr
    assert base.read_bytes() == bytes(1 << 20)
    discard(paths)  # what the daemon does when QEMU ends
    assert not overlay.exists()


def test_transient_needs_qemu_img(caps: HostCaps, scratch: Path) -> None:
    no_img = dataclasses.replace(caps, host=dataclasses.replace(
        caps.host, helpers={k: v for k, v in caps.host.helpers.items() if k != "qemu-img"}))
    text = domain(f"""<disk type='file'><source file='{raw_image(scratch / "a.img")}'/><target dev='vda'/>
        <transient/></disk>""")
    with pytest.raises(DomainError) as exc:
        build(text, no_img, scratch)
    assert exc.value.problems[0].path == "/domain/devices/disk[1]/transient"
    assert "qemu-img" in exc.value.problems[0].message


# ---- firmware state ------------------------------------------------------------------------------

OVMF = "/usr/share/OVMF/OVMF_CODE_4M.fd"


def test_stateless_firmware_has_no_nvram(caps: HostCaps, scratch: Path) -> None:
    text = domain("", os_extra=f"<loader readonly='yes' type='pflash' stateless='yes'>{OVMF}</loader>",
                  features="<features><acpi/></features>")
    cmd = build(text, caps, scratch)
    assert set(blockdevs(cmd)) == {"pflash0-file", "pflash0"}
    assert not [p for p in cmd.prepare if p.kind == "copy"]

    async def check() -> None:
        async with running(cmd) as q:
            nodes = await q.execute("query-named-block-nodes", {"flat": True})
            assert sorted(n["node-name"] for n in nodes) == ["pflash0", "pflash0-file"]
    asyncio.run(check())
    assert not (scratch / "state").exists()


@pytest.mark.parametrize("os_xml,features,path", [
    ("<loader stateless='yes' readonly='yes' type='pflash'>" + OVMF + "</loader><nvram>/x/VARS.fd</nvram>",
     "<features><acpi/></features>", "/domain/os/nvram"),
    ("<loader readonly='yes' type='pflash'>" + OVMF + "</loader>", "", "/domain/features"),
    ("<loader stateless='no'>/usr/share/seabios/bios.bin</loader>", "", "/domain/os/loader/@stateless"),
    ("<loader readonly='yes' type='pflash'/>", "<features><acpi/></features>", "/domain/os/loader"),
])
def test_firmware_libvirt_refuses_is_refused(caps: HostCaps, scratch: Path, os_xml: str, features: str, path: str) -> None:
    with pytest.raises(DomainError) as exc:
        build(domain("", os_extra=os_xml, features=features), caps, scratch)
    assert exc.value.problems[0].path == path


def test_nvram_source_file_is_the_variable_store(caps: HostCaps, scratch: Path) -> None:
    nv = scratch / "vars.fd"
    text = domain("", os_extra=f"""<loader readonly='yes' type='pflash'>{OVMF}</loader>
        <nvram type='file' template='/usr/share/OVMF/OVMF_VARS_4M.fd'><source file='{nv}'/></nvram>""",
                  features="<features><acpi/></features>")
    cmd = build(text, caps, scratch)
    assert blockdevs(cmd)["pflash1-file"]["filename"] == str(nv)

    async def check() -> None:
        async with running(cmd) as q:
            nodes = await q.execute("query-named-block-nodes", {"flat": True})
            assert any(n["node-name"] == "pflash1-file" and n["image"]["filename"] == str(nv) for n in nodes)
    asyncio.run(check())


# ---- disks libvirt shapes ----------------------------------------------------------------------

def test_scsi_disk_without_controller_gets_libvirts_lsilogic(caps: HostCaps, scratch: Path) -> None:
    text = domain(f"""<disk type='file'><source file='{raw_image(scratch / "a.img")}'/><target dev='sda' bus='scsi'/></disk>""")
    cmd = build(text, caps, scratch)
    devs = devices(cmd)
    assert [d for d in devs if d["driver"] == "lsi53c895a"][0]["id"] == "scsi0"
    assert [d for d in devs if d["driver"] == "scsi-hd"][0]["bus"] == "scsi0.0"


def test_lun_on_a_file_is_refused_like_libvirt(caps: HostCaps, scratch: Path) -> None:
    text = domain(f"""<disk type='file' device='lun'><source file='{raw_image(scratch / "a.img")}'/>
        <target dev='sda' bus='scsi'/></disk>""")
    with pytest.raises(DomainError) as exc:
        build(text, caps, scratch)
    assert exc.value.problems[0].path == "/domain/devices/disk[1]/@device"


def test_slice_metadata_cache_and_acpi_index(caps: HostCaps, scratch: Path) -> None:
    img = raw_image(scratch / "a.img", 4 << 20)
    q2 = scratch / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q2), "1M"], check=True)
    text = domain(f"""<disk type='file'><driver type='raw'/><source file='{img}'><slices>
        <slice type='storage' offset='1048576' size='2097152'/></slices></source><target dev='vda'/>
        <acpi index='7'/></disk>
        <disk type='file'><driver type='qcow2'><metadata_cache><max_size unit='KiB'>512</max_size></metadata_cache></driver>
        <source file='{q2}'/><target dev='vdb'/></disk>""", features="<features><acpi/></features>")
    cmd = build(text, caps, scratch)
    bd = blockdevs(cmd)
    assert (bd["drive0"]["offset"], bd["drive0"]["size"]) == (1048576, 2097152)
    assert bd["drive1"]["cache-size"] == 512 * 1024
    assert [d for d in devices(cmd) if d.get("id") == "virtio-disk0"][0]["acpi-index"] == 7

    async def check() -> None:
        async with running(cmd) as q:
            block = await q.execute("query-block")
            sizes = {b["qdev"]: b["inserted"]["image"]["virtual-size"] for b in block if b.get("inserted")}
            assert any(k.startswith("/machine/peripheral/virtio-disk0") and v == 2097152 for k, v in sizes.items()), sizes
    asyncio.run(check())


def test_two_disks_on_one_target_or_drive_address_are_refused(caps: HostCaps, scratch: Path) -> None:
    a, b = raw_image(scratch / "a.img"), raw_image(scratch / "b.img")
    text = domain(f"""<disk type='file'><source file='{a}'/><target dev='hda' bus='ide'/></disk>
        <disk type='file'><source file='{b}'/><target dev='hdb' bus='ide'/>
        <address type='drive' controller='0' bus='0' target='0' unit='0'/></disk>""")
    with pytest.raises(DomainError) as exc:
        build(text, caps, scratch)
    assert exc.value.problems[0].path == "/domain/devices/disk[2]/address"
    text = domain(f"""<disk type='file'><source file='{a}'/><target dev='vda'/></disk>
        <disk type='file'><source file='{b}'/><target dev='vda'/></disk>""")
    with pytest.raises(DomainError) as exc:
        build(text, caps, scratch)
    assert exc.value.problems[0].path == "/domain/devices/disk[2]/target/@dev"


def test_secrets_and_tls_directories_come_from_qemud_conf(scratch: Path) -> None:
    from qemud.config import load_config, with_storage_config
    conf = scratch / "qemud.conf"
    conf.write_text('[secrets]\ndir = "/srv/secrets"\n[tls]\nx509_dir = "/srv/pki"\n')
    config = load_config(conf)
    caps = with_storage_config(probe(QEMU), config)
    assert caps.host.secrets == "/srv/secrets" and caps.host.tls_x509_dir == "/srv/pki"
    conf.write_text('[daemon]\nsecrets_dir = "relative"\n')
    with pytest.raises(Exception) as exc:
        load_config(conf)
    assert "absolute" in str(exc.value)


def test_tls_nbd_disk_gets_x509_credentials_from_the_configured_directory(caps: HostCaps, scratch: Path) -> None:
    text = domain("""<disk type='network'><driver type='raw'/><source protocol='nbd' name='e' tls='yes'>
        <host name='nbd.example' port='10809'/></source><target dev='vda'/></disk>""")
    with pytest.raises(DomainError) as exc:
        build(text, caps, scratch)
    assert exc.value.problems[0].path == "/domain/devices/disk[1]/source/@tls"
    tls = dataclasses.replace(caps, host=dataclasses.replace(caps.host, tls_x509_dir="/etc/pki/qemu"))
    cmd = build(text, tls, scratch)
    [creds] = [o for o in objects(cmd) if o["qom-type"] == "tls-creds-x509"]
    assert creds["dir"] == "/etc/pki/qemu" and creds["endpoint"] == "client"
    [nbd] = [n for n in blockdevs(cmd).values() if n["driver"] == "nbd"]
    assert nbd["tls-creds"] == creds["id"]


def test_the_daemon_discards_a_transient_overlay_when_the_guest_ends() -> None:
    from tests.support.daemon import Daemon, domain_xml
    from tests.support.tinyguest import ensure_guest
    guest = ensure_guest()
    d = Daemon()
    try:
        d.start(timeout=30)
        base = raw_image(d.scratch / "base.img")
        text = domain_xml(guest, "tr1", shutdown_timeout=2).replace("<devices>", f"""<devices>
          <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{base}'/>
          <target dev='vda' bus='virtio'/><transient/></disk>""", 1)
        assert "<transient/>" in text
        after = d.mark()
        d.drop("tr1.xml", text)
        d.wait_for("running", "tr1", timeout=30, after=after)
        overlay = d.run_dir("tr1") / "transient" / "drive0.qcow2"
        assert overlay.is_file()
        d.remove("tr1.xml")
        d.wait_for("stopped", "tr1", timeout=30, after=after)
        assert not overlay.exists()
        assert base.read_bytes() == bytes(1 << 20)
    finally:
        print(d.log_text())
        d.close()


def test_an_overlay_in_use_by_a_running_qemu_is_not_replaced(caps: HostCaps, scratch: Path) -> None:
    base = raw_image(scratch / "base.img")
    text = domain(f"""<disk type='file'><driver type='raw'/><source file='{base}'/><target dev='vda'/>
        <transient/></disk>""")
    cmd = build(text, caps, scratch)
    overlay = scratch / "run" / "transient" / "drive0.qcow2"

    async def check() -> None:
        async with running(cmd):
            inode = overlay.stat().st_ino
            with pytest.raises(HostError) as exc:
                prepare(cmd)  # e.g. `qemuctl argv` while the guest runs
            assert "in use" in str(exc.value)
            assert overlay.stat().st_ino == inode
    asyncio.run(check())
    prepare(cmd)  # QEMU gone: a fresh overlay
    assert overlay.is_file()
