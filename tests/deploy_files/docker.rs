//! `deploy/Dockerfile`, checked by hand: Debian packages no Dockerfile
//! linter (no hadolint). `make test-dist` (tests/dist.rs) builds the file
//! for real with podman and runs the image, but only its offline variant
//! (local BASE, BINARY=prebuilt): the default one needs the public base
//! images, out of reach here, so its builder stage and defaults are checked
//! here. The parsing is only what the checks need: instructions per stage.

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

/// The global `ARG NAME=default` lines (before the first FROM).
fn global_args(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.to_ascii_uppercase().starts_with("FROM ") {
            break;
        }
        if let Some(arg) = line.strip_prefix("ARG ") {
            if let Some((k, v)) = arg.trim().split_once('=') {
                out.insert(k.to_string(), v.to_string());
            }
        }
    }
    out
}

/// `${NAME}` replaced by the global ARG's default, as a plain
/// `docker build` without --build-arg sees it.
fn expand(s: &str, args: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in args {
        out = out
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    out
}

/// The name after `AS` in a stage's FROM.
fn stage_name(stage: &[(String, String)]) -> Option<&str> {
    instr(stage, "FROM")[0]
        .split_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("AS"))
        .nth(1)
}

fn named<'a>(stages: &'a [Stage], name: &str) -> Option<&'a Stage> {
    stages.iter().find(|s| stage_name(s) == Some(name))
}

/// The stages: builder (compiles herald), prebuilt (takes a binary from the
/// build context, for `make image`), binary (`FROM ${BINARY}`, one of the
/// two), runtime. None after recording why not.
struct Stages {
    builder: Stage,
    prebuilt: Stage,
    binary: Stage,
    runtime: Stage,
    args: BTreeMap<String, String>,
}

fn stages(p: &mut Problems) -> Option<Stages> {
    let text = read("Dockerfile");
    let all = dockerfile_stages(&text);
    let mut get = |name: &str| {
        let s = named(&all, name).cloned();
        p.check(s.is_some(), format!("no stage named {name}"));
        s
    };
    let builder = get("builder");
    let prebuilt = get("prebuilt");
    let binary = get("binary");
    let runtime = get("runtime");
    p.check(
        all.last().and_then(|s| stage_name(s)) == Some("runtime"),
        "the last stage (what `docker build` produces) is not runtime",
    );
    Some(Stages {
        builder: builder?,
        prebuilt: prebuilt?,
        binary: binary?,
        runtime: runtime?,
        args: global_args(&text),
    })
}

/// The builder's FROM, and the base of a stage, with ARG defaults applied.
fn from_of(stage: &[(String, String)], args: &BTreeMap<String, String>) -> String {
    let from = expand(instr(stage, "FROM")[0], args);
    from.split_whitespace().next().unwrap_or("").to_string()
}

#[test]
fn dockerfile_binary_comes_from_the_builder_unless_prebuilt() {
    let mut p = Problems::new("Dockerfile");
    if let Some(s) = stages(&mut p) {
        // By default (`docker build`, no build args) the binary stage is the
        // builder; `make image` passes BINARY=prebuilt.
        p.check(
            from_of(&s.binary, &s.args) == "builder",
            format!(
                "stage binary is FROM {} by default, want builder",
                from_of(&s.binary, &s.args)
            ),
        );
        p.check(
            from_of(&s.prebuilt, &s.args) == "scratch",
            "stage prebuilt is not FROM scratch",
        );
        // Both leave the binary at the path the runtime copies from.
        p.check(
            instr(&s.builder, "RUN")
                .iter()
                .any(|r| r.contains("/out/herald")),
            "builder does not leave /out/herald",
        );
        p.check(
            instr(&s.prebuilt, "COPY") == ["herald /out/herald"],
            format!(
                "prebuilt copies {:?}, want `herald /out/herald`",
                instr(&s.prebuilt, "COPY")
            ),
        );
        p.check(
            instr(&s.runtime, "COPY")
                .iter()
                .any(|c| c.starts_with("--from=binary /out/herald ")),
            "runtime stage does not copy /out/herald from the binary stage",
        );
    }
    p.finish();
}

#[test]
fn dockerfile_builder_stage_compiles_herald_with_what_rocksdb_needs() {
    let mut p = Problems::new("Dockerfile");
    if let Some(s) = stages(&mut p) {
        check_builder(&s.builder, &s.args, &mut p);
    }
    p.finish();
}

fn check_builder(build: &[(String, String)], args: &BTreeMap<String, String>, p: &mut Problems) {
    // Build stage: Rust on Debian bookworm, with what RocksDB needs.
    let from = from_of(build, args);
    p.check(
        from.starts_with("rust:") && from.contains("bookworm"),
        format!("builder FROM {from}: want rust:*bookworm"),
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
    if let Some(s) = stages(&mut p) {
        check_runtime(&s.runtime, &s.args, &mut p);
        check_command(&s.runtime, &mut p);
    }
    p.finish();
}

fn check_runtime(run: &[(String, String)], args: &BTreeMap<String, String>, p: &mut Problems) {
    // The public base by default; `make image` passes its local one as BASE.
    let from = from_of(run, args);
    p.check(
        from == "debian:bookworm-slim",
        format!("runtime FROM {from} by default: want debian:bookworm-slim"),
    );
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
    let Some(s) = stages(&mut p) else {
        return p.finish();
    };
    let run = &s.runtime[..];
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
