# kpx — see README.md. Every target that touches the kernel must run as root.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kpx-setup
# Debian packages the project uses at run time and in tests (bookworm names).
APT_PACKAGES := iproute2 iptables nftables ipset conntrack etcd-server etcd-client catatonit \
	tcpdump socat iperf3 wrk ipvsadm python3-venv python3-dev gcc libc6-dev procps psmisc kmod \
	qemu-system-x86 linux-image-amd64 busybox-static xz-utils
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-netns test-vm bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing Debian packages:" $$missing; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip >/dev/null
	@$(BIN)/pip install -q -e '.[dev,bench,iptables]'
	@$(BIN)/python -m netns.cbuild  # kpx-holder (pod sandbox), kpx-echo (kpx/echo, kpx/http); rebuilt on use if stale
	@$(BIN)/python -c 'from bench.data import connlat; connlat()'  # kpx-connlat, kpx bench's connect() timer
	@touch $(STAMP)
	@echo "setup: done ($(BIN)/kpx)"

demo: setup
	$(BIN)/kpx up --demo

lint: setup
	$(BIN)/ruff check kpx controlplane netns proxy bench tests
	$(BIN)/mypy

test: setup lint test-unit test-netns test-vm

test-unit: setup
	$(BIN)/pytest -m unit tests/unit $(PYTEST_ARGS)

test-netns: setup  # root-only tests and tests needing services (etcd) live in tests/integration
	@[ "$$(id -u)" = 0 ] || { echo "test-netns: run as root (sudo make test)"; exit 1; }
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

# The VM gets 1536M (kpx vm's default is 768M) as headroom for the ipvs e2e cluster (apiserver, agents,
# proxies, pods); Python under TCG is 20-30x slower than native, so the tests' deadlines are scaled, and
# so are pytest-timeout's per-test cap (kpx up alone took 240 s in the VM on a loaded host) and the VM's.
test-vm: setup  # boots Debian's kernel in qemu ONCE and runs the whole vm tier inside it
	@[ "$$(id -u)" = 0 ] || { echo "test-vm: run as root (sudo make test)"; exit 1; }
	KPX_VM_MEM=$${KPX_VM_MEM:-1536M} KPX_VM_TIMEOUT=$${KPX_VM_TIMEOUT:-3600} $(BIN)/python -m kpx.vm -- env KPX_TEST_TIME_SCALE=10 PATH=$(CURDIR)/$(BIN):$$PATH $(CURDIR)/$(BIN)/pytest -p no:cacheprovider --timeout 1200 -m vm tests/vm $(PYTEST_ARGS)

bench: setup
	$(BIN)/kpx bench --out bench/results

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
