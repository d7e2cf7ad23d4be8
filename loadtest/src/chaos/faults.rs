//! The fault schedule of a `chaos` run: each line's `start` command at its
//! time, its `heal` command at `heal_at` (or at the end of the load, so the
//! drain always finds a healed system), and after each heal a probe of every
//! node until all of them take a push and deliver it again.

use crate::fleet;
use crate::mixed::ledger::Secs;
use crate::mixed::{self, Shared};
use crate::proto::{self, Failure};
use crate::results::ws_to_http;
use crate::sender::{self, Origins, PostOptions};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// One schedule line.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub label: String,
    /// Seconds from the start of the load.
    pub at: f64,
    #[serde(default)]
    pub heal_at: Option<f64>,
    pub start: Vec<String>,
    /// Empty for a fault that ends by itself.
    #[serde(default)]
    pub heal: Vec<String>,
}

/// What happened to one fault.
#[derive(Clone, Debug, Default)]
pub struct FaultRun {
    pub label: String,
    pub started: Option<Secs>,
    /// When its heal command ran (or, without one, when it was due).
    pub healed: Option<Secs>,
    /// Seconds from the heal until every node took and delivered a probe
    /// push; None if they never all did within the limit.
    pub recovery: Option<Secs>,
    /// A command that could not run or exited non-zero.
    pub failed: Option<String>,
}

/// JSON lines, one fault each; blank lines and `#` comments are skipped.
pub fn parse_schedule(text: &str) -> Result<Vec<Fault>> {
    let mut out: Vec<Fault> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Fault = serde_json::from_str(line)
            .with_context(|| format!("schedule line {}: not a fault", i + 1))?;
        let at_ok = f.at.is_finite() && f.at >= 0.0;
        if f.label.is_empty() || f.start.is_empty() || !at_ok {
            bail!(
                "schedule line {}: needs a label, a start command and at >= 0",
                i + 1
            );
        }
        if f.heal_at.is_some_and(|h| h.is_nan() || h < f.at) {
            bail!("schedule line {}: heal_at before at", i + 1);
        }
        if out.iter().any(|o| o.label == f.label) {
            bail!("schedule line {}: label {:?} used twice", i + 1, f.label);
        }
        out.push(f);
    }
    Ok(out)
}

/// Runs one fault command with the current directory unchanged; its exit
/// status and stderr go to the history. Stderr goes through a file, not a
/// pipe: a command that starts a server in the background would otherwise
/// hold the pipe open and the wait would never end.
async fn run_command(sh: &Shared, label: &str, what: &str, argv: &[String]) -> Option<String> {
    let err_path = std::env::temp_dir().join(format!(
        "herald-chaos-{}-{}.stderr",
        std::process::id(),
        rand::random::<u64>()
    ));
    let outcome = async {
        let err = std::fs::File::create(&err_path).map_err(|e| format!("stderr file: {e}"))?;
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", argv[0]))?;
        match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(format!("{s}")),
            Ok(Err(e)) => Err(format!("waiting: {e}")),
            Err(_) => {
                let _ = child.kill().await;
                Err("still running after 120 s".into())
            }
        }
    }
    .await;
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    sh.log(
        serde_json::json!({"op": format!("fault {what}"), "label": label, "argv": argv,
        "ok": outcome.is_ok(), "error": outcome.as_ref().err(), "stderr": stderr}),
    );
    outcome.err().map(|e| {
        let tail: String = stderr.trim().chars().take(300).collect();
        format!("{label}: {what} {argv:?}: {e} {tail}")
    })
}

/// Executes the schedule against the load started at `sh.start`, then
/// heals whatever is still on at the end of the load. Returns once every
/// recovery probe has finished (or given up after `recovery_limit`).
pub async fn execute(sh: Arc<Shared>, faults: Vec<Fault>, recovery_limit: f64) -> Vec<FaultRun> {
    let load = sh.load_end.duration_since(sh.start).as_secs_f64();
    // (time, fault index, is heal), in time order; a heal never runs before
    // its start, and nothing stays broken past the end of the load.
    let mut steps: Vec<(f64, usize, bool)> = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        steps.push((f.at.min(load), i, false));
        steps.push((
            f.heal_at.unwrap_or(load).min(load).max(f.at.min(load)),
            i,
            true,
        ));
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.2.cmp(&b.2)));
    let mut runs: Vec<FaultRun> = faults
        .iter()
        .map(|f| FaultRun {
            label: f.label.clone(),
            ..Default::default()
        })
        .collect();
    let mut probes = tokio::task::JoinSet::new();
    for (t, i, heal) in steps {
        tokio::time::sleep_until((sh.start + crate::stats::secs(t)).into()).await;
        let f = &faults[i];
        let (what, argv) = if heal {
            ("heal", &f.heal)
        } else {
            ("start", &f.start)
        };
        let at = sh.now();
        let failed = if argv.is_empty() {
            None
        } else {
            run_command(&sh, &f.label, what, argv).await
        };
        let run = &mut runs[i];
        if run.failed.is_none() {
            run.failed = failed;
        }
        if heal {
            run.healed = Some(at);
            let sh = sh.clone();
            probes.spawn(async move { (i, recovery(&sh, at, recovery_limit).await) });
        } else {
            run.started = Some(at);
        }
    }
    while let Some(Ok((i, r))) = probes.join_next().await {
        runs[i].recovery = r;
    }
    runs
}

/// Seconds from `healed` until every node has taken a probe push (201)
/// and delivered it; None past `limit` seconds.
async fn recovery(sh: &Shared, healed: Secs, limit: f64) -> Option<Secs> {
    let mut ok = vec![false; sh.targets.len()];
    let give_up = Instant::now() + crate::stats::secs(limit);
    loop {
        for (node, done) in ok.iter_mut().enumerate() {
            if *done {
                continue;
            }
            let r = probe(sh, node).await;
            sh.log(
                serde_json::json!({"op": "probe", "node": node, "ok": r.is_ok(),
                "error": r.as_ref().err()}),
            );
            *done = r.is_ok();
        }
        if ok.iter().all(|d| *d) {
            return Some(sh.now() - healed);
        }
        if Instant::now() >= give_up {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A fresh user agent on `node`: hello, register, one push POSTed to that
/// same node, which must come back on the socket.
async fn probe(sh: &Shared, node: usize) -> Result<(), String> {
    let limit = Duration::from_secs(3);
    let target = &sh.targets[node];
    let fail = |f: Failure| f.key();
    let mut ws = fleet::step("connect", limit, proto::open(target, None))
        .await
        .map_err(fail)?;
    let none = BTreeMap::new();
    fleet::step(
        "hello",
        limit,
        proto::hello_following(&mut ws, None, &[], &none),
    )
    .await
    .map_err(fail)?;
    let channel = proto::new_channel_id();
    let url = fleet::step(
        "register",
        limit,
        proto::register(&mut ws, &channel, &sh.vapid.public_b64),
    )
    .await
    .map_err(fail)?;
    let base = ws_to_http(&target.url).map_err(|e| e.to_string())?;
    let mut origins = Origins::with_push_urls(&[base])
        .await
        .map_err(|e| e.to_string())?;
    let ep = origins.endpoint(&url).await.map_err(|e| e.to_string())?;
    let auth = sh
        .vapid
        .authorization(&origins.list[ep.origin].0)
        .map_err(|e| e.to_string())?;
    let (keys, secret) = mixed::subscription_keys().map_err(|e| e.to_string())?;
    let body = ece::encrypt(keys.public_key(), &secret, b"chaos probe")
        .map_err(|e| format!("encrypting: {e}"))?;
    let options = PostOptions {
        ttl: 60,
        receipt: false,
    };
    let out = sender::post_with(&sh.client, &ep, 0, &auth, Bytes::from(body), options, limit).await;
    if out != sender::Outcome::Status(201) {
        return Err(format!("POST: {}", out.key()));
    }
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| "no notification in 3 s".to_string())?;
        match msg {
            Some(Ok(Message::Text(t))) => {
                if let Some(m) = proto::parse(t.as_str()) {
                    if m.message_type.as_deref() == Some("notification") {
                        let ack = proto::ack_json(
                            &channel.to_string(),
                            m.version.as_deref().unwrap_or(""),
                        );
                        let _ = ws.send(Message::text(ack)).await;
                        let _ = ws.send(Message::Close(None)).await;
                        return Ok(());
                    }
                }
            }
            Some(Ok(_)) => {}
            _ => return Err("connection ended before the notification".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_bad_lines_are_refused() {
        let text = r#"
# a comment
{"label":"kill:n1","at":5,"heal_at":8,"start":["kill","-9","1"],"heal":["true"]}
{"label":"slow","at":2.5,"start":["true"]}
"#;
        let s = parse_schedule(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].heal_at, Some(8.0));
        assert!(s[1].heal.is_empty() && s[1].heal_at.is_none());
        for bad in [
            r#"{"label":"x","at":5,"heal_at":4,"start":["true"]}"#,
            r#"{"label":"x","at":5,"start":[]}"#,
            r#"{"label":"","at":5,"start":["true"]}"#,
            r#"{"label":"x","at":-1,"start":["true"]}"#,
            r#"{"label":"x","at":1,"start":["true"],"typo":1}"#,
            "{\"label\":\"x\",\"at\":1,\"start\":[\"true\"]}\n{\"label\":\"x\",\"at\":2,\"start\":[\"true\"]}",
        ] {
            assert!(parse_schedule(bad).is_err(), "{bad}");
        }
    }
}
