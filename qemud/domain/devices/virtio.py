"""libvirt's virtio driver options (``<driver iommu= ats= packed= page_per_vq=>``), shared by every
device family whose QEMU device is a virtio one (disk, controller, interface, filesystem, input,
memballoon, rng, video, vsock)."""

from qemud.domain.base import Element, YesNo, attr


class VirtioOptions(Element):
    """Mixed into a family's ``<driver>`` model: the virtio transport options."""

    iommu: YesNo | None = attr()
    ats: YesNo | None = attr()
    packed: YesNo | None = attr()
    page_per_vq: YesNo | None = attr()
