//! Two jobs.
//!
//! 1. Its build dependency. RocksDB's build script (bindgen) uses `regex`; so
//!    does a build step of `promql-parser`, a dev-dependency, with regex's
//!    default features. Test builds unify the two, plain builds did not, so
//!    `cargo run` and `cargo test` saw different build scripts for
//!    `librocksdb-sys` and compiled RocksDB's C++ twice. Asking for regex's
//!    default features here makes every build resolve the same, so the C++
//!    compiles once. Nothing below may change that.
//!
//! 2. The commit `/__version__` reports: `BUILD_GIT_COMMIT`, the output of
//!    `git rev-parse HEAD` when the source is a git checkout and git is
//!    installed, else "unknown" (a source archive, a container build
//!    without `.git`).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = git(&["rev-parse", "HEAD"])
        .filter(|c| c.len() >= 40 && c.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".into());
    // Not HERALD_*: `cargo run` and `cargo test` also put this variable in
    // the environment of what they run, where Herald would take it for a
    // mistyped setting.
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
    if commit == "unknown" {
        return;
    }
    // A new commit moves the branch's ref (or HEAD itself when detached); a
    // checkout rewrites HEAD; `git gc` moves refs into packed-refs. Only
    // files that exist are named: cargo reruns the script on every build
    // for a missing one, which would recompile Herald each time.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}

/// One line of git's output, run in the package's directory; None without
/// git, outside a checkout, or on any failure.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(std::env::var_os("CARGO_MANIFEST_DIR")?)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!line.is_empty()).then_some(line)
}
