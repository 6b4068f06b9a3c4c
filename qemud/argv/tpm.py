"""``<tpm>``: a TPM device (tpm-tis, tpm-crb) and its backend: the host's TPM (passthrough), an
swtpm qemud runs beside QEMU (emulator), or an swtpm someone else runs (external)."""

from __future__ import annotations

from pathlib import Path

from qemud.argv.builder import Builder, HelperSpec, Prepare
from qemud.domain.devices.tpm import Tpm

#: the file swtpm_setup writes into a new TPM state directory, by TPM version
STATE_FILE = {"2.0": "tpm2-00.permall", "1.2": "tpm-00.permall"}


def add_tpms(b: Builder) -> None:
    tpms = b.domain.devices.tpm
    if len(tpms) > 1:
        b.error("/domain/devices/tpm[2]", "an x86 guest has one TPM")
        return
    for i, t in enumerate(tpms):
        _tpm(b, t, i, f"/domain/devices/tpm[{i + 1}]")


def _tpm(b: Builder, t: Tpm, i: int, path: str) -> None:
    be = t.backend
    if be is None:
        b.error(f"{path}/backend", "missing TPM device backend (<backend type='emulator'/>, 'passthrough' or "
                "'external')")
        return
    model = t.model or "tpm-tis"  # libvirt's default on x86
    if model in ("tpm-spapr", "spapr-tpm-proxy"):
        b.error(f"{path}/@model", f"TPM model '{model}' exists on pSeries (ppc64) only; x86 has tpm-tis and tpm-crb")
        return
    if not b.has_device(model, f"{path}/@model", f"a {model} TPM"):
        return
    if be.type != "emulator" and (be.version or be.encryption or be.active_pcr_banks or be.persistent_state):
        b.error(f"{path}/backend", "version, encryption, active_pcr_banks and persistent_state belong to "
                "the emulator backend")
        return
    tid = b.alias(t.alias, f"tpm{i}", path)
    dev = f"tpm-{tid}"
    if be.type == "passthrough":
        node = be.device.path if be.device is not None else "/dev/tpm0"
        if not b.caps.host.has(node):
            b.error(f"{path}/backend/device/@path", f"needs the host TPM {node}, which this host lacks "
                    "(a host without a TPM can give its guests an emulated one: <backend type='emulator'/>)")
            return
        b.add("-tpmdev", f"passthrough,id={dev},path={node.replace(',', ',,')}")
    elif be.type == "external":
        if be.source is None:
            b.error(f"{path}/backend/source", "an external TPM needs the swtpm's socket: <source type='unix' "
                    "mode='connect' path='...'/>")
            return
        b.add("-chardev", f"socket,id=chr{dev},path={be.source.path.replace(',', ',,')}")
        b.add("-tpmdev", f"emulator,id={dev},chardev=chr{dev}")
    else:
        if not _emulator(b, t, tid, path):
            return
        b.add("-chardev", f"socket,id=chr{dev},path={str(b.paths.run / f'swtpm-{tid}.sock').replace(',', ',,')}")
        b.add("-tpmdev", f"emulator,id={dev},chardev=chr{dev}")
    b.device({"driver": model, "tpmdev": dev, "id": tid})


def _emulator(b: Builder, t: Tpm, tid: str, path: str) -> bool:
    """swtpm as a helper of the guest, its state kept in the guest's persistent directory."""
    be = t.backend
    assert be is not None
    # libvirt 9.0's default is 2.0 (1.2 has no CRB interface, and new guests expect a TPM 2)
    version = be.version or "2.0"
    model = t.model or "tpm-tis"
    ok = True
    if model == "tpm-crb" and version == "1.2":
        b.error(f"{path}/backend/@version", "a TPM 1.2 has no CRB interface; use model='tpm-tis' or version='2.0'")
        ok = False
    key: list[str] = []
    setup_key: list[str] = []
    if be.encryption is not None:
        # the state is encrypted with a key swtpm derives from the secret's passphrase (libvirt's
        # aes-256-cbc); swtpm reads the secret's file itself, as QEMU does for disks
        from qemud.secrets import secret_file_name
        name = secret_file_name(be.encryption.secret, None)
        if name is None:
            b.error(f"{path}/backend/encryption/@secret", f"'{be.encryption.secret}' is not a secret's UUID")
            ok = False
        else:
            # swtpm (as QEMU's user) reads a copy in the runtime directory: the secrets directory is root's
            f = b.paths.run / f"secret-{name}"
            b.prepare.append(Prepare("secret", f, source=Path(b.caps.host.secrets) / name,
                                     element=f"{path}/backend/encryption"))
            key = ["--key", f"pwdfile={f},mode=aes-256-cbc"]
            setup_key = ["--pwdfile", str(f), "--cipher", "aes-256-cbc"]
    banks = be.active_pcr_banks.names() if be.active_pcr_banks is not None else []
    if banks and version != "2.0":
        b.error(f"{path}/backend/active_pcr_banks", "PCR banks can be chosen for a TPM 2.0 only")
        ok = False
    swtpm = b.caps.host.helpers.get("swtpm")
    setup = b.caps.host.helpers.get("swtpm_setup")
    if swtpm is None or setup is None:
        missing = "swtpm" if swtpm is None else "swtpm_setup"
        b.error(f"{path}/backend/@type", f"an emulated TPM needs {missing}, which this host lacks "
                "(install Debian's swtpm and swtpm-tools)")
        return False
    sock = b.paths.run / f"swtpm-{tid}.sock"
    b.socket_path(sock, path)
    if not ok:
        return False
    # one state per TPM version: a guest switched from 1.2 to 2.0 gets a new TPM, not a broken one
    state = b.paths.state / "tpm" / ("tpm2" if version == "2.0" else "tpm1.2")
    log = b.paths.run / f"swtpm-{tid}.log"
    if "," in str(state) or "," in str(log):
        # swtpm splits --tpmstate/--log on ',' and has no escape: a guest named 'web1,dir=' would
        # keep its TPM state elsewhere (another guest's, with 'web1,mode=0600'...)
        b.error(f"{path}/backend/@type", f"swtpm cannot use the state directory {state}: it reads ',' as an "
                "option separator and has no escape for it; a guest with an emulated TPM needs a name "
                "without ','")
        return False
    v2 = ["--tpm2"] if version == "2.0" else []
    # the state is made once (EK, PCR banks) and then only ever used: never reset at a start.
    # persistent_state is the same in qemud: a guest's persistent directory outlives its runs
    b.prepare.append(Prepare("qemudir", state.parent))  # swtpm runs as QEMU's user and owns its state
    b.prepare.append(Prepare("qemudir", state))
    b.prepare.append(Prepare("run", state / STATE_FILE[version], argv=[
        setup, "--tpm-state", str(state), *v2, "--createek", "--not-overwrite",
        *(["--pcr-banks", ",".join(banks)] if banks else []), *setup_key,
        "--logfile", str(b.paths.run / f"swtpm-{tid}-setup.log")]))
    b.helpers.append(HelperSpec(name=f"swtpm-{tid}", socket=sock, log=b.paths.run / f"swtpm-{tid}.log", argv=[
        swtpm, "socket", "--ctrl", "type=unixio,fd={fd}", "--tpmstate", f"dir={state},mode=0600",
        "--log", f"file={log}", "--terminate", *key, *v2]))
    return True
