"""``<tpm>``: a TPM for the guest, backed by the host's TPM (passthrough), by an swtpm qemud runs
for the guest (emulator) or by an swtpm someone else runs (external)."""

from typing import Literal

from qemud.domain.base import Element, Opaque, YesNo, attr
from qemud.domain.devices.address import Address, Alias


class TpmDevice(Element):
    path: str = attr(...)


class TpmEncryption(Element):
    secret: str = attr(...)


class PcrBanks(Element):
    sha1: Opaque | None = None
    sha256: Opaque | None = None
    sha384: Opaque | None = None
    sha512: Opaque | None = None

    def names(self) -> list[str]:
        return [n for n in ("sha1", "sha256", "sha384", "sha512") if getattr(self, n) is not None]


class TpmSource(Element):
    type: Literal["unix"] = attr("unix")
    mode: Literal["connect"] | None = attr()
    path: str = attr(...)


class TpmBackend(Element):
    type: Literal["passthrough", "emulator", "external"] = attr(...)
    version: Literal["1.2", "2.0"] | None = attr()
    persistent_state: YesNo | None = attr()
    device: TpmDevice | None = None
    encryption: TpmEncryption | None = None
    active_pcr_banks: PcrBanks | None = None
    source: TpmSource | None = None


class Tpm(Element):
    model: Literal["tpm-tis", "tpm-crb", "tpm-spapr", "spapr-tpm-proxy"] | None = attr()
    backend: TpmBackend | None = None
    alias: Alias | None = None
    address: Address | None = None
