# One cargo profile (dev, with optimised dependencies; see Cargo.toml) serves
# run, test and bench, so RocksDB's C++ compiles once.
.PHONY: run test install deps test-deps lint bench bench-cluster fuzz soak chaos deb image dist-deps test-dist

run: deps
	cargo run --bin herald -- serve

# herald-client is the library for programs that only receive pushes, so
# its dependency tree must stay free of RocksDB, Redis and Prometheus.
# The load generator's smoke test runs the herald binary, so bins are built
# before the tests run. The last step checks that `make run` finds this
# build complete: every dependency shared by herald, the load generator and
# the tests resolves the same features (see Cargo.toml and build.rs), so
# building herald alone compiles nothing. A `Compiling` line there means
# some feature set drifted and `make run` after `make test` would recompile.
test: test-deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	@echo "checking that herald-client depends on no storage engine or metrics"
	@tree=$$(cargo tree -p herald-client -e normal --prefix none) || exit 1; \
	  bad=$$(echo "$$tree" | grep -E '^(rocksdb|librocksdb-sys|redis|prometheus) ' | sort -u); \
	  if [ -n "$$bad" ]; then \
	    echo "make test: herald-client must not depend on these (see crates/client/Cargo.toml):" >&2; \
	    echo "$$bad" >&2; exit 1; \
	  fi
	cargo build --workspace --bins
	cargo test --workspace
	$(MAKE) test-dist
	@echo "checking that \`cargo build --bin herald\` reuses this build"
	@out=$$(cargo build --bin herald 2>&1); echo "$$out"; \
	  if echo "$$out" | grep -q 'Compiling'; then \
	    echo "make test: building herald after the tests compiled again (feature sets differ); see Cargo.toml" >&2; exit 1; \
	  fi

# `herald` on PATH: $(PREFIX)/bin/herald. --debug is the project's one
# profile (fully optimised, see Cargo.toml), so this reuses `make run`'s build
# instead of compiling RocksDB again for the release profile.
PREFIX ?= /usr/local
install: deps
	cargo install --path . --root $(PREFIX) --locked --debug --bin herald

bench: deps
	./loadtest/bench.sh

# One node on RocksDB vs. one on Redis vs. three on a Redis Cluster.
bench-cluster: deps
	./scripts/redis.sh install
	./loadtest/bench-cluster.sh

# Coverage-guided fuzzing (libFuzzer via cargo-fuzz) of every parser that reads
# outside input, FUZZ_SECS seconds per target; `make test` runs a short,
# non-guided pass of the same targets. See proto-docs/fuzzing.md.
FUZZ_SECS ?= 60
fuzz: deps
	FUZZ_SECS=$(FUZZ_SECS) ./scripts/fuzz.sh

# A fresh Herald under SOAK_SECS seconds of mixed load, then an exact account
# of every message (delivered, expired, replaced, lost...), the server's peak
# and final memory and open files, and the store's size; fails if any
# accepted message was lost. See scripts/soak.sh.
SOAK_SECS ?= 3600
soak: deps
	SOAK_SECS=$(SOAK_SECS) ./scripts/soak.sh

# Three nodes on a Redis Cluster, every server in its own network namespace,
# under CHAOS_SECS seconds of load in runs of CHAOS_RUN_SECS, each with a
# fault applied and healed (partitions, a failover, slow and lossy links,
# clock skew, kill -9), then an account of every message; a table per fault.
# Needs root. See scripts/chaos.sh.
CHAOS_SECS ?= 300
chaos: deps
	./scripts/redis.sh install
	./scripts/install-test-tools.sh
	CHAOS_SECS=$(CHAOS_SECS) ./scripts/chaos.sh

# The Debian package and the OCI image of the binary `make run` builds (the
# project's one profile: no second RocksDB build). Each prints the path or
# name of what it made last. See deploy/README.md.
deb: deps dist-deps
	cargo build --bin herald
	./scripts/build-deb.sh

# Offline, with podman: the base is a Debian bookworm made here with
# debootstrap (cached in /var/tmp/herald-dist), built from deploy/Dockerfile.
image: deps dist-deps
	cargo build --bin herald
	./scripts/image.sh

# The package installed in a throwaway container and the image started, each
# with a push round trip through it (tests/dist.rs, #[ignore]d so that
# `cargo test` alone skips them; `make test` runs this target).
test-dist: test-deps dist-deps
	cargo build --workspace --bins
	deb=$$(./scripts/build-deb.sh) && image=$$(./scripts/image.sh) && \
	  HERALD_DIST_DEB=$$deb HERALD_DIST_IMAGE=$$image \
	  HERALD_DIST_BASE=$${HERALD_BASE_IMAGE:-localhost/herald-base:bookworm} \
	  cargo test --test dist -- --ignored

deps:
	./scripts/install-deps.sh

dist-deps:
	./scripts/install-dist-deps.sh

test-deps: deps
	./scripts/install-firefox.sh
	./scripts/redis.sh install
	./scripts/install-postgres.sh
	./scripts/install-synapse.sh
	./scripts/install-checkers.sh
	./scripts/install-test-tools.sh
