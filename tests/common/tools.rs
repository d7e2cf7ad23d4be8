//! The real checkers some tests run (nginx, promtool, docker-compose,
//! systemd-analyze): found on PATH or the test fails, naming the command
//! that installs them. A missing checker never turns into a silent pass.
#![allow(dead_code)]

use std::process::Command;

/// What installs every checker below, only where it is missing.
pub const INSTALL: &str = "make test-deps (or scripts/install-checkers.sh)";

/// `program`, after checking that it runs; `package` is the Debian package
/// that ships it, for the failure message.
pub fn require(program: &str, package: &str) -> Command {
    // Only whether it starts: some (nginx) refuse `--version` itself.
    if let Err(e) = Command::new(program).arg("--version").output() {
        panic!("{program} ({package}) is needed by this test and cannot run ({e}); install it with {INSTALL}");
    }
    Command::new(program)
}

/// Runs `cmd`: (success, stdout, stderr).
pub fn run(mut cmd: Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
