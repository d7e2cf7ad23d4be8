//! `deploy/Dockerfile`, checked by hand: Debian packages no Dockerfile
//! checker that works without a Docker daemon (no hadolint; `docker build`
//! and `buildah` need a daemon or user namespaces and the network). The
//! parsing here is only what the checks need: instructions per stage.

use crate::shared::*;

// ---------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------

/// Dockerfile instructions (continuations joined, comments dropped), as
/// (INSTRUCTION, arguments) per stage.
pub(crate) fn dockerfile_stages(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = vec![Vec::new()];
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let (instr, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let instr = instr.to_ascii_uppercase();
        if instr == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .unwrap()
            .push((instr, args.split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    // Instructions before the first FROM (global ARGs) are not a stage.
    stages.retain(|s| s.first().is_some_and(|(i, _)| i == "FROM"));
    stages
}

pub(crate) fn instr<'a>(stage: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(i, _)| i == name)
        .map(|(_, a)| a.as_str())
        .collect()
}

/// Packages installed by `apt-get install` in a stage.
pub(crate) fn apt_packages(stage: &[(String, String)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for run in instr(stage, "RUN") {
        for cmd in run.split("&&") {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if let Some(pos) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
                out.extend(
                    words[pos + 2..]
                        .iter()
                        .filter(|w| !w.starts_with('-'))
                        .map(|w| w.split('=').next().unwrap().to_string()),
                );
            }
        }
    }
    out
}

/// The words of an exec-form (JSON array) instruction argument.
pub(crate) fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(args).ok()
}

pub(crate) fn dockerfile_user_uid(text: &str) -> Option<i64> {
    let stages = dockerfile_stages(text);
    let user = *instr(stages.last()?, "USER").last()?;
    user.split(':').next()?.parse().ok()
}

type Stage = Vec<(String, String)>;

/// The build and runtime stages, or None after recording why not.
fn two_stages(p: &mut Problems) -> Option<(Stage, Stage)> {
    let mut stages = dockerfile_stages(&read("Dockerfile"));
    p.check(
        stages.len() == 2,
        format!(
            "expected 2 stages (builder, runtime), found {}",
            stages.len()
        ),
    );
    if stages.len() < 2 {
        return None;
    }
    let run = stages.pop()?;
    Some((stages.swap_remove(0), run))
}

/// The name after `AS` in the builder's FROM.
fn builder_name(build: &[(String, String)]) -> Option<&str> {
    instr(build, "FROM")[0]
        .split_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("AS"))
        .nth(1)
}

#[test]
fn dockerfile_builder_stage_compiles_herald_with_what_rocksdb_needs() {
    let mut p = Problems::new("Dockerfile");
    if let Some((build, _)) = two_stages(&mut p) {
        check_builder(&build, &mut p);
    }
    p.finish();
}

fn check_builder(build: &[(String, String)], p: &mut Problems) {
    // Build stage: Rust on Debian bookworm, with what RocksDB needs.
    let from = instr(build, "FROM")[0];
    p.check(
        from.starts_with("rust:") && from.contains("bookworm"),
        format!("builder FROM {from}: want rust:*bookworm"),
    );
    p.check(
        builder_name(build).is_some(),
        "builder stage has no `AS name`",
    );
    let build_pkgs = apt_packages(build);
    for pkg in ["clang", "libclang-dev"] {
        p.check(
            build_pkgs.contains(pkg),
            format!("builder does not install {pkg} (needed by RocksDB's bindgen)"),
        );
    }
    p.check(
        instr(build, "RUN").iter().any(|r| {
            r.contains("cargo build") && r.contains("--release") && r.contains("-p herald")
        }),
        "builder does not run `cargo build --release -p herald`",
    );
}

#[test]
fn dockerfile_runtime_stage_runs_herald_serve_as_non_root() {
    let mut p = Problems::new("Dockerfile");
    if let Some((build, run)) = two_stages(&mut p) {
        check_runtime(builder_name(&build), &run, &mut p);
        check_command(&run, &mut p);
    }
    p.finish();
}

fn check_runtime(builder_name: Option<&str>, run: &[(String, String)], p: &mut Problems) {
    let from = instr(run, "FROM")[0];
    p.check(
        from.starts_with("debian:bookworm-slim"),
        format!("runtime FROM {from}: want debian:bookworm-slim"),
    );
    if let Some(name) = builder_name {
        p.check(
            instr(run, "COPY")
                .iter()
                .any(|c| c.contains(&format!("--from={name}"))),
            "runtime stage copies nothing from the builder",
        );
    }
    let users = instr(run, "USER");
    match users.last() {
        None => p.add("no USER in the runtime stage: the container would run as root"),
        Some(u) => {
            let name = u.split(':').next().unwrap();
            p.check(name != "root" && name != "0", format!("USER {u} is root"));
            p.check(
                name.parse::<u32>().is_ok(),
                format!("USER {u}: use a numeric UID so runAsNonRoot can check it"),
            );
        }
    }
    p.check(
        instr(run, "EXPOSE").iter().any(|e| {
            e.split_whitespace()
                .any(|w| w.trim_end_matches("/tcp") == HTTP_PORT.to_string())
        }),
        format!("runtime stage does not EXPOSE {HTTP_PORT}"),
    );
    p.check(
        instr(run, "VOLUME").iter().any(|v| v.contains("/data")),
        "no VOLUME /data",
    );
}

/// The command: `serve`, listening on all interfaces of the container.
fn check_command(run: &[(String, String)], p: &mut Problems) {
    let mut command: Vec<String> = Vec::new();
    for which in ["ENTRYPOINT", "CMD"] {
        match instr(run, which).last().map(|a| exec_form(a)) {
            Some(Some(words)) => command.extend(words),
            Some(None) => p.add(format!(
                "{which} is not in exec (JSON) form: Herald would not be PID 1 and miss SIGTERM"
            )),
            None => {}
        }
    }
    let joined = command.join(" ");
    p.check(
        command.first().is_some_and(|c| c.ends_with("herald")),
        format!("the command `{joined}` does not run herald"),
    );
    let listen = format!("--listen 0.0.0.0:{HTTP_PORT}");
    for want in ["serve", listen.as_str(), "--data-dir /data"] {
        p.check(
            joined.contains(want),
            format!("the command `{joined}` lacks `{want}`"),
        );
    }
}

#[test]
fn dockerfile_healthcheck_hits_health_and_stops_with_sigterm() {
    let mut p = Problems::new("Dockerfile");
    let Some((_, run)) = two_stages(&mut p) else {
        return p.finish();
    };
    let run = &run[..];
    // HEALTHCHECK hits /health on the listen port, with a tool the image has.
    match instr(run, "HEALTHCHECK").last() {
        None => p.add("no HEALTHCHECK in the runtime stage"),
        Some(hc) => {
            let cmd = hc.split_once("CMD ").map(|(_, c)| c).unwrap_or("");
            p.check(
                cmd.contains(&format!("127.0.0.1:{HTTP_PORT}{LIVENESS_PATH}")),
                format!("HEALTHCHECK `{cmd}` does not hit 127.0.0.1:{HTTP_PORT}{LIVENESS_PATH}"),
            );
            let tool = cmd.split_whitespace().next().unwrap_or("");
            let run_pkgs = apt_packages(run);
            p.check(
                run_pkgs.contains(tool)
                    || ["/bin/sh", "sh", "/usr/local/bin/herald", "herald"].contains(&tool),
                format!("HEALTHCHECK uses `{tool}`, which the runtime stage does not install"),
            );
        }
    }
    p.check(
        instr(run, "STOPSIGNAL")
            .last()
            .is_none_or(|s| *s == "SIGTERM"),
        "STOPSIGNAL must be SIGTERM (Herald's graceful shutdown)",
    );

    p.finish();
}

#[test]
fn dockerignore_keeps_target_out_and_the_sources_in() {
    let mut p = Problems::new("Dockerfile.dockerignore");
    // The ignore file BuildKit uses for `docker build -f deploy/Dockerfile .`
    // keeps the (huge) target/ directory out of the build context.
    let ignore = read("Dockerfile.dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target/", ".git/"] {
        p.check(
            patterns.contains(&must),
            format!("Dockerfile.dockerignore does not exclude {must}"),
        );
    }
    for keep in ["Cargo.toml", "Cargo.lock", "src", "loadtest"] {
        p.check(
            !patterns
                .iter()
                .any(|pat| pat.trim_end_matches('/') == keep || *pat == "*"),
            format!("Dockerfile.dockerignore excludes {keep}, which the build needs"),
        );
    }
    p.finish();
}
