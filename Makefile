# qemud: set up, test, run. Every target works on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORPUS ?= ../shared/libvirt-corpus

# Debian packages qemud and its tests need: QEMU (and its image tool and UEFI firmware), the
# pieces of the test guest (busybox, cpio), systemd-python's build deps, journald for the tests,
# ip (the tests' bridges) and setpriv (QEMU started as the qemud user).
DEB_PACKAGES := qemu-system-x86 qemu-utils ovmf busybox-static cpio zstd xz-utils swtpm swtpm-tools \
	libsystemd-dev pkg-config gcc python3-dev python3-venv systemd systemd-container passt dbus-daemon dbus-session-bus-common openssl \
	iproute2 util-linux

.PHONY: all deps venv test fuzz conformance bench run install verify-units chaos chaos-short clean

all: venv

# System packages (as root; CI and a fresh machine). Skipped when everything is there already.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
	@# the unprivileged user QEMU runs as when qemud is root (what the package's sysusers.d entry makes)
	@if [ "$$(id -u)" = 0 ] && ! id qemud >/dev/null 2>&1; then systemd-sysusers $(CURDIR)/units/qemud.sysusers; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# compat: a plain path entry, not setuptools' import-hook finder, which every qemud and
	@# qemuctl process would import at start (8 ms of each qemuctl call)
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: deps $(VENV)/.installed

# The test suite: real QEMU, a real tiny Linux guest (built once from Debian packages and cached).
test: venv
	$(PY) -m pytest tests -q

# A long fuzzing run of the parser and translator (about 10 minutes; not part of `make test`,
# whose run of the same tests is short and derandomized). New random examples each time.
FUZZ_EXAMPLES ?= 40000
fuzz: venv
	QEMUD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q -x -k fuzz_ -p no:cacheprovider

# validate + argv + start in QEMU for every domain of libvirt's own test suite; prints counts.
# --hugepages: inputs refused only for an empty hugepage pool (or a disk without BFQ for per-device
# I/O weights) run again with the pool grown (BFQ switched on) for
# them (and put back); the report names them.  CONFORMANCE_FLAGS= runs on the host as it is.
CONFORMANCE_FLAGS ?= --hugepages
conformance: venv
	$(PY) tools/conformance.py --corpus $(CORPUS) $(CONFORMANCE_FLAGS) --json conformance.json

# A bounded chaos run (not part of `make test`): random kill -9 of QEMUs and of the daemon, daemon
# restarts, edits, removals and re-additions of domain files; checked continuously; prints counts,
# fails on any violation. `make chaos GUESTS=10 MINUTES=10`; chaos-short is CI's (~90 s).
GUESTS ?= 10
MINUTES ?= 10
chaos: venv
	$(PY) tools/chaos.py --guests $(GUESTS) --minutes $(MINUTES)

chaos-short: venv
	$(PY) tools/chaos.py --guests 4 --minutes 1 --settle-every 30

# Speed goals live here, never in tests.
# qemud against the physical floor (bare QEMU, bare Python) side by side; writes docs/benchmarks.md.
# BENCH_ARGS=--quick for a short run, BENCH_ARGS='--only start,stop' for some measurements.
bench: venv
	$(PY) bench/run.py --corpus $(CORPUS) $(BENCH_ARGS)

# qemud in the foreground, unprivileged, on a domains directory in the checkout holding the tiny
# test guest. Its console: `.venv/bin/qemuctl --state-dir .state/run console tiny`. Ctrl-C stops
# qemud; the guest keeps running and is adopted at the next `make run`.
STATE := $(CURDIR)/.state
# As root, QEMU runs as the unprivileged qemud user, which must reach the guests' runtime
# directories: they go to /run then (a checkout may sit in /root, mode 0700).
RUN_STATE ?= $(if $(filter 0,$(shell id -u)),/run/qemud-make-run,$(STATE)/run)
run: venv
	@mkdir -p $(STATE)/domains
	@$(PY) -m tests.support.tinyguest > $(STATE)/tinyguest.json
	@$(PY) -c 'import json,sys; g=json.load(open("$(STATE)/tinyguest.json")); \
		t=open("etc/qemud/examples/tiny.xml.in").read(); \
		sys.stdout.write(t.replace("@KERNEL@", g["kernel"]).replace("@INITRD@", g["initrd"]))' \
		> $(STATE)/tiny.xml.new && mv $(STATE)/tiny.xml.new $(STATE)/domains/tiny.xml
	$(VENV)/bin/qemud --domains-dir $(STATE)/domains --state-dir $(RUN_STATE)

# Install into the system (or DESTDIR): the package into its own venv under PREFIX/lib/qemud,
# the commands, units, config, catalog, examples, sysusers and tmpfiles entries.
PREFIX ?= /usr
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= /lib/systemd/system
LIBDIR := $(PREFIX)/lib/qemud
# the system's Python, not one from a user's home (a service must not depend on it)
INSTALL_PYTHON ?= /usr/bin/python3
install: deps
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(SYSCONFDIR)/qemud/domains $(DESTDIR)$(PREFIX)/share/doc/qemud/examples \
		$(DESTDIR)$(PREFIX)/lib/systemd/catalog $(DESTDIR)$(PREFIX)/lib/sysusers.d $(DESTDIR)$(PREFIX)/lib/tmpfiles.d
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(LIBDIR)/venv
	$(DESTDIR)$(LIBDIR)/venv/bin/python -m pip install -q .
	@# the venv is made in DESTDIR but runs from LIBDIR: point its scripts there
	sed -i '1s|^#!.*python.*$$|#!$(LIBDIR)/venv/bin/python|' $(DESTDIR)$(LIBDIR)/venv/bin/qemud $(DESTDIR)$(LIBDIR)/venv/bin/qemuctl
	ln -sf $(LIBDIR)/venv/bin/qemud $(DESTDIR)$(PREFIX)/bin/qemud
	ln -sf $(LIBDIR)/venv/bin/qemuctl $(DESTDIR)$(PREFIX)/bin/qemuctl
	sed 's|/usr/bin/|$(PREFIX)/bin/|g' units/qemud.service > $(DESTDIR)$(UNITDIR)/qemud.service
	sed 's|/usr/bin/|$(PREFIX)/bin/|g' units/qemud-guests.service > $(DESTDIR)$(UNITDIR)/qemud-guests.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/qemud.service $(DESTDIR)$(UNITDIR)/qemud-guests.service
	install -m 0644 units/qemud.catalog $(DESTDIR)$(PREFIX)/lib/systemd/catalog/qemud.catalog
	install -m 0644 units/qemud.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/qemud.conf
	install -m 0644 units/qemud.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/qemud.conf
	[ -e $(DESTDIR)$(SYSCONFDIR)/qemud/qemud.conf ] || install -m 0644 etc/qemud/qemud.conf $(DESTDIR)$(SYSCONFDIR)/qemud/qemud.conf
	install -m 0644 etc/qemud/examples/*.xml $(DESTDIR)$(PREFIX)/share/doc/qemud/examples/
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/qemud/README.md
	install -D -m 0644 etc/bash-completion/qemuctl $(DESTDIR)$(PREFIX)/share/bash-completion/completions/qemuctl
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemd-sysusers; systemd-tmpfiles --create qemud.conf; journalctl --update-catalog; systemctl daemon-reload; fi

# The units as systemd reads them: any warning fails (verify exits 0 on a misspelt key).
# (They are checked as installed from this checkout: ExecStart pointing at .venv/bin.)
verify-units: venv
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	for u in qemud.service qemud-guests.service; do \
		sed 's|/usr/bin/|$(CURDIR)/$(VENV)/bin/|g' units/$$u > $$tmp/$$u; done; \
	out=$$(systemd-analyze verify --man=no $$tmp/qemud.service $$tmp/qemud-guests.service 2>&1); \
	if [ -n "$$out" ]; then echo "$$out"; echo "systemd-analyze verify: warnings above"; exit 1; fi; \
	echo "systemd-analyze verify: no warnings"; \
	for u in qemud.service qemud-guests.service; do systemd-analyze security --offline=yes $$tmp/$$u | tail -1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
