//! The Debian package and the container image, installed and started as a
//! user would, with a push round trip through each: `make test-dist`.
//!
//! Both tests are `#[ignore]`d, so `cargo test` (and `make test`) skip them:
//! they need podman, the local base image and the artifacts `make deb` and
//! `make image` build. `make test-dist` builds those and runs
//! `cargo test --test dist -- --ignored` with their names in
//! `HERALD_DIST_DEB`, `HERALD_DIST_BASE` and `HERALD_DIST_IMAGE`; run any
//! other way, a test without them fails naming what is missing.
//!
//! Herald runs inside a container sharing the host's network
//! (`--network host`, the one network mode that works on the test machines),
//! on a free loopback port; the user agent and the application server are
//! this test process, outside the container.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test through `make test-dist`, which builds the package and the image and names them")
    })
}

/// podman as the project's scripts run it (runc, scripts/containers.conf).
fn podman() -> Command {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/podman.sh"))
}

fn run(mut cmd: Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, which must succeed; its stdout.
fn ok(cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A container removed (with its anonymous volumes) when the test ends,
/// whatever way it ends.
struct Container {
    name: String,
}

impl Container {
    fn start(name: String, args: &[&str]) -> Container {
        let mut cmd = podman();
        cmd.args(["run", "-d", "--network", "host", "--name", &name])
            .args(args);
        ok(cmd);
        Container { name }
    }

    /// `podman exec` of a shell command as root; its output and success.
    fn sh(&self, script: &str) -> Output {
        let mut cmd = podman();
        cmd.args(["exec", &self.name, "sh", "-c", script]);
        run(cmd)
    }

    /// Like `sh`, which must succeed; its stdout.
    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in {}: `{script}` failed ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self) -> String {
        let mut cmd = podman();
        cmd.args(["logs", &self.name]);
        let out = run(cmd);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// SIGTERM (the image's STOPSIGNAL) with 30 s to shut down; the exit code.
    fn stop(&self) -> i64 {
        let mut cmd = podman();
        cmd.args(["stop", "-t", "30", &self.name]);
        ok(cmd);
        let mut cmd = podman();
        cmd.args(["inspect", "--format", "{{.State.ExitCode}}", &self.name]);
        ok(cmd).trim().parse().expect("exit code")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let mut cmd = podman();
        cmd.args(["rm", "-f", "-v", &self.name]);
        let _ = run(cmd);
    }
}

struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        let mut cmd = podman();
        cmd.args(["volume", "rm", "-f", &self.0]);
        let _ = run(cmd);
    }
}

/// Waits until GET `url` answers 200, calling `died` (which returns why the
/// server is gone, if it is) between tries.
async fn wait_health(url: &str, died: impl Fn() -> Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = request("GET", url, &[], vec![]).await {
            if r.status == 200 {
                return;
            }
        }
        if let Some(why) = died() {
            panic!("herald stopped before answering {url}:\n{why}");
        }
        assert!(Instant::now() < deadline, "no 200 from {url} within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A user agent subscribes with an application server key, the application
/// server sends an encrypted push with VAPID, and the user agent receives
/// and decrypts it. Then the user agent goes away and a second push,
/// `queued`, is stored for it. Returns the user agent's uaid and keys, to
/// come back for `queued` later.
async fn round_trip_then_queue(base: &str, ws: &str, queued: &str) -> (String, UaKeys) {
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello_url(ws, None).await;
    let (_, endpoint) = ua.subscribe(Some(&app.public())).await;
    assert!(
        endpoint.starts_with(base),
        "endpoint {endpoint} is not under {base}"
    );
    let r = push(&endpoint, Some(&app), base, &keys, "through the box", &[]).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "through the box");
    ua.ack(&n).await;

    let uaid = ua.uaid.clone();
    drop(ua);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = push(
        &endpoint,
        Some(&app),
        base,
        &keys,
        queued,
        &[("ttl", "3600")],
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    (uaid, keys)
}

fn deb_path() -> PathBuf {
    let deb = PathBuf::from(required_env("HERALD_DIST_DEB"));
    assert!(
        deb.is_file(),
        "HERALD_DIST_DEB={} is no file",
        deb.display()
    );
    deb
}

/// The unit's `Key=value` line, as the package installed it.
fn unit_value(c: &Container, key: &str) -> String {
    let v = c.sh_ok(&format!(
        "sed -n 's/^{key}=//p' /lib/systemd/system/herald.service"
    ));
    let v = v.trim().to_string();
    assert!(!v.is_empty(), "the packaged unit has no {key}=");
    v
}

/// Starts the installed Herald as systemd would: the unit's ExecStart line
/// as its User=, in /, with the unit's EnvironmentFile; waits for /health.
async fn start_packaged(c: &Container, url: &str) {
    let exec_start = unit_value(c, "ExecStart");
    assert!(
        exec_start.starts_with("/usr/bin/herald serve --config /etc/herald/herald.toml"),
        "ExecStart={exec_start}"
    );
    let user = unit_value(c, "User");
    let env_file = unit_value(c, "EnvironmentFile");
    let env_file = env_file.trim_start_matches('-');
    let mut cmd = podman();
    cmd.args([
        "exec", "-d", "--user", &user, "--workdir", "/", &c.name, "sh", "-c",
    ])
    .arg(format!(
        "set -a; . {env_file}; set +a; echo $$ > /tmp/herald.pid; exec {exec_start} > /tmp/herald.log 2>&1"
    ));
    ok(cmd);
    wait_health(&format!("{url}/health"), || {
        let gone = !c.sh("kill -0 $(cat /tmp/herald.pid)").status.success();
        gone.then(|| String::from_utf8_lossy(&c.sh("cat /tmp/herald.log").stdout).into_owned())
    })
    .await;
}

/// SIGTERM, as the unit's KillSignal; waits for Herald to exit.
fn stop_packaged(c: &Container) {
    c.sh_ok("kill -TERM $(cat /tmp/herald.pid)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.sh("kill -0 $(cat /tmp/herald.pid)").status.success() {
        assert!(
            Instant::now() < deadline,
            "herald ignored SIGTERM:\n{}",
            String::from_utf8_lossy(&c.sh("cat /tmp/herald.log").stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test]
#[ignore = "needs podman and the package: make test-dist"]
async fn deb_installs_serves_keeps_queued_push_through_remove_and_purges() {
    let deb = deb_path();
    let base = required_env("HERALD_DIST_BASE");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let dir = deb.parent().unwrap().display().to_string();
    let file = deb.file_name().unwrap().to_string_lossy().into_owned();

    // A throwaway Debian (the local base), not this machine, gets the package.
    let c = Container::start(
        format!("herald-dist-deb-{port}"),
        &["-v", &format!("{dir}:/dist:ro"), &base, "sleep", "infinity"],
    );

    // No systemd runs in the container: postinst must set everything up and
    // start nothing.
    c.sh_ok(&format!("dpkg -i /dist/{file}"));
    assert_eq!(c.sh_ok("id -un herald").trim(), "herald");
    assert_eq!(
        c.sh_ok("stat -c '%U:%G %a' /var/lib/herald").trim(),
        "herald:herald 700",
        "the data directory"
    );
    assert_eq!(
        c.sh_ok("stat -c '%U:%G %a' /etc/herald/herald.toml").trim(),
        "root:herald 640",
        "the packaged config"
    );
    assert_eq!(
        c.sh_ok("dpkg-query -W -f='${Conffiles}' herald")
            .split_whitespace()
            .next(),
        Some("/etc/herald/herald.toml"),
        "the config is a conffile"
    );
    // Enabled on first install (deb-systemd-helper, as debhelper does),
    // for the next boot.
    c.sh_ok("test -L /etc/systemd/system/multi-user.target.wants/herald.service");
    assert!(
        !c.sh("ls /proc/*/exe -l 2>/dev/null | grep -q /usr/bin/herald")
            .status
            .success(),
        "postinst started herald without systemd"
    );

    // The packaged config listens on 127.0.0.1:8080; the unit's
    // EnvironmentFile moves it to a free port, as an admin's HERALD_LISTEN
    // there would. Not the package's file: it stays through dpkg -r.
    let env_file = unit_value(&c, "EnvironmentFile");
    let env_file = env_file.trim_start_matches('-').to_string();
    c.sh_ok(&format!("echo HERALD_LISTEN=127.0.0.1:{port} > {env_file}"));

    start_packaged(&c, &url).await;
    let ws = format!("ws://127.0.0.1:{port}/");
    // The queued message is for a user agent that is away, to be delivered
    // after a remove and a reinstall.
    let (uaid, keys) = round_trip_then_queue(&url, &ws, "kept through dpkg -r").await;
    stop_packaged(&c);
    let store = c.sh_ok("ls /var/lib/herald");
    assert!(
        store.contains("endpoint-keys"),
        "no store in /var/lib/herald after a run: {store}"
    );

    // Remove: binary and unit go; config, data and user stay.
    c.sh_ok("dpkg -r herald");
    c.sh_ok("test ! -e /usr/bin/herald && test ! -e /lib/systemd/system/herald.service");
    assert_eq!(
        c.sh_ok("ls /var/lib/herald"),
        store,
        "dpkg -r touched the data"
    );
    c.sh_ok("test -f /etc/herald/herald.toml && id herald");
    // An admin's edit to the config survives the reinstall (a conffile).
    c.sh_ok("echo '# edited by the admin' >> /etc/herald/herald.toml");

    // Installed again, Herald carries on with the same keys, subscription
    // and queued message.
    c.sh_ok(&format!("dpkg -i /dist/{file}"));
    c.sh_ok("tail -1 /etc/herald/herald.toml | grep -qx '# edited by the admin'");
    start_packaged(&c, &url).await;
    let mut ua = Ua::hello_url(&ws, Some(&uaid)).await;
    assert_eq!(ua.uaid, uaid, "the registration survived dpkg -r");
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "kept through dpkg -r");
    ua.ack(&n).await;
    drop(ua);
    stop_packaged(&c);

    // Purge: config and data go too.
    c.sh_ok("dpkg -P herald");
    c.sh_ok("test ! -e /etc/herald && test ! -e /var/lib/herald");
    c.sh_ok("test ! -e /etc/systemd/system/multi-user.target.wants/herald.service");
    assert!(
        !c.sh("dpkg -s herald").status.success(),
        "herald still known to dpkg after purge"
    );
}

/// `systemd-analyze verify` on the unit as packaged, run on this machine
/// (its systemd has the targets the unit names). The one change: ExecStart
/// points at the package's binary unpacked here instead of /usr/bin/herald,
/// which verify checks is executable.
#[test]
#[ignore = "needs the package: make test-dist"]
fn deb_unit_passes_systemd_analyze_verify() {
    let deb = deb_path();
    let root = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-x").arg(&deb).arg(root.path());
    ok(cmd);
    let packaged = std::fs::read_to_string(root.path().join("lib/systemd/system/herald.service"))
        .expect("the package holds lib/systemd/system/herald.service");
    let bin = root.path().join("usr/bin/herald");
    assert!(
        packaged.contains("\nExecStart=/usr/bin/herald "),
        "packaged unit:\n{packaged}"
    );
    let unit = root.path().join("herald.service");
    std::fs::write(
        &unit,
        packaged.replace("/usr/bin/herald", &bin.display().to_string()),
    )
    .unwrap();
    let mut cmd = common::tools::require("systemd-analyze", "systemd");
    cmd.arg("verify").arg(&unit);
    let (success, stdout, stderr) = common::tools::run(cmd);
    assert!(
        success && stderr.trim().is_empty(),
        "systemd-analyze verify {}:\n{stdout}{stderr}",
        Path::new(&unit).display()
    );
}

#[tokio::test]
#[ignore = "needs podman and the image: make test-dist"]
async fn image_serves_a_push_and_keeps_queued_messages_across_a_restart() {
    let image = required_env("HERALD_DIST_IMAGE");
    // What the Dockerfile declares reached the image (podman drops
    // HEALTHCHECK from OCI-format images; make image builds Docker format).
    let mut cmd = podman();
    cmd.args([
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}|{{json .Config.Volumes}}|{{json .Config.ExposedPorts}}|{{json .Config.Healthcheck.Test}}",
        &image,
    ]);
    let config = ok(cmd);
    let config: Vec<&str> = config.trim().split('|').collect();
    assert_eq!(config[0], "10001:10001", "USER");
    assert!(config[1].contains("\"/data\""), "VOLUME: {}", config[1]);
    assert!(config[2].contains("8080/tcp"), "EXPOSE: {}", config[2]);
    assert!(
        config[3].contains("http://127.0.0.1:8080/health"),
        "HEALTHCHECK: {}",
        config[3]
    );
    let port = free_port();
    let metrics_port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let ws = format!("ws://127.0.0.1:{port}/");
    let volume = Volume(format!("herald-dist-{port}"));
    let mut cmd = podman();
    cmd.args(["volume", "create", &volume.0]);
    ok(cmd);

    // Settings from HERALD_* variables. The image's command is kept but for
    // --listen: with the host's network, 0.0.0.0:8080 could be taken. No
    // health check timer: podman schedules those through systemd, absent
    // here; GET /health below does the same probe.
    let public_url = format!("HERALD_PUBLIC_URL={url}");
    let metrics = format!("HERALD_METRICS_LISTEN=127.0.0.1:{metrics_port}");
    let data = format!("{}:/data", volume.0);
    let listen = format!("127.0.0.1:{port}");
    let start = |name: String| {
        Container::start(
            name,
            &[
                "--no-healthcheck",
                "-v",
                &data,
                "-e",
                &public_url,
                "-e",
                &metrics,
                &image,
                "serve",
                "--listen",
                &listen,
                "--data-dir",
                "/data",
            ],
        )
    };

    let c = start(format!("herald-dist-image-{port}"));
    let running = |c: &Container| {
        let mut cmd = podman();
        cmd.args(["inspect", "--format", "{{.State.Running}}", &c.name]);
        let out = run(cmd);
        (String::from_utf8_lossy(&out.stdout).trim() != "true").then(|| c.logs())
    };
    wait_health(&format!("{url}/health"), || running(&c)).await;

    // Not root: the image's USER, 10001.
    let status = c.sh_ok("cat /proc/1/status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    assert_eq!(uid, "10001", "herald's uid in the container");
    // HERALD_METRICS_LISTEN took effect.
    let m = request(
        "GET",
        &format!("http://127.0.0.1:{metrics_port}/metrics"),
        &[],
        vec![],
    )
    .await
    .expect("metrics from HERALD_METRICS_LISTEN");
    assert_eq!(m.status, 200);

    // Queued while no user agent is connected...
    let (uaid, keys) = round_trip_then_queue(&url, &ws, "kept on the volume").await;
    let code = c.stop();
    assert_eq!(code, 0, "herald's exit on SIGTERM:\n{}", c.logs());
    drop(c);

    // ...and delivered by a new container on the same volume.
    let c = start(format!("herald-dist-image-{port}-again"));
    wait_health(&format!("{url}/health"), || running(&c)).await;
    let mut ua = Ua::hello_url(&ws, Some(&uaid)).await;
    assert_eq!(ua.uaid, uaid, "the user agent's registration survived");
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "kept on the volume");
    ua.ack(&n).await;
}
