"""``<disk>``: a -blockdev pair (protocol + format node) and a -device on its bus."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.controllers import controller_id, scsi_model
from qemud.argv.virtio import add_virtio_props, refuse_virtio_options
from qemud.domain.devices.controller import Controller
from qemud.domain.devices.disk import Disk, target_index

#: libvirt cache modes -> (cache.direct, cache.no-flush, write-cache on the device)
CACHE = {
    "default": None, "none": (True, False, True), "writethrough": (False, False, False),
    "writeback": (False, False, True), "directsync": (True, False, False), "unsafe": (False, True, True),
}
#: formats QEMU 7.2 has block drivers for
FORMATS = {"raw", "qcow2", "qed", "vmdk", "vpc", "vdi", "vhdx", "luks", "dmg", "bochs", "cloop",
           "parallels", "qcow"}
NETWORK_DRIVERS = {"nbd": "nbd", "iscsi": "iscsi", "http": "http", "https": "https", "ftp": "ftp",
                   "ftps": "ftps", "rbd": "rbd", "gluster": "gluster", "ssh": "ssh", "nfs": "nfs"}


def _ctrl(b: Builder, kind: str, index: int) -> Controller | None:
    for c in b.domain.devices.controller:
        if c.type == kind and c.index == index:
            return c
    if kind == "scsi":
        return scsi_controller(b, index)
    return None


def implicit_scsi_controllers(domain: Any) -> list[Controller]:
    """The SCSI controllers libvirt adds for SCSI disks whose controller is not in the file
    (virDomainDefAddDiskControllersForType): one per missing index up to the highest used, of
    the default model (lsilogic on x86, as libvirt's qemuDomainDefaultSCSIControllerModel)."""
    have = {c.index for c in domain.devices.controller if c.type == "scsi"}
    want: set[int] = set()
    for d in domain.devices.disk:
        if d.bus == "scsi":
            want.add(drive_address(d, "scsi")[0])
    if not want:
        return []
    return [Controller.model_validate({"@type": "scsi", "@index": str(n)})
            for n in range(max(want) + 1) if n not in have]


def scsi_controller(b: Builder, index: int) -> Controller | None:
    """SCSI controller ``index``: from the file, or the one libvirt would add."""
    for c in b.domain.devices.controller:
        if c.type == "scsi" and c.index == index:
            return c
    return next((c for c in implicit_scsi_controllers(b.domain) if c.index == index), None)


def drive_address(d: Disk, bus: str) -> tuple[int, int, int, int]:
    """(controller, bus, target, unit): the explicit <address type='drive'>, or libvirt's
    assignment from the target name (virDomainDiskDefAssignAddress)."""
    a = d.address
    if a is not None and a.type == "drive":
        return a.controller or 0, a.bus or 0, a.target or 0, a.unit or 0
    idx = target_index(d.target.dev)
    if bus == "ide":
        return idx // 4, (idx % 4) // 2, 0, idx % 2
    if bus == "sata":
        return idx // 6, 0, 0, idx % 6
    if bus == "scsi":
        return idx // 7, 0, 0, idx % 7
    if bus == "fdc":
        return 0, 0, 0, idx % 2
    return 0, 0, 0, idx


def _storage(b: Builder, d: Disk, path: str, node: str) -> dict[str, Any] | None:
    """The protocol node, or None for an empty drive, or {} after an error."""
    src = d.source
    props: dict[str, Any] = {"node-name": node}
    fmt = d.driver.type if d.driver is not None else None
    if src is not None and (src.pool or src.volume):
        b.error(f"{path}/source/@pool", "storage pool volumes need libvirt's storage pool driver, which "
                "qemud does not have; name the volume's file or device instead (<disk type='file'> or 'block')")
        return {}
    if src is not None and src.fdgroup:
        b.error(f"{path}/source/@fdgroup", "file descriptors passed in through libvirt's API "
                "(virDomainFDAssociate) do not exist for qemud; name the file instead")
        return {}
    if d.type in ("volume", "nvme", "vhostuser"):
        why = {"volume": "storage pool volumes need libvirt's storage pool driver; name the file or device instead",
               "nvme": "an NVMe disk needs the host controller bound to vfio-pci, which qemud does not manage",
               "vhostuser": "vhost-user disks need a shared-memory backend and a vhost-user-blk server, "
                            "which qemud does not manage yet"}[d.type]
        b.error(f"{path}/@type", f"disk type '{d.type}' is not supported: {why}")
        return {}
    if d.type == "dir" or fmt in ("dir", "fat"):
        # a host directory shown to the guest as a FAT disk (QEMU's vvfat): libvirt's <disk
        # type='dir'>, and qemud also takes <driver type='dir'> on a directory path
        where = (src.dir if d.type == "dir" else d.path) if src is not None else None
        if not where:
            b.error(f"{path}/source", "a directory disk needs <source dir='...'>")
            return {}
        # writable unless read-only, as libvirt (a hard disk device needs a writable node);
        # QEMU then writes the guest's changes back into the directory's files
        props.update(driver="vvfat", dir=where, floppy=d.device == "floppy", rw=not d.is_readonly)
        if not d.is_readonly:
            b.warn(f"{path}/source", f"the guest writes into {where} through QEMU's vvfat, whose write "
                   "support QEMU calls experimental; add <readonly/> unless the guest must write")
        props["auto-read-only"] = True
        props["discard"] = "unmap"
        return props
    if d.type in ("file", "block"):
        p = d.path
        if not p:
            if d.device in ("cdrom", "floppy"):
                return None
            b.error(f"{path}/source", f"a {d.type} disk needs a <source {'file' if d.type == 'file' else 'dev'}='...'>")
            return {}
        if d.type == "file":
            props.update(driver="file", filename=p)
        else:
            props.update(driver="host_cdrom" if d.device == "cdrom" else "host_device", filename=p)
        if src is not None and src.reservations is not None:
            if not _reservations(b, d, path, node, props):
                return {}
    elif d.type == "network":
        proto = src.protocol if src is not None else None
        if proto is None:
            if d.device in ("cdrom", "floppy") and (src is None or not (src.name or src.host)):
                return None  # libvirt: a network CD-ROM without a source is an empty drive
            b.error(f"{path}/source/@protocol", "a network disk needs a protocol")
            return {}
        if not _network(b, d, path, proto, props):
            return {}
    else:
        b.error(f"{path}/@type", f"disk type '{d.type}' is not supported by qemud; use file, block or network")
        return {}
    drv = d.driver
    if drv is not None:
        if drv.cache and CACHE.get(drv.cache):
            direct, noflush, _ = CACHE[drv.cache]  # type: ignore[misc]
            props["cache"] = {"direct": direct, "no-flush": noflush}
        if drv.io and d.type != "network":
            props["aio"] = drv.io
    props["auto-read-only"] = True
    props["discard"] = "unmap"
    return props


_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_VALUE = re.compile(r'"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"|[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*')
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def network_host(b: Builder, name: str, path: str) -> str | None:
    """A <host name=...> as it goes into a portal ("host:port") or a URL: an IPv6 address in
    brackets, a host name or IPv4 address as it is; anything else is refused (libiscsi reads
    ',' as a portal group tag and the last ':' as the port, a URL reads '/', '@', '?')."""
    try:
        if ipaddress.ip_address(name).version == 6:
            return f"[{name}]"
        return name
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(name):
        b.error(path, f"{name!r} is not a host name or an IP address")
        return None
    return name


def _network(b: Builder, d: Disk, path: str, proto: str, props: dict[str, Any]) -> bool:
    """Fill the protocol node of a network disk; False after an error."""
    src = d.source
    assert src is not None
    drv = NETWORK_DRIVERS.get(proto)
    if drv is None:
        b.error(f"{path}/source/@protocol", f"network protocol '{proto}' is not available in QEMU 7.2")
        return False
    hosts = src.host
    name = src.name or ""
    h = hosts[0] if hosts else None
    auth = src.auth or d.auth
    auth_path = f"{path}/source/auth" if src.auth is not None else f"{path}/auth"
    if src.auth is not None and d.auth is not None:
        b.error(f"{path}/auth", "<auth> is given both in <disk> and in <source>; keep one")
        return False
    if auth is not None and proto not in ("iscsi", "rbd", "http", "https", "ftp", "ftps"):
        b.error(auth_path, f"a {proto} disk takes no <auth> in QEMU (iscsi, rbd and http(s)/ftp(s) do)")
        return False
    if proto == "nbd":
        if h is not None and h.transport == "unix":
            if not h.socket:
                b.error(f"{path}/source/host/@socket", "an NBD disk over a unix socket needs its path")
                return False
            server: dict[str, Any] = {"type": "unix", "path": h.socket}
        elif h is not None:
            server = {"type": "inet", "host": h.name or "localhost", "port": str(h.port or 10809)}
        else:
            b.error(f"{path}/source/host", "an NBD disk needs a <host>")
            return False
        props.update(driver="nbd", server=server)
        if name:
            props["export"] = name
        if src.reconnect is not None:
            props["reconnect-delay"] = src.reconnect.delay
    elif proto in ("http", "https", "ftp", "ftps"):
        if h is None or not h.name:
            b.error(f"{path}/source/host", f"an {proto} disk needs a <host name=...>")
            return False
        port = f":{h.port}" if h.port else ""
        from urllib.parse import quote
        host = network_host(b, h.name, f"{path}/source/host/@name")
        if host is None:
            return False
        url = f"{proto}://{host}{port}/{quote(name.lstrip('/'), safe='/')}"
        if src.query:
            url += "?" + src.query
        props.update(driver=proto, url=url)
        if src.timeout is not None:
            props["timeout"] = src.timeout.seconds
        if src.readahead is not None:
            props["readahead"] = src.readahead.size
        if src.ssl is not None:
            if proto not in ("https", "ftps"):
                b.error(f"{path}/source/ssl", f"<ssl> applies to https and ftps, not {proto}")
                return False
            props["sslverify"] = src.ssl.verify
        if src.cookies is not None and src.cookies.cookie:
            if proto not in ("http", "https"):
                b.error(f"{path}/source/cookies", f"cookies apply to http and https, not {proto}")
                return False
            for j, c in enumerate(src.cookies.cookie):
                # RFC 6265, as libvirt checks them: QEMU hands the list to curl as the Cookie
                # header, where ';' adds a cookie and a newline a header
                if not _COOKIE_NAME.fullmatch(c.name) or not _COOKIE_VALUE.fullmatch(c.value):
                    b.error(f"{path}/source/cookies/cookie[{j + 1}]", f"{c.name!r}={c.value!r} is not a valid "
                            "cookie (RFC 6265: a token for the name; no ';', ',', '\\', spaces or quotes inside "
                            "the value)")
                    return False
            props["cookie"] = "; ".join(f"{c.name}={c.value}" for c in src.cookies.cookie)
        if auth is not None and not _auth(b, auth, auth_path, props, None, "username", "password-secret"):
            return False
    elif proto == "iscsi":
        if h is None or not h.name:
            b.error(f"{path}/source/host", "an iSCSI disk needs a <host name=...>")
            return False
        target, _, lun = name.partition("/")
        if lun and not (lun.isascii() and lun.isdigit()):
            b.error(f"{path}/source/@name", f"'{lun}' is not a LUN number (name='IQN/LUN')")
            return False
        host = network_host(b, h.name, f"{path}/source/host/@name")
        if host is None:
            return False
        props.update(driver="iscsi", transport="tcp", portal=f"{host}:{h.port or 3260}",
                     target=target, lun=int(lun or 0))
        if src.initiator is not None and src.initiator.iqn is not None:
            props["initiator-name"] = src.initiator.iqn.name
        if auth is not None and not _auth(b, auth, auth_path, props, "iscsi", "user", "password-secret"):
            return False
    elif proto == "rbd":
        pool, _, image = name.partition("/")
        if not image:
            b.error(f"{path}/source/@name", f"'{name}' is not 'pool/image'")
            return False
        image, _, snap = image.partition("@")
        props.update(driver="rbd", pool=pool, image=image)
        if src.snapshot is not None:
            snap = src.snapshot.name
        if snap:
            props["snapshot"] = snap
        if hosts:
            props["server"] = [{"host": x.name or "localhost", "port": str(x.port or 6789)} for x in hosts]
        if src.config is not None:
            cfg = getattr(src.config, "file", None) or (src.config.model_extra or {}).get("@file")
            if cfg:
                props["conf"] = cfg
        if auth is not None:
            if not _auth(b, auth, auth_path, props, "ceph", "user", "key-secret", fmt="base64"):
                return False
            props["auth-client-required"] = ["cephx", "none"]
        if not _rbd_encryption(b, d, path, props):
            return False
    elif proto == "nfs":
        if h is None or not h.name:
            b.error(f"{path}/source/host", "an NFS disk needs a <host name=...>")
            return False
        props.update(driver="nfs", server={"type": "inet", "host": h.name}, path=name)
        ident = src.identity
        if ident is not None:
            for attr_, prop in (("user", "user"), ("group", "group")):
                v = getattr(ident, attr_)
                if v is None:
                    continue
                num = v.lstrip("+")
                if not (num.isascii() and num.isdigit()):
                    b.error(f"{path}/source/identity/@{attr_}", f"'{v}' must be a numeric {'uid' if attr_ == 'user' else 'gid'} "
                            "(+N): qemud does not look up host user names for QEMU's NFS client")
                    return False
                props[prop] = int(num)
    elif proto == "ssh":
        if h is None or not h.name:
            b.error(f"{path}/source/host", "an ssh disk needs a <host name=...>")
            return False
        props.update(driver="ssh", path=name, server={"host": h.name, "port": str(h.port or 22)})
    elif proto == "gluster":
        vol, _, image = name.lstrip("/").partition("/")
        if not vol or not image:
            b.error(f"{path}/source/@name", f"'{name}' is not 'volume/path' of a gluster image")
            return False
        servers: list[dict[str, Any]] = []
        for j, x in enumerate(hosts):
            if x.transport == "unix":
                if not x.socket:
                    b.error(f"{path}/source/host[{j + 1}]/@socket", "a unix gluster server needs its socket path")
                    return False
                servers.append({"type": "unix", "path": x.socket})
            elif x.transport == "rdma":
                b.error(f"{path}/source/host[{j + 1}]/@transport", "QEMU's gluster driver has no RDMA transport")
                return False
            else:
                servers.append({"type": "inet", "host": x.name or "localhost", "port": str(x.port or 24007)})
        if not servers:
            b.error(f"{path}/source/host", "a gluster disk needs a <host>")
            return False
        props.update(driver="gluster", volume=vol, path=image, server=servers, debug=4)
    else:
        b.error(f"{path}/source/@protocol", f"network protocol '{proto}' is not supported by qemud yet")
        return False
    if src.tls:
        if proto not in ("nbd", "vxhs"):
            b.error(f"{path}/source/@tls", f"TLS applies to nbd disks, not {proto}")
            return False
        cid = tls_creds(b, f"{path}/source/@tls")
        if cid is None:
            return False
        props["tls-creds"] = cid
        if src.tlsHostname:
            props["tls-hostname"] = src.tlsHostname
    return True


def _rbd_encryption(b: Builder, d: Disk, path: str, props: dict[str, Any]) -> bool:
    """<encryption engine='librbd'>: librbd decrypts (LUKS1, LUKS2 or either) below the format."""
    enc = d.encryption or (d.source.encryption if d.source is not None else None)
    if enc is None or enc.engine != "librbd":
        return True
    epath = f"{path}/encryption" if d.encryption is not None else f"{path}/source/encryption"
    efmt = enc.format or "luks"
    if efmt not in ("luks", "luks2", "luks-any"):
        b.error(f"{epath}/@format", f"librbd encrypts with luks, luks2 or luks-any, not '{efmt}'")
        return False
    secret = _passphrase(b, enc, epath, "encryption")
    if secret is None:
        return False
    sid = secret_object(b, secret, f"{epath}/secret", f"{props['node-name']}-encryption-secret")
    if sid is None:
        return False
    props["encrypt"] = {"format": efmt, "key-secret": sid}
    return True


_SECRET_KIND = {"iscsi": "an iSCSI disk", "ceph": "an rbd disk"}


def _auth(b: Builder, auth: Any, auth_path: str, props: dict[str, Any], kind: str | None, user_key: str,
          secret_key: str, fmt: str = "raw") -> bool:
    """A network disk's <auth username><secret>: the user and a secret object QEMU reads from the
    secrets directory, under the protocol's property names; False after an error."""
    if kind is not None and auth.secret.type not in (None, kind):
        b.error(f"{auth_path}/secret/@type", f"{_SECRET_KIND[kind]}'s secret has type='{kind}', not '{auth.secret.type}'")
        return False
    sid = secret_object(b, auth.secret, f"{auth_path}/secret", f"{props['node-name']}-auth-secret", fmt=fmt)
    if sid is None:
        return False
    if auth.username:
        props[user_key] = auth.username
    props[secret_key] = sid
    return True


def _passphrase(b: Builder, enc: Any, epath: str, what: str) -> Any | None:
    """The one passphrase <secret> of an <encryption>, or None after an error."""
    secrets = [s for s in enc.secret if s.type in (None, "passphrase")]
    if len(secrets) != 1:
        b.error(f"{epath}/secret", f"{what} needs exactly one <secret type='passphrase' uuid=...|usage=...>")
        return None
    return secrets[0]


def secret_object(b: Builder, ref: Any, elem: str, sid: str, fmt: str = "raw") -> str | None:
    """A ``-object secret`` QEMU reads from the secret's file (qemud.secrets); its id, or None
    after an error.  The translator only names the file: the launcher checks it exists."""
    from pathlib import Path

    from qemud.argv.builder import Prepare
    from qemud.secrets import secret_file_name
    name = secret_file_name(ref.uuid, ref.usage)
    if name is None:
        b.error(elem, "a <secret> needs a uuid='...' (a valid UUID) or a usage='...'")
        return None
    # QEMU (as its unprivileged user) reads a copy in the guest's runtime directory, made at each
    # start and removed once QEMU runs: the secrets directory itself is root's alone
    f = b.paths.run / f"secret-{name}"
    b.prepare.append(Prepare("secret", f, source=Path(b.caps.host.secrets) / name, element=elem))
    b.obj({"qom-type": "secret", "id": sid, "format": fmt, "file": str(f)})
    return sid


def tls_creds(b: Builder, elem: str) -> str | None:
    """The x509 TLS credentials object network disks share (the host's configured directory)."""
    d = b.caps.host.tls_x509_dir
    if not d:
        b.error(elem, "TLS needs an x509 certificate directory (ca-cert.pem, client-cert.pem, "
                "client-key.pem); set [tls] x509_dir in qemud.conf")
        return None
    cid = "objdisk-tls0"
    if cid not in b.ids:
        b.ids.add(cid)
        b.obj({"qom-type": "tls-creds-x509", "id": cid, "dir": d, "endpoint": "client", "verify-peer": True})
    return cid


def _reservations(b: Builder, d: Disk, path: str, node: str, props: dict[str, Any]) -> bool:
    """<reservations>: SCSI persistent reservations through qemu-pr-helper (pr-manager-helper)."""
    r = d.source.reservations if d.source is not None else None
    assert r is not None
    rpath = f"{path}/source/reservations"
    if r.enabled is False:
        return True
    if d.device != "lun":
        b.error(rpath, "persistent reservations apply to device='lun' disks")
        return False
    if r.managed is not False:
        # libvirt starts a qemu-pr-helper of its own for the guest; qemud does not run helper
        # daemons beside QEMU
        helper = b.caps.host.helpers.get("qemu-pr-helper")
        b.error(f"{rpath}/@managed", "managed='yes' needs a qemu-pr-helper daemon started for the guest, which qemud "
                + ("does not do" if helper else "cannot do: this host has no qemu-pr-helper (install qemu-utils)")
                + "; run qemu-pr-helper yourself and use managed='no' with <source type='unix' path=...>")
        return False
    if r.source is None or not r.source.path:
        b.error(f"{rpath}/source", "managed='no' needs <source type='unix' path='...'> of a running qemu-pr-helper")
        return False
    oid = f"pr-helper-{node}"
    b.obj({"qom-type": "pr-manager-helper", "id": oid, "path": r.source.path})
    props["pr-manager"] = oid
    return True


def _format_name(d: Disk) -> str:
    """QEMU's format driver for the disk's <driver type>: iso is raw; a directory is raw over vvfat."""
    fmt = (d.driver.type if d.driver else None) or "raw"
    if fmt in ("iso", "dir", "fat"):
        return "raw"
    return fmt


def _disk_checks(b: Builder, d: Disk, path: str, bus: str) -> bool:
    """What libvirt refuses before building anything (qemuValidateDomainDeviceDefDisk)."""
    ok = True
    fmt = (d.driver.type if d.driver else None) or "raw"
    if fmt == "cow":
        b.error(f"{path}/driver/@type", "the 'cow' format (User Mode Linux's) was removed from QEMU "
                "in version 2.2, so QEMU 7.2 cannot open it; convert the image to qcow2 or raw")
        return False
    if fmt not in FORMATS | {"iso", "dir", "fat"}:
        b.error(f"{path}/driver/@type", f"image format '{fmt}' is not supported by QEMU 7.2")
        return False
    if fmt == "fat" and d.type != "dir":
        b.error(f"{path}/driver/@type", "the 'fat' format shows a host directory: use <disk type='dir'>")
        return False
    if d.driver is not None and d.driver.iothread is not None and bus != "virtio":
        b.error(f"{path}/driver/@iothread", "only virtio disks take an iothread")
        ok = False
    if d.shareable is not None and fmt not in ("raw",) and not d.is_readonly and d.device != "lun":
        # libvirt: qcow2 & co. cannot be shared safely: both writers would update metadata
        b.error(f"{path}/shareable", f"a shareable disk must be raw (or read-only): a '{fmt}' image "
                "written by two guests at once corrupts its metadata")
        ok = False
    addr = d.address
    if addr is not None and addr.type in ("pci", "usb", "ccw") and bus in ("ide", "sata", "scsi", "fdc"):
        b.error(f"{path}/address/@type", f"a {bus} disk sits on its {bus} controller: use <address type='drive'>")
        ok = False
    if addr is not None and addr.type not in ("usb",) and bus == "usb" and addr.type is not None:
        b.error(f"{path}/address/@type", "a USB disk sits on the USB bus: use <address type='usb'>")
        ok = False
    if addr is not None and addr.type == "drive":
        a = addr
        if bus == "fdc" and ((a.controller or 0) != 0 or (a.bus or 0) != 0 or (a.target or 0) != 0):
            b.error(f"{path}/address", "a floppy's drive address has controller 0, bus 0, target 0 "
                    "(only unit chooses drive A or B)")
            ok = False
        if bus in ("ide", "sata") and (a.target or 0) != 0:
            b.error(f"{path}/address/@target", f"an {bus.upper()} drive address has target 0")
            ok = False
        if bus == "scsi" and not _virtio_scsi(b, a.controller or 0) and (a.target or 0) != 0:
            b.error(f"{path}/address/@target", "this SCSI controller takes target 0 only (units choose the disk); "
                    "use model='virtio-scsi' for more targets")
            ok = False
    if d.encryption is not None and d.source is not None and d.source.encryption is not None:
        b.error(f"{path}/encryption", "<encryption> is given both in <disk> and in <source>; keep one")
        ok = False
    if (d.vendor is not None or d.product is not None) and bus != "scsi":
        b.error(f"{path}/vendor" if d.vendor is not None else f"{path}/product",
                "only a SCSI disk has a vendor and product (its inquiry data)")
        ok = False
    if bus == "scsi" and d.device == "disk" and d.product is not None and not _vpd_ok(d.product, 16):
        b.error(f"{path}/product", "a SCSI product id has at most 16 printable characters")
        ok = False
    if bus == "scsi" and d.vendor is not None and not _vpd_ok(d.vendor, 8):
        b.error(f"{path}/vendor", "a SCSI vendor id has at most 8 printable characters")
        ok = False
    if d.transient is not None:
        ok = _transient_checks(b, d, path) and ok
    return ok


def _vpd_ok(v: str, n: int) -> bool:
    return len(v) <= n and all(32 <= ord(c) < 127 for c in v)


def _virtio_scsi(b: Builder, index: int) -> bool:
    c = scsi_controller(b, index)
    return c is not None and scsi_model(c).startswith("virtio")


def _transient_checks(b: Builder, d: Disk, path: str) -> bool:
    if d.type != "file" or d.device != "disk":
        b.error(f"{path}/transient", "a transient disk is a file-backed hard disk (type='file' device='disk')")
        return False
    if d.is_readonly:
        b.error(f"{path}/transient", "a read-only disk cannot also be transient")
        return False
    if d.encryption is not None or (d.source is not None and d.source.encryption is not None):
        b.error(f"{path}/transient", "a transient disk over an encrypted image is not supported by qemud")
        return False
    if d.shareable is not None:
        b.error(f"{path}/transient", "a shareable disk cannot be transient (use shareBacking='yes' on <transient>)")
        return False
    if "qemu-img" not in b.caps.host.helpers:
        b.error(f"{path}/transient", "a transient disk's overlay is made with qemu-img, which this host lacks "
                "(install qemu-utils)")
        return False
    return True


def _encryption(b: Builder, d: Disk, path: str, node: str, fmt: str, props: dict[str, Any]) -> bool:
    """LUKS encryption on the format node: luks driver for raw images, qcow2's encrypt option."""
    enc = d.encryption or (d.source.encryption if d.source is not None else None)
    if enc is None:
        return True
    epath = f"{path}/encryption" if d.encryption is not None else f"{path}/source/encryption"
    efmt = enc.format or "default"
    for tag in ("cipher", "ivgen"):
        if getattr(enc, tag) is not None:
            b.error(f"{epath}/{tag}", f"<{tag}> describes how a storage volume is created; a disk reads it "
                    "from the LUKS header, so it does not belong here")
            return False
    if efmt == "qcow":
        b.error(f"{epath}/@format", "qcow's built-in AES encryption is refused by QEMU 7.2 "
                "(\"Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators\"); "
                "convert the image to LUKS: qemu-img convert -O qcow2 -o encrypt.format=luks ...")
        return False
    if enc.engine == "librbd":
        if d.type == "network" and d.source is not None and d.source.protocol == "rbd":
            return True  # on the rbd node itself (_rbd_encryption)
        b.error(f"{epath}/@engine", "engine='librbd' applies to rbd disks; use engine='qemu'")
        return False
    if efmt not in ("luks", "default"):
        b.error(f"{epath}/@format", f"'{efmt}' encryption needs engine='librbd' (an rbd disk); QEMU's own LUKS driver reads LUKS1")
        return False
    secret = _passphrase(b, enc, epath, "LUKS encryption")
    if secret is None:
        return False
    if fmt not in ("raw", "qcow2"):
        b.error(f"{epath}", f"LUKS encryption applies to raw or qcow2 images, not '{fmt}'")
        return False
    sid = secret_object(b, secret, f"{epath}/secret", f"{node}-encryption-secret")
    if sid is None:
        return False
    if fmt == "raw":
        props["driver"] = "luks"
        props["key-secret"] = sid
    else:
        props["encrypt"] = {"format": "luks", "key-secret": sid}
    return True


def _iotune_props(t: Any) -> dict[str, int]:
    """<iotune> -> QEMU's ThrottleLimits."""
    out: dict[str, int] = {}
    for kind, q in (("bytes", "bps"), ("iops", "iops")):
        for rw in ("total", "read", "write"):
            for suffix, qs in (("", ""), ("_max", "-max"), ("_max_length", "-max-length")):
                v = getattr(t, f"{rw}_{kind}_sec{suffix}")
                if v:
                    out[f"{q}-{rw}{qs}"] = v
    if t.size_iops_sec:
        out["iops-size"] = t.size_iops_sec
    return out


def _throttle(b: Builder, d: Disk, path: str, node: str, below: str) -> str | None:
    """A throttle filter node above ``below`` in a throttle-group of the disk's own (or its
    <group_name>'s, shared by every disk naming it).  libvirt sets the same limits over QMP after
    QEMU starts (block_set_io_throttle); qemud puts them in the command line so that they hold
    from the first I/O and need no step after the start."""
    t = d.iotune
    if t is None:
        return below
    lim = _iotune_props(t)
    for rw in ("read", "write"):
        for kind in ("bytes", "iops"):
            if getattr(t, f"total_{kind}_sec") and getattr(t, f"{rw}_{kind}_sec"):
                b.error(f"{path}/iotune/total_{kind}_sec", f"total_{kind}_sec cannot be combined with "
                        f"read_{kind}_sec or write_{kind}_sec")
                return None
            for suffix in ("_max", "_max_length"):
                if getattr(t, f"{rw}_{kind}_sec{suffix}") and not getattr(t, f"{rw}_{kind}_sec"):
                    b.error(f"{path}/iotune/{rw}_{kind}_sec{suffix}", f"needs {rw}_{kind}_sec as well")
                    return None
                if getattr(t, f"total_{kind}_sec{suffix}") and not getattr(t, f"total_{kind}_sec"):
                    b.error(f"{path}/iotune/total_{kind}_sec{suffix}", f"needs total_{kind}_sec as well")
                    return None
            for which in ("total", rw):
                mx, base = getattr(t, f"{which}_{kind}_sec_max"), getattr(t, f"{which}_{kind}_sec")
                if mx and base and mx < base:
                    b.error(f"{path}/iotune/{which}_{kind}_sec_max", f"is below {which}_{kind}_sec")
                    return None
    if not lim:
        return below  # all zero: no limits, as libvirt
    import re
    if t.group_name:
        gid = "throttle-" + re.sub(r"[^A-Za-z0-9_.-]", "_", t.group_name)
    else:
        gid = f"throttle-{node}"
    groups = b.throttle_groups
    if gid in groups:
        if groups[gid] != lim:
            b.error(f"{path}/iotune/group_name", f"group '{t.group_name}' is given different limits by two disks")
            return None
    else:
        groups[gid] = lim
        b.obj({"qom-type": "throttle-group", "id": gid, "limits": lim})
    top = f"{node}-throttle"
    b.add("-blockdev", _js({"driver": "throttle", "node-name": top, "throttle-group": gid, "file": below}))
    return top


def _graph(b: Builder, d: Disk, i: int, path: str) -> str | None:
    """The disk's -blockdev nodes, bottom up; the node the device uses, None for an empty drive,
    "" after an error."""
    node = f"drive{i}"
    b.elements[node] = path
    storage = _storage(b, d, path, f"{node}-file")
    if storage == {}:
        return ""
    if storage is None:
        if d.iotune is not None and _iotune_props(d.iotune):
            b.warn(f"{path}/iotune", "an empty drive has nothing to throttle; the limits are not applied")
        return None
    b.add("-blockdev", _js(storage))
    fmt = _format_name(d)
    below = f"{node}-file"
    src = d.source
    slices = src.slices.slice if src is not None and src.slices is not None else ()
    fmt_props: dict[str, Any] = {"node-name": node, "read-only": d.is_readonly or d.transient is not None,
                                 "driver": fmt, "file": below}
    if len(slices) > 1:
        b.error(f"{path}/source/slices", "one <slice type='storage'> at most")
        return ""
    if slices:
        sl = slices[0]
        if fmt == "raw" and d.encryption is None and (src is None or src.encryption is None):
            fmt_props.update(offset=sl.offset, size=sl.size)
        else:  # a raw node cuts the slice out; the format reads what is inside (libvirt's "slice-sto")
            b.add("-blockdev", _js({"driver": "raw", "node-name": f"{node}-slice", "offset": sl.offset,
                                    "size": sl.size, "file": below, "auto-read-only": True, "discard": "unmap"}))
            below = f"{node}-slice"
            fmt_props["file"] = below
    drv = d.driver
    if drv is not None:
        if drv.discard:
            fmt_props["discard"] = drv.discard
        if drv.detect_zeroes:
            dz = drv.detect_zeroes
            if dz == "unmap" and drv.discard != "unmap":
                dz = "on"
            fmt_props["detect-zeroes"] = dz
        if drv.cache and CACHE.get(drv.cache):
            direct, noflush, _ = CACHE[drv.cache]  # type: ignore[misc]
            fmt_props["cache"] = {"direct": direct, "no-flush": noflush}
        if drv.metadata_cache is not None and drv.metadata_cache.max_size is not None:
            if fmt != "qcow2":
                b.error(f"{path}/driver/metadata_cache", f"a metadata cache size applies to qcow2 images, not '{fmt}'")
                return ""
            fmt_props["cache-size"] = drv.metadata_cache.max_size.bytes
    if not _encryption(b, d, path, node, fmt, fmt_props):
        return ""
    b.add("-blockdev", _js(fmt_props))
    top = node
    if d.transient is not None:
        top = _transient(b, d, path, node, fmt)
    if d.driver is not None and d.driver.copy_on_read:
        # copy-on-read: a filter node above the format node, which the device then uses
        b.add("-blockdev", _js({"driver": "copy-on-read", "node-name": f"{node}-cor", "file": top}))
        top = f"{node}-cor"
    got = _throttle(b, d, path, node, top)
    return "" if got is None else got


def _transient(b: Builder, d: Disk, path: str, node: str, fmt: str) -> str:
    """<transient/>: the image is opened read-only under a qcow2 overlay in the guest's runtime
    directory; the guest's writes go to the overlay, which the launcher makes fresh at each start
    and discards when QEMU ends (libvirt makes it with blockdev-create after the start; qemud
    before, so the command line is complete).  The base is always opened read-only, which lets
    other guests share it (shareBacking='yes') and still keeps writers away."""
    from qemud.argv.builder import Prepare
    overlay = b.paths.run / "transient" / f"{node}.qcow2"
    b.prepare.append(Prepare("overlay", overlay, source=_path(d.path or ""), fmt=fmt,
                             helper=b.caps.host.helpers.get("qemu-img", "qemu-img"), element=f"{path}/transient"))
    b.add("-blockdev", _js({"driver": "file", "filename": str(overlay), "node-name": f"{node}-overlay-file",
                            "auto-read-only": True, "discard": "unmap"}))
    b.add("-blockdev", _js({"node-name": f"{node}-overlay", "read-only": False, "driver": "qcow2",
                            "file": f"{node}-overlay-file", "backing": node}))
    return f"{node}-overlay"


def _path(p: str):  # type: ignore[no-untyped-def]
    from pathlib import Path
    return Path(p)


def add_disks(b: Builder) -> None:
    counts: dict[str, int] = {}
    if not _unique(b):
        return
    _floppy_controller(b)
    for i, d in enumerate(b.domain.devices.disk):
        path = f"/domain/devices/disk[{i + 1}]"
        _disk(b, d, i, path, counts)


def _unique(b: Builder) -> bool:
    """Two disks may share neither a target name nor a drive address (libvirt's checks)."""
    ok = True
    targets: dict[str, int] = {}
    addrs: dict[tuple[str, int, int, int, int], int] = {}
    for i, d in enumerate(b.domain.devices.disk):
        path = f"/domain/devices/disk[{i + 1}]"
        dev = d.target.dev
        if dev in targets:
            b.error(f"{path}/target/@dev", f"target '{dev}' is also used by disk[{targets[dev] + 1}]")
            ok = False
        targets.setdefault(dev, i)
        bus = d.bus
        explicit = d.address is not None and d.address.type == "drive"
        # addresses from target names too (libvirt assigns before it checks); not for SCSI,
        # whose assignment depends on the controller model
        if (bus in ("ide", "sata", "fdc") and (explicit or d.address is None)) or (bus == "scsi" and explicit):
            key = (bus, *drive_address(d, bus))
            if key in addrs:
                b.error(f"{path}/address", f"drive address controller={key[1]} bus={key[2]} target={key[3]} "
                        f"unit={key[4]} on {bus} is also used by disk[{addrs[key] + 1}]")
                ok = False
            addrs.setdefault(key, i)
    return ok


def _floppy_controller(b: Builder) -> None:
    """Floppies sit on the ISA floppy controller: built into pc, added on q35. Their boot order
    is the controller's (bootindexA/B), the floppy device has none."""
    boot: dict[str, int] = {}
    floppies = [d for d in b.domain.devices.disk if d.device == "floppy"]
    if not floppies:
        return
    for d in floppies:
        bi = b.bootindex.get(id(d))
        if bi is not None:
            boot["bootindexA" if drive_address(d, "fdc")[3] == 0 else "bootindexB"] = bi
    if b.q35:
        b.device({"driver": "isa-fdc", "id": "fdc0", **boot})
    else:
        for k, v in boot.items():
            b.add("-global", f"isa-fdc.{k}={v}")


def _disk(b: Builder, d: Disk, i: int, path: str, counts: dict[str, int]) -> None:
    bus = d.bus
    if d.device == "lun":
        if bus != "scsi":
            b.error(f"{path}/target/@bus", "a disk device='lun' (SCSI passthrough) sits on a SCSI bus")
            return
        if d.type not in ("block", "network") or (d.type == "network" and (d.source is None or d.source.protocol != "iscsi")):
            b.error(f"{path}/@device", "disk device='lun' is only valid for a block device source "
                    "(or an iSCSI LUN): SCSI commands pass through to a real SCSI device")
            return
    if d.device == "floppy" and bus != "fdc":
        b.error(f"{path}/target/@bus", "a floppy sits on the fdc bus")
        return
    if bus == "fdc" and d.device != "floppy":
        b.error(f"{path}/@device", "only a floppy sits on the fdc bus")
        return
    if not _disk_checks(b, d, path, bus):
        return
    top = _graph(b, d, i, path)
    if top == "":
        return
    storage = top  # None: an empty drive (no medium)
    dev: dict[str, Any] = {}
    ctrl_i, bus_i, target_i, unit_i = drive_address(d, bus)
    addr = d.address
    if addr is not None and addr.type == "drive" and bus in ("virtio",):
        b.error(f"{path}/address/@type", "a virtio disk sits on PCI; use <address type='pci'>")
        return
    n = counts.get(bus, 0)
    counts[bus] = n + 1
    if bus == "virtio":
        model = d.model or "virtio"
        driver = {"virtio": "virtio-blk-pci", "virtio-transitional": "virtio-blk-pci-transitional",
                  "virtio-non-transitional": "virtio-blk-pci-non-transitional"}[model]
        if d.device == "cdrom":
            b.error(f"{path}/target/@bus", "a CD-ROM cannot sit on virtio; use sata, scsi or ide")
            return
        dev = {"driver": driver, **b.pci_props(addr, path, "virtio disk")}
        did = b.alias(d.alias, f"virtio-disk{target_index(d.target.dev)}", path)
        if d.driver is not None:
            if d.driver.queues:
                dev["num-queues"] = d.driver.queues
            if d.driver.iothread:
                dev["iothread"] = f"iothread{d.driver.iothread}"
            if d.driver.queue_size:
                dev["queue-size"] = d.driver.queue_size
    elif bus == "ide":
        if b.q35:
            b.error(f"{path}/target/@bus", "a q35 machine has no IDE bus; use bus='sata'")
            return
        if ctrl_i != 0 or bus_i > 1 or unit_i > 1:
            b.error(f"{path}/address" if addr else f"{path}/target/@dev",
                    f"IDE has 2 buses of 2 units on controller 0; {ctrl_i}:{bus_i}:{unit_i} does not exist")
            return
        dev = {"driver": "ide-cd" if d.device == "cdrom" else "ide-hd", "bus": f"ide.{bus_i}", "unit": unit_i}
        did = b.alias(d.alias, f"ide{ctrl_i}-{bus_i}-{unit_i}", path)
    elif bus == "sata":
        if bus_i != 0 or unit_i > 5:
            b.error(f"{path}/address" if addr else f"{path}/target/@dev", "a SATA controller has 6 ports (unit 0-5)")
            return
        if b.q35 and ctrl_i == 0:
            sata_bus = f"ide.{unit_i}"
        else:
            if _ctrl(b, "sata", ctrl_i) is None:
                b.error(path, f"there is no SATA controller with index {ctrl_i}; add <controller type='sata' index='{ctrl_i}'/>")
                return
            sata_bus = f"sata{ctrl_i}.{unit_i}"
        dev = {"driver": "ide-cd" if d.device == "cdrom" else "ide-hd", "bus": sata_bus}
        did = b.alias(d.alias, f"sata{ctrl_i}-0-{unit_i}", path)
    elif bus == "scsi":
        c = _ctrl(b, "scsi", ctrl_i)
        if c is None:
            b.error(path, f"there is no SCSI controller with index {ctrl_i}; add <controller type='scsi' index='{ctrl_i}' model='virtio-scsi'/>")
            return
        virtio = scsi_model(c).startswith("virtio")
        kind = {"cdrom": "scsi-cd", "lun": "scsi-block"}.get(d.device, "scsi-hd")
        dev = {"driver": kind, "bus": f"{controller_id(c)}.0"}
        if virtio:
            dev.update({"channel": bus_i, "scsi-id": target_i, "lun": unit_i})
        else:
            if unit_i > 6:
                b.error(f"{path}/address/@unit", "this SCSI controller has units 0-6")
                return
            dev.update({"scsi-id": unit_i, "lun": 0})
        did = b.alias(d.alias, f"scsi{ctrl_i}-{bus_i}-{target_i}-{unit_i}", path)
    elif bus == "usb":
        if b.usb_bus is None:
            b.error(f"{path}/target/@bus", "a USB disk needs a USB controller")
            return
        dev = {"driver": "usb-storage", "bus": b.usb_bus}
        if addr is not None and addr.type == "usb" and addr.port:
            dev["port"] = addr.port
        if d.target.removable is not None:
            dev["removable"] = d.target.removable
        did = b.alias(d.alias, f"usb-disk{target_index(d.target.dev)}", path)
    elif bus == "fdc":
        if unit_i > 1:
            b.error(f"{path}/target/@dev", "the floppy controller has drives A and B (fda, fdb)")
            return
        dev = {"driver": "floppy", "unit": unit_i}
        did = b.alias(d.alias, f"fdc0-0-{unit_i}", path)
    else:
        b.error(f"{path}/target/@bus", f"'{bus}' is not one of ide, sata, scsi, virtio, usb, fdc")
        return
    if top is not None:
        dev["drive"] = top
    dev["id"] = did
    if d.driver is not None and d.driver.cache and CACHE.get(d.driver.cache) and storage is not None:
        dev["write-cache"] = "on" if CACHE[d.driver.cache][2] else "off"  # type: ignore[index]
    drv = d.driver
    if drv is not None and storage is not None:
        if drv.error_policy:
            dev["werror"] = "enospc" if drv.error_policy == "enospace" else drv.error_policy
            if bus == "usb" or bus == "fdc":
                b.error(f"{path}/driver/@error_policy", f"a {bus} disk has no error policy in QEMU")
                return
        if drv.rerror_policy:
            dev["rerror"] = drv.rerror_policy
        if bus == "virtio":
            if drv.ioeventfd is not None:
                dev["ioeventfd"] = drv.ioeventfd
            if drv.event_idx is not None:
                dev["event_idx"] = drv.event_idx
    bi = b.bootindex.get(id(d))
    if bi is not None and bus != "fdc":
        dev["bootindex"] = bi
    if d.serial:
        dev["serial"] = d.serial
    if d.wwn and bus in ("scsi", "ide", "sata"):
        try:
            dev["wwn"] = int(d.wwn, 16)
        except ValueError:
            b.error(f"{path}/wwn", f"'{d.wwn}' is not a hexadecimal WWN")
    if d.vendor and bus == "scsi":
        dev["vendor"] = d.vendor
    if d.product and bus == "scsi":
        dev["product"] = d.product
    if d.target.rotation_rate is not None and bus in ("scsi", "ide", "sata"):
        dev["rotation_rate"] = d.target.rotation_rate
    if d.blockio is not None:
        if d.blockio.logical_block_size:
            dev["logical_block_size"] = d.blockio.logical_block_size
        if d.blockio.physical_block_size:
            dev["physical_block_size"] = d.blockio.physical_block_size
        if d.blockio.discard_granularity is not None:
            dev["discard_granularity"] = d.blockio.discard_granularity
    if d.geometry is not None and bus in ("ide", "sata", "virtio", "scsi"):
        dev.update({"cyls": d.geometry.cyls, "heads": d.geometry.heads, "secs": d.geometry.secs})
        if d.geometry.trans and bus in ("ide", "sata"):
            dev["bios-chs-trans"] = d.geometry.trans
    if d.shareable is not None and bus == "scsi":
        dev["share-rw"] = True
    elif d.shareable is not None:
        dev["share-rw"] = True
    if d.acpi is not None:
        if bus != "virtio":
            b.error(f"{path}/acpi", "an ACPI index names a PCI device's slot; only virtio disks sit on PCI")
            return
        if not 1 <= d.acpi.index <= 16383:
            b.error(f"{path}/acpi/@index", "must be between 1 and 16383")
            return
        dev["acpi-index"] = d.acpi.index
    if d.device == "cdrom" and d.target.tray == "open":
        b.warn(f"{path}/target/@tray", "the tray is closed at start")
    if bus == "virtio":
        dev = add_virtio_props(b, dev, d.driver, path)
    else:
        refuse_virtio_options(b, d.driver, path, f"a disk on bus '{bus}'")
    if bus == "usb" and d.device == "cdrom":
        _usb_cdrom(b, dev)
        return
    b.device(dev)


def _usb_cdrom(b: Builder, dev: dict[str, Any]) -> None:
    """A USB CD-ROM: a usb-bot mass-storage function with a scsi-cd on its bus.  usb-storage
    would show the guest a hard disk (with -blockdev it cannot tell a CD-ROM image from a disk
    one) and cannot exist without media; a scsi-cd is a CD-ROM drive, empty or not."""
    bot = {"driver": "usb-bot", "bus": dev["bus"], **({"port": dev["port"]} if "port" in dev else {}),
           "id": dev["id"]}
    cd = {k: v for k, v in dev.items() if k not in ("driver", "bus", "port", "id", "removable")}
    b.device(bot)
    b.device({"driver": "scsi-cd", "bus": f"{dev['id']}.0", "scsi-id": 0, "lun": 0, **cd,
              "id": f"{dev['id']}-cd"})


def _js(props: dict[str, Any]) -> str:
    from qemud.argv.qemuopts import js
    return js(props)


def add_iothreads(b: Builder) -> None:
    d = b.domain
    listed = d.iothreadids.iothread if d.iothreadids else ()
    n = max(d.iothreads or 0, len(listed))
    if n > 1024:
        b.error("/domain/iothreads", "at most 1024 I/O threads")
        return
    seen: set[int] = set()
    for i, t in enumerate(listed):
        path = f"/domain/iothreadids/iothread[{i + 1}]"
        if t.id == 0:
            b.error(f"{path}/@id", "iothread ids start at 1")
        if t.id in seen:
            b.error(f"{path}/@id", f"iothread id {t.id} is used twice")
        seen.add(t.id)
        if (t.thread_pool_min is not None and t.thread_pool_max is not None
                and t.thread_pool_min > t.thread_pool_max):
            b.error(f"{path}/@thread_pool_min", "is larger than thread_pool_max")
    by_id = {t.id: t for t in listed}
    ids = b.domain.iothread_ids
    for tid in ids:
        props: dict[str, Any] = {"qom-type": "iothread", "id": f"iothread{tid}"}
        t = by_id.get(tid)
        if t is not None:
            if t.thread_pool_min is not None:
                props["thread-pool-min"] = t.thread_pool_min
            if t.thread_pool_max is not None:
                props["thread-pool-max"] = t.thread_pool_max
            if t.poll is not None:
                for attr_, prop in (("max", "poll-max-ns"), ("grow", "poll-grow"), ("shrink", "poll-shrink")):
                    if getattr(t.poll, attr_) is not None:
                        props[prop] = getattr(t.poll, attr_)
        b.obj(props)
    dflt = d.defaultiothread
    if dflt is not None and (dflt.thread_pool_min is not None or dflt.thread_pool_max is not None):
        props = {"qom-type": "main-loop", "id": "main-loop"}
        if dflt.thread_pool_min is not None:
            props["thread-pool-min"] = dflt.thread_pool_min
        if dflt.thread_pool_max is not None:
            props["thread-pool-max"] = dflt.thread_pool_max
        b.obj(props)
    known = set(ids)
    what = f"<iothreads> is {n}" + (f" with ids {', '.join(map(str, ids))}" if listed else "")
    for i, disk in enumerate(d.devices.disk):
        if disk.driver is not None and disk.driver.iothread is not None and disk.driver.iothread not in known:
            b.error(f"/domain/devices/disk[{i + 1}]/driver/@iothread", f"iothread {disk.driver.iothread} does not exist; {what}")
    for i, c in enumerate(d.devices.controller):
        if (c.driver is not None and c.driver.iothread is not None and c.type == "scsi"
                and not scsi_model(c).startswith("virtio")):
            b.error(f"/domain/devices/controller[{i + 1}]/driver/@iothread",
                    f"only virtio-scsi controllers run on an iothread, not {scsi_model(c)}")
            continue
        if c.driver is not None and c.driver.iothread is not None and c.driver.iothread not in known:
            b.error(f"/domain/devices/controller[{i + 1}]/driver/@iothread", f"iothread {c.driver.iothread} does not exist; {what}")
