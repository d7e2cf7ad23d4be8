//! Checks of the deployment files in `deploy/`, without Docker or Kubernetes.
//!
//! They parse each file the way its consumer would (YAML for Kubernetes and
//! Docker Compose, JSON and PromQL for Grafana, TOML for Herald, unit-file
//! syntax for systemd, directives for nginx) and check it against what Herald
//! actually provides: its settings, metric names and labels, health endpoints
//! and default port. Settings come from the library's table
//! (`herald::config::SETTINGS`); the metrics table in `shared.rs` is held to
//! `src/metrics.rs` by a test. When either changes, these tests point at every
//! deployment file that has to follow.
//!
//! Each test gathers all the problems in its file before failing, so one run
//! shows everything to fix.
//!
//! One test binary with a module per deployment target: one link instead of
//! one per target.

mod compose;
mod docker;
mod grafana;
mod guide;
mod kubernetes;
mod nginx;
mod settings;
mod shared;
mod systemd;
