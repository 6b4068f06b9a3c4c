# qemud: set up, test, run. Every target works on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORPUS ?= ../shared/libvirt-corpus

# Debian packages qemud and its tests need: QEMU (and its image tool and UEFI firmware), the
# pieces of the test guest (busybox, cpio), systemd-python's build deps, journald for the tests.
DEB_PACKAGES := qemu-system-x86 qemu-utils ovmf busybox-static cpio zstd xz-utils \
	libsystemd-dev pkg-config gcc python3-dev python3-venv systemd

.PHONY: all deps venv test conformance bench run clean

all: venv

# System packages (as root; CI and a fresh machine). Skipped when everything is there already.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

# The test suite: real QEMU, a real tiny Linux guest (built once from Debian packages and cached).
test: venv
	$(PY) -m pytest tests -q

# validate + argv + start in QEMU for every domain of libvirt's own test suite; prints counts.
conformance: venv
	$(PY) tools/conformance.py --corpus $(CORPUS)

# Speed goals live here, never in tests.
bench: venv
	$(PY) bench/translate.py --corpus $(CORPUS)

# qemud in the foreground, unprivileged, on a domains directory in the checkout holding the tiny
# test guest. Its console: `socat - UNIX-CONNECT:.state/tiny.console`. Ctrl-C stops qemud; the
# guest keeps running and is adopted at the next `make run`.
STATE := $(CURDIR)/.state
run: venv
	@mkdir -p $(STATE)/domains
	@$(PY) -m tests.support.tinyguest > $(STATE)/tinyguest.json
	@$(PY) -c 'import json,sys; g=json.load(open("$(STATE)/tinyguest.json")); \
		t=open("etc/qemud/examples/tiny.xml.in").read(); \
		sys.stdout.write(t.replace("@KERNEL@", g["kernel"]).replace("@INITRD@", g["initrd"]).replace("@STATE@", "$(STATE)"))' \
		> $(STATE)/tiny.xml.new && mv $(STATE)/tiny.xml.new $(STATE)/domains/tiny.xml
	$(VENV)/bin/qemud --domains-dir $(STATE)/domains --state-dir $(STATE)/run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
