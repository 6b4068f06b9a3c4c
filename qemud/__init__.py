"""qemud: a supervisor of QEMU/KVM guests defined by libvirt domain XML files."""

__version__ = "0.1.0"
