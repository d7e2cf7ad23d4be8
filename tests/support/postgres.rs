//! A real PostgreSQL for tests: Debian's `postgresql` binaries
//! (/usr/lib/postgresql/<version>/bin, installed by `make test-deps`) run
//! `initdb` and `postgres` in a temporary directory on a free loopback port,
//! and the server is stopped by its PID on Drop.
//!
//! PostgreSQL refuses to run as root. On machines where the tests run as
//! root (these do), the server runs as `nobody`, owning its directory.
#![allow(dead_code)]

use crate::common::process;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What installs the server where it is missing.
pub const INSTALL: &str = "make test-deps (or scripts/install-postgres.sh)";

/// The user the server runs as when the tests run as root.
const NOBODY: u32 = 65534;

/// The newest installed version's bin directory.
pub fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .unwrap_or_else(|e| {
            panic!(
                "{} ({e}): PostgreSQL is not installed; run {INSTALL}",
                root.display()
            )
        })
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries under {}; run {INSTALL}",
                root.display()
            )
        })
        .1
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn as_server_user(cmd: &mut Command) -> &mut Command {
    // Not the caller's directory, which the server user may not enter.
    cmd.current_dir("/");
    if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd
}

pub struct Postgres {
    _dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    log: PathBuf,
}

impl Postgres {
    /// A fresh cluster with a superuser `herald` (trust auth on loopback).
    pub async fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("herald-pg-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        if is_root() {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
        }
        let out = as_server_user(Command::new(bin.join("initdb")).args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "herald",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]))
        .output()
        .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = super_free_port();
        let logf = std::fs::File::create(&log).expect("log file");
        let child = as_server_user(
            Command::new(bin.join("postgres"))
                .args(["-D", data.to_str().unwrap()])
                .args(["-p", &port.to_string(), "-h", "127.0.0.1"])
                .args(["-k", dir.path().to_str().unwrap()])
                .args(["-c", "fsync=off", "-c", "full_page_writes=off"]),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("postgres starts");
        process::watchdog(
            child.id(),
            "[ \"$(cat /proc/$pid/comm 2>/dev/null)\" = postgres ]",
            "INT",
        );
        let pg = Postgres {
            _dir: dir,
            port,
            child,
            log,
        };
        pg.wait_ready().await;
        pg
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.connect().await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://herald@127.0.0.1:{}/postgres", self.port)
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A port below the ephemeral range, like the other harnesses use.
fn super_free_port() -> u16 {
    for _ in 0..1000 {
        let port = 30000 + rand::random::<u16>() % 2000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port for postgres")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown.
        process::stop(&mut self.child, "INT");
    }
}
