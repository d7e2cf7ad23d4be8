//! `deploy/herald.service`.

use crate::shared::*;

// ---------------------------------------------------------------------------
// systemd unit
// ---------------------------------------------------------------------------

/// A unit file as section -> key -> values (keys may repeat).
pub(crate) fn parse_unit(
    text: &str,
    p: &mut Problems,
) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section: Option<String> = None;
    let mut pending = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if line.starts_with('[') && line.ends_with(']') {
            section = Some(line[1..line.len() - 1].to_string());
            continue;
        }
        match (&section, line.split_once('=')) {
            (Some(s), Some((k, v))) => out
                .entry(s.clone())
                .or_default()
                .entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string()),
            (None, _) => p.add(format!("line {}: outside any [Section]", n + 1)),
            (_, None) => p.add(format!("line {}: not `Key=value`: {line}", n + 1)),
        }
    }
    out
}

/// systemd time span ("30s", "1min", "90", "1min 30s") in seconds.
pub(crate) fn systemd_secs(s: &str) -> Option<u64> {
    let mut total = 0;
    for part in s.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits.parse().ok()?;
        total += n * match &part[digits.len()..] {
            "" | "s" | "sec" | "second" | "seconds" => 1,
            "m" | "min" | "minute" | "minutes" => 60,
            "h" | "hr" | "hour" | "hours" => 3600,
            _ => return None,
        };
    }
    Some(total)
}

#[test]
pub(crate) fn systemd_unit_is_hardened_and_stops_gracefully() {
    let mut p = Problems::new("herald.service");
    let text = read("herald.service");
    let unit = parse_unit(&text, &mut p);
    let get = |section: &str, key: &str| -> Vec<String> {
        unit.get(section)
            .and_then(|s| s.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let one = |section: &str, key: &str| get(section, key).last().cloned();

    p.check(
        one("Unit", "Description").is_some(),
        "[Unit] Description= is missing",
    );
    p.check(
        one("Install", "WantedBy").is_some(),
        "[Install] WantedBy= is missing",
    );

    let exec = one("Service", "ExecStart").unwrap_or_default();
    let words: Vec<&str> = exec.split_whitespace().collect();
    p.check(
        words
            .first()
            .is_some_and(|w| w.starts_with('/') && w.ends_with("/herald"))
            && words.get(1) == Some(&"serve"),
        format!("ExecStart=`{exec}` should run `/…/herald serve`"),
    );
    // The store lives in the StateDirectory, which systemd creates and owns.
    let state = one("Service", "StateDirectory");
    p.check(state.is_some(), "StateDirectory= is missing");
    if let Some(state) = &state {
        let data_dir = words
            .windows(2)
            .find(|w| w[0] == "--data-dir")
            .map(|w| w[1]);
        p.check(
            data_dir == Some(format!("/var/lib/{state}").as_str()),
            format!(
                "ExecStart --data-dir is {data_dir:?}, want /var/lib/{state} (the StateDirectory)"
            ),
        );
    }
    p.check(
        one("Service", "User").is_some() || one("Service", "DynamicUser").as_deref() == Some("yes"),
        "neither User= nor DynamicUser=yes: the service would run as root",
    );
    p.check(
        one("Service", "User").as_deref() != Some("root"),
        "User=root",
    );

    let expect = [
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "1048576"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
    ];
    for (key, want) in expect {
        let got = one("Service", key);
        p.check(
            got.as_deref() == Some(want),
            format!("{key}={want} expected, found {got:?}"),
        );
    }
    let families = one("Service", "RestrictAddressFamilies").unwrap_or_default();
    for fam in ["AF_INET", "AF_INET6"] {
        p.check(
            families.split_whitespace().any(|f| f == fam),
            format!("RestrictAddressFamilies lacks {fam}"),
        );
    }
    p.check(
        get("Service", "SystemCallFilter")
            .iter()
            .any(|f| f.split_whitespace().any(|w| w == "@system-service")),
        "SystemCallFilter=@system-service is missing",
    );
    // systemd must wait longer than Herald's own graceful shutdown.
    let stop = one("Service", "TimeoutStopSec")
        .as_deref()
        .and_then(systemd_secs);
    let shutdown = herald_duration_secs(&default_value("shutdown_timeout")).unwrap();
    p.check(
        stop.is_some_and(|s| s > shutdown),
        format!("TimeoutStopSec ({stop:?} s) must exceed shutdown_timeout ({shutdown} s)"),
    );

    p.finish();
}

/// systemd's own parser: `systemd-analyze verify` reads the unit as systemd
/// would (unknown keys, bad values, missing binaries) and needs no running
/// systemd. Unknown keys are only warnings there (exit code 0), so any line
/// naming the unit or its binary fails the test. ExecStart is pointed at the
/// binary cargo built, since verify checks that it exists.
#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let mut p = Problems::new("herald.service");
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = dir.path().join("herald.service");
    let text =
        read("herald.service").replace("/usr/local/bin/herald", env!("CARGO_BIN_EXE_herald"));
    p.check(
        text.contains(env!("CARGO_BIN_EXE_herald")),
        "ExecStart no longer runs /usr/local/bin/herald; update this test",
    );
    std::fs::write(&unit, text).expect("write unit");
    let mut cmd = crate::tools::require("systemd-analyze", "systemd");
    cmd.args(["verify", "--man=no"]).arg(&unit);
    let (ok, stdout, stderr) = crate::tools::run(cmd);
    p.check(ok, format!("systemd-analyze verify failed: {stderr}"));
    for line in (stdout + &stderr).lines().filter(|l| l.contains("herald")) {
        p.add(format!("systemd-analyze verify: {line}"));
    }
    p.finish();
}
