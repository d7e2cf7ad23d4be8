//! Checks of the deployment files in `deploy/`, without Docker or Kubernetes.
//!
//! Where Debian packages the real checker and it works offline, it judges the
//! file: `nginx -T` (nginx.rs), `systemd-analyze verify` (systemd.rs),
//! `docker-compose config` (compose.rs); `promtool check metrics` lints a
//! live Herald's /metrics in tests/operations.rs. A missing checker fails
//! its test with the install command (`make test-deps`), never skips.
//! Hand checks remain where no such checker exists here (the Dockerfile,
//! kustomize: Debian has neither hadolint nor kustomize/kubectl; Caddy:
//! Debian's caddy is older than our file) and for what no checker can know:
//! the files against what Herald provides (its settings from
//! `herald::config::SETTINGS`, metric names and labels from the table in
//! `shared.rs`, held to `src/metrics.rs` by a test, health endpoints, public
//! paths, default port). When Herald changes, these tests point at every
//! deployment file that has to follow.
//!
//! Each test gathers all the problems in its file before failing, so one run
//! shows everything to fix.
//!
//! One test binary with a module per deployment target: one link instead of
//! one per target.

mod caddy;
mod compose;
mod docker;
mod grafana;
mod guide;
mod kubernetes;
mod nginx;
mod settings;
mod shared;
mod systemd;
#[path = "../common/tools.rs"]
mod tools;
