"""``<filesystem>``: virtio-9p shares (QEMU's own ``-fsdev local``) and virtiofs shares (a
vhost-user-fs-pci device talking to a virtiofsd that qemud runs beside QEMU)."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder, HelperSpec
from qemud.argv.virtio import virtio_props
from qemud.domain.devices.filesystem import Filesystem

#: libvirt's accessmode -> QEMU's fsdev security_model (squash: files are created as QEMU's user)
_SECURITY_MODEL = {"passthrough": "passthrough", "mapped": "mapped", "squash": "none"}
_9P_DRIVER = {"virtio": "virtio-9p-pci", "virtio-transitional": "virtio-9p-pci-transitional",
              "virtio-non-transitional": "virtio-9p-pci-non-transitional"}


def add_filesystems(b: Builder) -> None:
    for i, fs in enumerate(b.domain.devices.filesystem):
        path = f"/domain/devices/filesystem[{i + 1}]"
        if fs.type != "mount":
            b.error(f"{path}/@type", f"filesystem type '{fs.type}' is for container drivers; a QEMU guest "
                    "shares host directories with type='mount'")
            continue
        drv = fs.driver.type if fs.driver is not None and fs.driver.type not in (None, "default") else "path"
        if drv == "virtiofs":
            _virtiofs(b, fs, i, path)
        elif drv in ("path", "handle"):
            _ninep(b, fs, i, path, drv)
        else:
            b.error(f"{path}/driver/@type", f"filesystem driver '{drv}' is for container drivers; "
                    "QEMU guests use path (virtio-9p) or virtiofs")


def _mode(b: Builder, value: str | None, path: str) -> str | None:
    """fmode/dmode: octal permission bits, written as libvirt does (0644)."""
    if value is None:
        return None
    try:
        n = int(value, 8)
    except ValueError:
        n = -1
    if not 0 <= n <= 0o777:
        b.error(path, f"'{value}' is not an octal file mode (0000-0777)")
        return None
    return f"{n:04o}"


def _ninep(b: Builder, fs: Filesystem, i: int, path: str, drv: str) -> None:
    if fs.source is None or not fs.source.dir:
        b.error(f"{path}/source/@dir", "a 9p share needs the host directory to share")
        return
    if fs.binary is not None or fs.idmap is not None:
        b.error(f"{path}/binary" if fs.binary is not None else f"{path}/idmap",
                "only virtiofs shares have a helper binary or an id map; add <driver type='virtiofs'/>")
        return
    if drv == "handle":
        # QEMU 6.0 dropped the handle fsdev driver; its successor is the local driver
        b.error(f"{path}/driver/@type", f"the 9p 'handle' driver was removed from QEMU (6.0); "
                f"{b.caps.emulator} {'.'.join(map(str, b.caps.version))} has only the local one: "
                "use <driver type='path'/>")
        return
    if fs.driver is not None and fs.driver.queue is not None:
        b.error(f"{path}/driver/@queue", "a queue size applies to virtiofs shares only")
        return
    model = fs.model if fs.model not in (None, "default") else "virtio"
    driver = _9P_DRIVER[model]
    if not b.has_device(driver, path, "a 9p share"):
        return
    fid = b.alias(fs.alias, f"fs{i}", path)
    access = fs.accessmode if fs.accessmode not in (None, "default") else "passthrough"
    spec = ["local", f"security_model={_SECURITY_MODEL[access]}"]
    if fs.driver is not None and fs.driver.wrpolicy == "immediate":
        spec.append("writeout=immediate")
    fmode = _mode(b, fs.fmode, f"{path}/@fmode")
    dmode = _mode(b, fs.dmode, f"{path}/@dmode")
    if (fmode or dmode) and access != "mapped":
        b.error(f"{path}/@fmode" if fmode else f"{path}/@dmode",
                "file creation modes apply to accessmode='mapped' only (the others keep the guest's modes)")
        return
    if fmode:
        spec.append(f"fmode={fmode}")
    if dmode:
        spec.append(f"dmode={dmode}")
    if fs.multidevs not in (None, "default"):
        spec.append(f"multidevs={fs.multidevs}")
    if fs.readonly is not None:
        spec.append("readonly=on")
    spec += [f"id=fsdev-{fid}", f"path={_escape(fs.source.dir)}"]
    b.add("-fsdev", ",".join(spec))
    props: dict[str, Any] = {"driver": driver, "id": fid, "fsdev": f"fsdev-{fid}", "mount_tag": fs.target.dir}
    props.update(virtio_props(fs.driver))
    props.update(b.pci_props(fs.address, path, "9p share"))
    b.device(props)


def _escape(value: str) -> str:
    """A QemuOpts value: commas doubled."""
    return value.replace(",", ",,")


def _fuse_escape(value: str) -> str:
    """A value in virtiofsd's ``-o`` list, which libfuse's fuse_opt splits on ',' with '\\' as
    the escape (not QemuOpts' ',,': with that, dir='/srv\\,source=/' served the host's root)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def shared_memory(b: Builder) -> bool:
    """Whether the guest's RAM can be mapped by another process (vhost-user needs that):
    <memoryBacking><access mode='shared'/> or every NUMA cell memAccess='shared'."""
    d = b.domain
    mb = getattr(d, "memoryBacking", None)  # modelled on another branch; read it where it exists
    access = getattr(mb, "access", None) if mb is not None else None
    if access is not None and getattr(access, "mode", None) == "shared":
        cells = d.cpu.numa.cell if d.cpu is not None and d.cpu.numa is not None else ()
        return all(c.memAccess != "private" for c in cells)
    cells = d.cpu.numa.cell if d.cpu is not None and d.cpu.numa is not None else ()
    return bool(cells) and all(c.memAccess == "shared" for c in cells)


def _virtiofs(b: Builder, fs: Filesystem, i: int, path: str) -> None:
    ok = True
    if fs.readonly is not None:
        b.error(f"{path}/readonly", "virtiofs does not support read-only shares (virtiofsd has no such mode); "
                "use a 9p share for a read-only directory")
        ok = False
    if fs.accessmode not in (None, "default", "passthrough"):
        b.error(f"{path}/@accessmode", "virtiofs shares support only accessmode='passthrough'")
        ok = False
    if fs.model not in (None, "default", "virtio"):
        b.error(f"{path}/@model", f"virtiofs has no {fs.model} device; leave the model out")
        ok = False
    if fs.multidevs not in (None, "default") or fs.fmode or fs.dmode:
        b.error(path, "multidevs, fmode and dmode are 9p settings; virtiofs has none of them")
        ok = False
    if fs.driver is not None and fs.driver.wrpolicy not in (None, "default"):
        b.error(f"{path}/driver/@wrpolicy", "a write policy applies to 9p shares only")
        ok = False
    if not shared_memory(b):
        b.error(path, "virtiofs needs the guest's memory shared with virtiofsd: add <memoryBacking><access "
                "mode='shared'/></memoryBacking> or memAccess='shared' on every <cpu><numa><cell>")
        ok = False
    if not b.has_device("vhost-user-fs-pci", path, "a virtiofs share"):
        ok = False
    src = fs.source
    external = src is not None and src.socket is not None
    if not external and (src is None or not src.dir):
        b.error(f"{path}/source/@dir", "a virtiofs share needs the host directory (dir=) or the socket of a "
                "virtiofsd that runs already (socket=)")
        ok = False
    fid = b.alias(fs.alias, f"fs{i}", path)
    cid = f"chr-vu-{fid}"
    if external:
        if fs.binary is not None or fs.idmap is not None:
            b.error(f"{path}/source/@socket", "a share served by an external virtiofsd (socket=) cannot also "
                    "say how qemud should run virtiofsd (<binary>, <idmap>)")
            ok = False
        assert src is not None and src.socket is not None
        sock = src.socket
    else:
        sock_path = b.paths.run / f"{fid}-fs.sock"
        sock = b.socket_path(sock_path, path)
        argv = _virtiofsd_argv(b, fs, path)
        if argv is None:
            ok = False
        elif ok:
            b.helpers.append(HelperSpec(name=f"virtiofsd-{fid}", argv=argv, socket=sock_path,
                                        log=b.paths.run / f"virtiofsd-{fid}.log", privileged=True))
    if not ok:
        return
    b.add("-chardev", f"socket,id={cid},path={_escape(sock)}")
    props: dict[str, Any] = {"driver": "vhost-user-fs-pci", "id": fid, "chardev": cid}
    if fs.driver is not None and fs.driver.queue is not None:
        props["queue-size"] = fs.driver.queue
    props["tag"] = fs.target.dir
    props.update(virtio_props(fs.driver))
    if fs.boot is not None:
        props["bootindex"] = fs.boot.order
    props.update(b.pci_props(fs.address, path, "virtiofs share"))
    b.device(props)


def _virtiofsd_argv(b: Builder, fs: Filesystem, path: str) -> list[str] | None:
    """virtiofsd's command line (the C virtiofsd QEMU 7.2 ships: ``-o`` options, ``--fd``)."""
    found = b.caps.host.helpers.get("virtiofsd")
    binary = fs.binary
    exe = found
    if binary is not None and binary.path and binary.path != found:
        if found is not None:
            # qemud differs from libvirt here: libvirt fails when <binary path> is missing; qemud
            # serves the share with the virtiofsd this host has and says so
            b.warn(f"{path}/binary/@path", f"{binary.path} is not on this host; qemud runs {found} instead")
    if exe is None:
        b.error(f"{path}/driver/@type", "a virtiofs share needs virtiofsd, which this host lacks (install "
                "Debian's qemu-system-common, which ships /usr/lib/qemu/virtiofsd)")
        return None
    if fs.idmap is not None:
        b.error(f"{path}/idmap", f"{exe} (the C virtiofsd) cannot map user ids; an <idmap> needs the Rust "
                "virtiofsd, which this host lacks")
        return None
    assert fs.source is not None and fs.source.dir is not None
    o = [f"source={_fuse_escape(fs.source.dir)}"]
    if binary is not None:
        if binary.xattr is not None:
            o.append("xattr" if binary.xattr else "no_xattr")
        if binary.cache is not None and binary.cache.mode != "default":
            o.append(f"cache={binary.cache.mode}")
        if binary.sandbox is not None and binary.sandbox.mode != "default":
            o.append(f"sandbox={binary.sandbox.mode}")
        if binary.lock is not None:
            if binary.lock.posix is not None:
                o.append("posix_lock" if binary.lock.posix else "no_posix_lock")
            if binary.lock.flock is not None:
                o.append("flock" if binary.lock.flock else "no_flock")
    argv = [exe, "--fd={fd}", "-o", ",".join(o)]
    if binary is not None and binary.thread_pool is not None:
        argv.append(f"--thread-pool-size={binary.thread_pool.size}")
    return argv
