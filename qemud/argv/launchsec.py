"""``<launchSecurity type='sev'>``: an AMD SEV guest (sev-guest object, the machine's
confidential-guest-support), whose memory the host cannot read.

The launch blobs (``<dhCert>``, ``<session>``) are base64 text QEMU reads from files: qemud has
the launcher write them into the guest's runtime directory (libvirt does the same in its own)."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder, Prepare
from qemud.argv.qemuopts import opts

PATH = "/domain/launchSecurity"
SEV_DEVICE = "/dev/sev"
#: the C-bit position and physical address bits lost of AMD EPYC (libvirt reads them from the
#: host's SEV capabilities when the file has none; these are every EPYC generation's values)
DEFAULT_CBITPOS, DEFAULT_REDUCED_BITS = 47, 1


def _int(b: Builder, text: str | None, path: str, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), 0 if text.strip().lower().startswith("0x") else base)
    except ValueError:
        b.error(path, f"'{text}' is not an integer")
        return None


def add_launch_security(b: Builder) -> None:
    """The sev-guest object, and the machine property naming it (QEMU merges -machine options)."""
    ls = b.domain.launchSecurity
    if ls is None:
        return
    if ls.type != "sev":
        b.error(f"{PATH}/@type", f"launch security type '{ls.type}' is not supported by qemud on x86 "
                "QEMU 7.2 (only sev)")
        return
    if "sev-guest" not in b.caps.objects:
        b.error(PATH, f"SEV needs QEMU's sev-guest object, which {b.caps.emulator} does not have")
        return
    policy = _int(b, ls.policy.value if ls.policy else None, f"{PATH}/policy", 16)
    if ls.policy is None:
        b.error(f"{PATH}/policy", "an SEV guest needs a <policy>")
    cbit = _int(b, ls.cbitpos.value if ls.cbitpos else None, f"{PATH}/cbitpos")
    reduced = _int(b, ls.reducedPhysBits.value if ls.reducedPhysBits else None, f"{PATH}/reducedPhysBits")
    props: dict[str, Any] = {"qom-type": "sev-guest", "id": "lsec0",
                             "cbitpos": DEFAULT_CBITPOS if cbit is None else cbit,
                             "reduced-phys-bits": DEFAULT_REDUCED_BITS if reduced is None else reduced,
                             "policy": policy or 0}
    for tag, prop, fname in (("dhCert", "dh-cert-file", "dh_cert.base64"), ("session", "session-file", "session.base64")):
        blob = getattr(ls, tag)
        if blob is not None and blob.value:
            dest = b.paths.run / fname
            b.prepare.append(Prepare("write", dest, content=blob.value))
            props[prop] = str(dest)
    if ls.kernelHashes is not None:
        props["kernel-hashes"] = ls.kernelHashes
    b.obj(props)
    if not b.domain.kvm:
        b.error(f"{PATH}", "an SEV guest needs type='kvm': memory encryption is done by the AMD CPU")
    if not b.caps.host.has(SEV_DEVICE):
        b.error(PATH, f"needs {SEV_DEVICE}, which this host lacks (an AMD EPYC host with SEV enabled in "
                "its firmware and kvm_amd loaded with sev=1)")
    b.add("-machine", opts(("confidential-guest-support", "lsec0")))
