"""Displays, character devices/channels and NIC extras, realized in real QEMU 7.2 and looked at
over QMP: the D-Bus display, SPICE with TLS, the qemu-vdagent channel, libvirt's virtio-serial
port numbering, guestfwd forwards, virtio-net rss/failover; and the host-limit error of an
OpenGL display on a host without /dev/dri."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qemud.argv import Command, build_argv
from qemud.caps import HostCaps, probe
from qemud.domain import Domain, parse_domain
from qemud.errors import DomainError
from qemud.host import HostFacts
from qemud.launch import prepare
from qemud.paths import GuestPaths
from qemud.qmp import Qmp
from tests.conftest import json_options, options
from tools.conformance import make_x509_dir

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"


def domain_xml(devices: str, name: str = "fam") -> str:
    return (f"<domain type='qemu'><name>{name}</name><uuid>6f1b2a34-5c6d-4e7f-8a9b-0c1d2e3f4a5b</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices>{devices}</devices></domain>")


@pytest.fixture(scope="module")
def caps() -> HostCaps:
    return probe(QEMU)


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qf", dir="/tmp") as tmp:
        yield Path(tmp)


def translate(xml: str, caps: HostCaps, scratch: Path) -> tuple[Domain, Command]:
    domain = parse_domain(xml, "test.xml")
    return domain, build_argv(domain, caps, GuestPaths(scratch / "run", scratch / "state"), paused=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_qemu(cmd: Command, ask: Callable[[Qmp], Awaitable[Any]], prepared: bool = False) -> Any:
    """Start cmd's QEMU (paused), run ``ask`` over QMP, quit; QEMU's output when it fails."""
    async def run() -> Any:
        if not prepared:
            prepare(cmd)
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
            q = Qmp("test")
            try:
                deadline = time.monotonic() + 20
                while True:
                    if proc.poll() is not None:
                        log.seek(0)
                        raise AssertionError(f"QEMU exited: {log.read().decode(errors='replace')}")
                    if cmd.qmp.exists():
                        with contextlib.suppress(Exception):
                            await q.connect(str(cmd.qmp), timeout=2)
                            break
                    assert time.monotonic() < deadline, "QMP never answered"
                    await asyncio.sleep(0.05)
                result = await ask(q)
                with contextlib.suppress(Exception):
                    await q.execute("quit")
                return result
            finally:
                with contextlib.suppress(Exception):
                    await q.close()
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
    return asyncio.run(run())


async def qom(q: Qmp, path: str, prop: str) -> Any:
    return await q.execute("qom-get", {"path": path, "property": prop})


# ---- graphics ----------------------------------------------------------------------------------

def test_dbus_p2p_display_with_dbus_audio_is_realized(caps: HostCaps, scratch: Path) -> None:
    _, cmd = translate(domain_xml("<graphics type='dbus' p2p='yes'><audio id='1'/></graphics>"
                                  "<audio id='1' type='dbus'><input mixingEngine='no'/><output mixingEngine='no'/></audio>"),
                       caps, scratch)
    assert options(cmd.argv, "-display") == ["dbus,p2p=on,audiodev=audio1"]
    (audio,) = json_options(cmd.argv, "-audiodev")
    assert audio == {"id": "audio1", "driver": "dbus", "in": {"mixing-engine": False}, "out": {"mixing-engine": False}}

    async def ask(q: Qmp) -> Any:
        return await q.execute("query-display-options")
    assert in_qemu(cmd, ask) == {"type": "dbus", "p2p": True, "audiodev": "audio1"}


def test_vnc_power_control(caps: HostCaps, scratch: Path) -> None:
    port = free_port()
    while port < 5900:
        port = free_port()
    _, cmd = translate(domain_xml(f"<graphics type='vnc' port='{port}' autoport='no' listen='127.0.0.1' "
                                  "powerControl='yes'/>"), caps, scratch)
    (vnc,) = options(cmd.argv, "-vnc")
    assert "power-control=on" in vnc.split(",")

    async def ask(q: Qmp) -> Any:
        return await q.execute("query-vnc")
    info = in_qemu(cmd, ask)
    assert info["enabled"] and info["service"] == str(port)


def test_spice_tls_from_the_configured_cert_dir(caps: HostCaps, scratch: Path) -> None:
    pki = make_x509_dir(scratch / "pki")
    assert {"ca-cert.pem", "server-cert.pem", "server-key.pem"} <= set(os.listdir(pki))
    port, tls_port = free_port(), free_port()
    xml = domain_xml(f"<graphics type='spice' port='{port}' tlsPort='{tls_port}' autoport='no' listen='127.0.0.1' "
                     "defaultMode='secure'><channel name='inputs' mode='insecure'/>"
                     "<image compression='auto_glz'/><streaming mode='filter'/></graphics>")
    with pytest.raises(DomainError) as e:  # TLS is off in qemud.conf: libvirt's refusal
        translate(xml, caps, scratch)
    assert e.value.problems[0].path == "/domain/devices/graphics[1]/@tlsPort"
    assert "qemud.conf" in e.value.problems[0].message
    _, cmd = translate(xml, caps.with_tls({"spice": pki}), scratch)
    (spice,) = options(cmd.argv, "-spice")
    parts = spice.split(",")
    for want in (f"tls-port={tls_port}", f"x509-dir={pki}", "tls-channel=default", "plaintext-channel=inputs",
                 "image-compression=auto_glz", "streaming-video=filter"):
        assert want in parts

    async def ask(q: Qmp) -> Any:
        return await q.execute("query-spice")
    info = in_qemu(cmd, ask)
    assert info["enabled"] and info["tls-port"] == tls_port and info["port"] == port


def test_opengl_display_needs_a_render_node(caps: HostCaps, scratch: Path) -> None:
    xml = domain_xml("<graphics type='egl-headless'><gl rendernode='/dev/dri/renderD128'/></graphics>")
    no_dri = dataclasses.replace(caps, host=HostFacts(present=frozenset()))
    with pytest.raises(DomainError) as e:
        translate(xml, no_dri, scratch)
    (p,) = e.value.problems
    assert p.path == "/domain/devices/graphics[1]/gl"
    assert "/dev/dri" in p.message and "lacks" in p.message
    with_dri = dataclasses.replace(caps, host=HostFacts(present=frozenset({"/dev/dri"})))
    _, cmd = translate(xml, with_dri, scratch)
    assert options(cmd.argv, "-display") == ["egl-headless,rendernode=/dev/dri/renderD128"]


# ---- channels and serial ports --------------------------------------------------------------------

def test_qemu_vdagent_channel(caps: HostCaps, scratch: Path) -> None:
    port = free_port()
    while port < 5900:
        port = free_port()
    _, cmd = translate(domain_xml(
        f"<graphics type='vnc' port='{port}' autoport='no' listen='127.0.0.1'/>"
        "<channel type='qemu-vdagent'><source><clipboard copypaste='yes'/><mouse mode='client'/></source>"
        "<target type='virtio' name='com.redhat.spice.0'/></channel>"), caps, scratch)
    assert "qemu-vdagent,id=charchannel0,name=vdagent,clipboard=on,mouse=on" in options(cmd.argv, "-chardev")

    async def ask(q: Qmp) -> Any:
        chardevs = {c["label"]: c["filename"] for c in await q.execute("query-chardev")}
        return chardevs, await qom(q, "/machine/peripheral/channel0", "name")
    chardevs, name = in_qemu(cmd, ask)
    assert chardevs["charchannel0"] == "qemu-vdagent"
    assert name == "com.redhat.spice.0"


AUTOASSIGN = (
    "<controller type='virtio-serial' index='0' ports='4' vectors='4'/>"
    "<controller type='virtio-serial' index='1'><address type='pci' domain='0' bus='0' slot='10' function='0'/></controller>"
    "<channel type='pty'><target type='virtio' name='p.0'/></channel>"
    "<channel type='pty'><target type='virtio' name='p.foo'/><address type='virtio-serial' controller='0' bus='2'/></channel>"
    "<channel type='pty'><target type='virtio' name='p.bar'/><address type='virtio-serial' controller='0' port='1'/></channel>"
    "<channel type='pty'><target type='virtio' name='p.wizz'/></channel>"
    "<channel type='pty'><target type='virtio' name='p.ooh'/></channel>"
    "<channel type='null'><target type='virtio' name='p.lla'/></channel>"
    "<channel type='null'><target type='virtio' name='p.more'/><address type='virtio-serial' controller='3'/></channel>"
)


def test_virtio_serial_ports_are_numbered_as_libvirt_does(caps: HostCaps, scratch: Path) -> None:
    """libvirt's channel-virtio-autoassign (+ a channel naming a controller the file lacks)."""
    _, cmd = translate(domain_xml(AUTOASSIGN), caps, scratch)
    ports = {d["id"]: (d["bus"], d["nr"]) for d in json_options(cmd.argv, "-device") if d["driver"] == "virtserialport"}
    assert ports == {"channel0": ("virtio-serial0.0", 2), "channel1": ("virtio-serial0.0", 3),
                     "channel2": ("virtio-serial0.0", 1), "channel3": ("virtio-serial1.0", 1),
                     "channel4": ("virtio-serial1.0", 2), "channel5": ("virtio-serial1.0", 3),
                     "channel6": ("virtio-serial3.0", 1)}
    ctrls = [d["id"] for d in json_options(cmd.argv, "-device") if d["driver"] == "virtio-serial-pci"]
    assert ctrls == ["virtio-serial0", "virtio-serial1", "virtio-serial3"]

    async def ask(q: Qmp) -> Any:
        got = {}
        for cid in ports:
            path = f"/machine/peripheral/{cid}"
            got[cid] = (str(await qom(q, path, "parent_bus")).rsplit("/", 1)[-1], await qom(q, path, "nr"))
        return got
    assert in_qemu(cmd, ask) == ports


def test_full_virtio_serial_controller_gets_a_new_one(caps: HostCaps, scratch: Path) -> None:
    """libvirt's channel-virtio-autoadd: controller 0 has 4 ports (1-3 for channels)."""
    chans = "".join(f"<channel type='null'><target type='virtio' name='c{n}'/></channel>" for n in range(5))
    _, cmd = translate(domain_xml("<controller type='virtio-serial' index='0' ports='4'/>" + chans), caps, scratch)
    ports = [(d["bus"], d["nr"]) for d in json_options(cmd.argv, "-device") if d["driver"] == "virtserialport"]
    assert ports == [("virtio-serial0.0", 1), ("virtio-serial0.0", 2), ("virtio-serial0.0", 3),
                     ("virtio-serial1.0", 1), ("virtio-serial1.0", 2)]

    async def ask(q: Qmp) -> Any:
        return await qom(q, "/machine/peripheral/channel4", "nr")
    assert in_qemu(cmd, ask) == 2


def test_guestfwd_channels(caps: HostCaps, scratch: Path) -> None:
    """Without a user NIC each forward has a netdev of its own (libvirt); with one, the forward
    is on that NIC's netdev, where the guest's traffic reaches it."""
    chans = ("<channel type='null'><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>"
             "<channel type='null'><target type='guestfwd' address='10.0.2.1' port='4601'/></channel>")
    _, cmd = translate(domain_xml(chans), caps, scratch)
    netdevs = json_options(cmd.argv, "-netdev")
    assert [(n["id"], n["guestfwd"][0]["str"]) for n in netdevs] == [
        ("channel0", "tcp:10.0.2.1:4600-chardev:charchannel0"), ("channel1", "tcp:10.0.2.1:4601-chardev:charchannel1")]

    async def ask(q: Qmp) -> Any:
        return await q.hmp("info network")
    info = in_qemu(cmd, ask)
    assert "channel0: index=0,type=user" in info and "channel1:" in info

    _, cmd = translate(domain_xml("<interface type='user'><mac address='52:54:00:00:00:07'/><model type='virtio'/></interface>"
                                  + chans), caps, scratch)
    (nd,) = json_options(cmd.argv, "-netdev")
    assert [r["str"] for r in nd["guestfwd"]] == ["tcp:10.0.2.1:4600-chardev:charchannel0",
                                                  "tcp:10.0.2.1:4601-chardev:charchannel1"]
    info = in_qemu(cmd, ask)
    assert "hostnet0: index=0,type=user" in info


def test_serial_vc_stdio_and_debugcon(caps: HostCaps, scratch: Path) -> None:
    _, cmd = translate(domain_xml("<serial type='vc'/><serial type='null'/><serial type='stdio'/>"
                                  "<serial type='pty'><target type='isa-debug'/><address type='isa' iobase='0x402'/></serial>"),
                       caps, scratch)
    assert any(w.path == "/domain/devices/serial[3]/@type" for w in cmd.warnings)
    devs = {d["id"]: d for d in json_options(cmd.argv, "-device")}
    assert devs["serial3"] == {"driver": "isa-debugcon", "chardev": "charserial3", "id": "serial3", "iobase": 0x402}
    assert [devs[f"serial{n}"]["index"] for n in range(3)] == [0, 1, 2]

    async def ask(q: Qmp) -> Any:
        return {c["label"]: c["filename"] for c in await q.execute("query-chardev")}
    chardevs = in_qemu(cmd, ask)
    assert chardevs["charserial0"] == "vc" and chardevs["charserial2"] == "stdio"
    assert chardevs["charserial3"].startswith("pty:")


def test_reconnect_in_bind_mode_is_refused(caps: HostCaps, scratch: Path) -> None:
    with pytest.raises(DomainError) as e:
        translate(domain_xml("<channel type='unix'><source mode='bind' path='/tmp/x.sock'>"
                             "<reconnect enabled='yes' timeout='10'/></source><target type='virtio' name='a'/></channel>"),
                  caps, scratch)
    (p,) = e.value.problems
    assert p.path == "/domain/devices/channel[1]/source/reconnect" and "connect mode" in p.message


# ---- NICs ----------------------------------------------------------------------------------------

def test_virtio_net_rss_hash_and_failover(caps: HostCaps, scratch: Path) -> None:
    _, cmd = translate(domain_xml(
        "<interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/>"
        "<driver rss='on' rss_hash_report='on'/><teaming type='persistent'/><alias name='ua-backup0'/></interface>"
        "<interface type='user'><mac address='52:54:00:00:00:02'/><model type='e1000'/>"
        "<driver name='vhost' queues='5'/><coalesce><rx><frames max='7'/></rx></coalesce><port isolated='yes'/>"
        "<vlan trunk='yes'><tag id='42'/></vlan></interface>"), caps, scratch)
    warned = {w.path for w in cmd.warnings}
    assert {"/domain/devices/interface[2]/driver/@queues", "/domain/devices/interface[2]/coalesce",
            "/domain/devices/interface[2]/port", "/domain/devices/interface[2]/vlan"} <= warned

    async def ask(q: Qmp) -> Any:
        p = "/machine/peripheral/ua-backup0"
        return [await qom(q, p, k) for k in ("rss", "hash", "failover")], await q.hmp("info network")
    props, info = in_qemu(cmd, ask)
    assert props == [True, True, True]
    assert "macaddr=52:54:00:00:00:02" in info


def test_multiqueue_on_a_virtio_user_nic_is_refused_like_libvirt(caps: HostCaps, scratch: Path) -> None:
    with pytest.raises(DomainError) as e:
        translate(domain_xml("<interface type='user'><model type='virtio'/><driver queues='4'/></interface>"),
                  caps, scratch)
    (p,) = e.value.problems
    assert p.path == "/domain/devices/interface[1]/driver/@queues" and "type 'user'" in p.message


def test_vhostuser_interface_argv(caps: HostCaps, scratch: Path) -> None:
    """vhost-user needs a live backend for QEMU to start (QEMU waits for it): argv only."""
    _, cmd = translate(domain_xml(
        "<interface type='vhostuser'><mac address='52:54:00:ee:96:6b'/>"
        "<source type='unix' path='/run/vu0.sock' mode='server'/><model type='virtio'/></interface>"
        "<interface type='vhostuser'><mac address='52:54:00:ee:96:6e'/>"
        "<source type='unix' path='/run/vu1.sock' mode='client'><reconnect enabled='yes' timeout='10'/></source>"
        "<model type='virtio'/><driver queues='4'/></interface>"), caps, scratch)
    assert options(cmd.argv, "-chardev")[-2:] == ["socket,id=charnet0,path=/run/vu0.sock,server=on",
                                                  "socket,id=charnet1,path=/run/vu1.sock,reconnect=10"]
    assert json_options(cmd.argv, "-netdev") == [
        {"type": "vhost-user", "chardev": "charnet0", "id": "hostnet0"},
        {"type": "vhost-user", "chardev": "charnet1", "queues": 4, "id": "hostnet1"}]
    net1 = next(d for d in json_options(cmd.argv, "-device") if d.get("id") == "net1")
    assert net1["mq"] is True and net1["vectors"] == 10
    assert any("shared" in w.message for w in cmd.warnings)


def test_tcp_serial_tls_from_qemud_conf(caps: HostCaps, scratch: Path) -> None:
    """A TLS server serial port (qemud.conf [chardev] tls), realized: QEMU loads the scratch certs."""
    pki = make_x509_dir(scratch / "pki")
    port = free_port()
    xml = domain_xml(f"<serial type='tcp'><source mode='bind' host='127.0.0.1' service='{port}'/>"
                     "<protocol type='raw'/><target port='0'/></serial>"
                     f"<serial type='tcp'><source mode='bind' host='127.0.0.1' service='{free_port()}' tls='no'/>"
                     "<target port='1'/></serial>")
    _, plain = translate(xml, caps, scratch)
    assert not any("tls-creds" in c for c in options(plain.argv, "-chardev"))
    _, cmd = translate(xml, caps.with_tls({"chardev": pki}), scratch)
    assert json_options(cmd.argv, "-object")[-1] == {"qom-type": "tls-creds-x509", "id": "objcharserial0_tls0",
                                                     "dir": pki, "endpoint": "server", "verify-peer": False}
    chardevs = options(cmd.argv, "-chardev")
    assert any(c.startswith("socket,id=charserial0,") and c.endswith("tls-creds=objcharserial0_tls0") or
               "tls-creds=objcharserial0_tls0," in c for c in chardevs)
    assert not any("charserial1" in c and "tls-creds" in c for c in chardevs)

    async def ask(q: Qmp) -> Any:
        return await q.execute("qom-get", {"path": "/objects/objcharserial0_tls0", "property": "endpoint"})
    assert in_qemu(cmd, ask) == "server"


def test_passt_backend_is_a_supervised_helper(caps: HostCaps, scratch: Path) -> None:
    """libvirt's net-user-passt port forwards become passt's -t/-u specs; passt runs as a helper
    on a socket QEMU connects to (-netdev stream), and forwards a host port into the guest."""
    from qemud import helpers
    from qemud.argv.net import passt_command
    xml = domain_xml(
        "<interface type='user'><mac address='00:11:22:33:44:55'/><source dev='eth42'/>"
        "<ip family='ipv4' address='172.17.2.0' prefix='24'/>"
        "<portForward proto='tcp' address='2001:db8:ac10:fd01::1:10'><range start='22' to='2022'/>"
        "<range start='1000' end='1050'/><range start='1020' exclude='yes'/>"
        "<range start='1030' end='1040' exclude='yes'/></portForward>"
        "<portForward proto='udp' address='1.2.3.4' dev='eth0'><range start='5000' end='5020' to='6000'/>"
        "<range start='5010' end='5015' exclude='yes'/></portForward>"
        "<model type='rtl8139'/><backend type='passt' logFile='/var/log/passt.log'/></interface>")
    domain = parse_domain(xml, "t.xml")
    argv = passt_command("/usr/bin/passt", domain.devices.interface[0], "00:11:22:33:44:55")
    assert argv == ["/usr/bin/passt", "--one-off", "--foreground", "--mac-addr", "00:11:22:33:44:55",
                    "--interface", "eth42", "--address", "172.17.2.0", "--netmask", "24",
                    "--log-file", "/var/log/passt.log",
                    "--tcp-ports", "2001:db8:ac10:fd01::1:10/22:2022,1000-1050,~1020,~1030-1040",
                    "--udp-ports", "1.2.3.4%eth0/5000-5020:6000-6020,~5010-5015"]
    with pytest.raises(DomainError) as e:
        translate(xml, dataclasses.replace(caps, host=dataclasses.replace(caps.host, helpers={})), scratch)
    assert e.value.problems[0].path == "/domain/devices/interface[1]/backend/@type"
    assert "lacks" in e.value.problems[0].message

    port = free_port()
    _, cmd = translate(domain_xml(
        "<interface type='user'><mac address='52:54:00:00:00:09'/><model type='virtio'/>"
        f"<portForward proto='tcp'><range start='{port}' to='22'/></portForward><backend type='passt'/></interface>"),
        caps, scratch)
    sock = scratch / "run" / "passt-net0.sock"
    (nd,) = json_options(cmd.argv, "-netdev")
    assert nd == {"type": "stream", "addr": {"type": "unix", "path": str(sock)}, "server": False, "id": "hostnet0"}
    (spec,) = cmd.helpers
    assert spec.socket == sock and f"{port}:22" in spec.argv
    prepare(cmd)
    running = helpers.start(cmd.helpers)
    try:
        async def ask(q: Qmp) -> Any:
            await asyncio.sleep(0.5)  # passt sets up its forwards once QEMU is connected
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass  # passt listens on the forwarded host port
            return await q.hmp("info network")
        info = in_qemu(cmd, ask, prepared=True)
        assert "hostnet0: index=0,type=stream" in info and "52:54:00:00:00:09" in info
    finally:
        helpers.stop_sync(running)


def test_vhostuser_interfaces_start_with_a_backend(caps: HostCaps, scratch: Path) -> None:
    """With a (stub) vhost-user backend on each socket, QEMU starts and has both NICs."""
    from tests.support.vhost_user_stub import VhostUserStub
    a, c = str(scratch / "vu0.sock"), str(scratch / "vu1.sock")
    _, cmd = translate(domain_xml(
        f"<interface type='vhostuser'><mac address='52:54:00:ee:96:6b'/><source type='unix' path='{a}' mode='server'/>"
        "<model type='virtio'/></interface>"
        f"<interface type='vhostuser'><mac address='52:54:00:ee:96:6e'/><source type='unix' path='{c}' mode='client'>"
        "<reconnect enabled='yes' timeout='1'/></source><model type='virtio'/><driver queues='2'/></interface>"),
        caps, scratch)
    stub = VhostUserStub([(a, "server"), (c, "client")])
    try:
        async def ask(q: Qmp) -> Any:
            return await q.hmp("info network")
        info = in_qemu(cmd, ask)
    finally:
        stub.close()
    assert "hostnet0: index=0,type=vhost-user" in info.replace("\r", "")
    assert "macaddr=52:54:00:ee:96:6e" in info


def test_dbus_display_on_a_private_bus_run_beside_qemu(caps: HostCaps, scratch: Path) -> None:
    """Without p2p or address, as libvirt: a dbus-daemon helper on a socket in the run dir."""
    from qemud import helpers
    _, cmd = translate(domain_xml("<graphics type='dbus'/>"), caps, scratch)
    sock = scratch / "run" / "dbus.sock"
    assert options(cmd.argv, "-display") == [f"dbus,addr=unix:path={sock}"]
    (spec,) = cmd.helpers
    assert spec.name == "dbus-daemon" and spec.socket == sock
    prepare(cmd)  # as the launcher: the runtime directory, then the helpers, then QEMU
    running = helpers.start(cmd.helpers)
    try:
        async def ask(q: Qmp) -> Any:
            return await q.execute("query-display-options")
        assert in_qemu(cmd, ask, prepared=True) == {"type": "dbus", "addr": f"unix:path={sock}"}
        (h,) = running
        assert h.proc.pid > 0
    finally:
        helpers.stop_sync(running)
    no_daemon = dataclasses.replace(caps, host=dataclasses.replace(caps.host, helpers={}))
    with pytest.raises(DomainError) as e:
        translate(domain_xml("<graphics type='dbus'/>"), no_daemon, scratch)
    assert e.value.problems[0].path == "/domain/devices/graphics[1]/@type"
    assert "dbus-daemon" in e.value.problems[0].message
