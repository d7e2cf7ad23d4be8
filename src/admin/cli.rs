//! `herald admin …`: every admin API call from the command line, printed
//! for people or, with `--json`, as the server's JSON.

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Show a user agent: subscriptions, queued messages, last seen, the node holding it.
    Lookup {
        /// Its uaid, or one of its endpoint URLs
        who: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Drop a user agent: its subscriptions and messages go, its endpoints answer 410.
    Drop {
        uaid: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Block a sender: its pushes get 403 (errno 127).
    Block {
        #[command(flatten)]
        sender: SenderArgs,
        /// Why (kept with the block, shown by `blocks`)
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Lift a block.
    Unblock {
        #[command(flatten)]
        sender: SenderArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the blocked senders.
    Blocks {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The busiest senders of the last minutes, on the node asked.
    Top {
        /// How many minutes back, 1 to 10
        #[arg(long, default_value_t = 5)]
        minutes: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Connections, queued messages, store size, throttled and blocked pushes.
    Summary {
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Which sender: exactly one of these.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct SenderArgs {
    /// Its VAPID public key (base64url)
    #[arg(long)]
    vapid_key: Option<String>,
    /// The hash of its VAPID key, as `top` shows it
    #[arg(long)]
    vapid_key_hash: Option<String>,
    /// The `sub` of its VAPID claims (mailto: or https:)
    #[arg(long)]
    sub: Option<String>,
}

impl SenderArgs {
    fn body(&self, reason: Option<&str>) -> Value {
        let mut v = json!({});
        if let Some(k) = &self.vapid_key {
            v["vapid_key"] = json!(k);
        }
        if let Some(h) = &self.vapid_key_hash {
            v["vapid_key_hash"] = json!(h);
        }
        if let Some(s) = &self.sub {
            v["sub"] = json!(s);
        }
        if let Some(r) = reason {
            v["reason"] = json!(r);
        }
        v
    }
}

#[derive(Args)]
pub struct ServerArgs {
    /// Herald's API base URL
    #[arg(
        long,
        env = "HERALD_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// One of the server's admin_tokens
    #[arg(long, env = "HERALD_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Also trust the CA certificates in this PEM file for an https:// --url
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Print the server's JSON answer instead of text
    #[arg(long)]
    json: bool,
}

/// One call: method, path (with query) and body.
struct Call<'a> {
    method: http::Method,
    path: String,
    body: Option<Value>,
    server: &'a ServerArgs,
}

fn call(cmd: &AdminCommand) -> Call<'_> {
    use http::Method;
    let (method, path, body, server) = match cmd {
        AdminCommand::Lookup { who, server } => {
            let path = if who.contains('/') {
                format!("/v1/admin/user-agents?endpoint={}", percent_encode(who))
            } else {
                format!("/v1/admin/user-agents/{}", percent_encode(who))
            };
            (Method::GET, path, None, server)
        }
        AdminCommand::Drop { uaid, server } => (
            Method::DELETE,
            format!("/v1/admin/user-agents/{}", percent_encode(uaid)),
            None,
            server,
        ),
        AdminCommand::Block {
            sender,
            reason,
            server,
        } => (
            Method::PUT,
            "/v1/admin/blocks".into(),
            Some(sender.body(reason.as_deref())),
            server,
        ),
        AdminCommand::Unblock { sender, server } => (
            Method::DELETE,
            "/v1/admin/blocks".into(),
            Some(sender.body(None)),
            server,
        ),
        AdminCommand::Blocks { server } => (Method::GET, "/v1/admin/blocks".into(), None, server),
        AdminCommand::Top { minutes, server } => (
            Method::GET,
            format!("/v1/admin/top-senders?minutes={minutes}"),
            None,
            server,
        ),
        AdminCommand::Summary { server } => (Method::GET, "/v1/admin/summary".into(), None, server),
    };
    Call {
        method,
        path,
        body,
        server,
    }
}

pub fn run(cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let c = call(&cmd);
    let url = format!("{}{}", c.server.url.trim_end_matches('/'), c.path);
    let client = herald_client::http::HttpClient::new(c.server.ca.as_deref())?;
    let (status, text) = runtime.block_on(request(
        &client,
        c.method,
        &url,
        &c.server.token,
        c.body,
        Duration::from_secs(15),
    ))?;
    let answer: Option<Value> = serde_json::from_str(&text).ok();
    if !status.is_success() {
        eprintln!(
            "herald admin: {url} answered {status}: {}",
            error_detail(&text)
        );
        return Ok(ExitCode::FAILURE);
    }
    let Some(answer) = answer else {
        eprintln!("herald admin: {url} answered {status} with no JSON: {text}");
        return Ok(ExitCode::FAILURE);
    };
    if c.server.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", human(&cmd, &answer));
    }
    Ok(ExitCode::SUCCESS)
}

/// One admin API call with a bearer token: the status and body text.
/// Also `herald backup`'s (`backup::cli`).
pub async fn request(
    client: &herald_client::http::HttpClient,
    method: http::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
    within: Duration,
) -> anyhow::Result<(http::StatusCode, String)> {
    let client = client.pooled::<Full<Bytes>>();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = tokio::time::timeout(within, client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within {} s", within.as_secs()))?
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// An error answer's message and errno, or its text when it is no JSON.
pub fn error_detail(text: &str) -> String {
    let answer: Option<Value> = serde_json::from_str(text).ok();
    answer
        .as_ref()
        .and_then(|a| Some(format!("{} (errno {})", a["message"].as_str()?, a["errno"])))
        .unwrap_or_else(|| text.trim().to_string())
}

/// Everything but RFC 3986's unreserved characters, percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A JSON value as text: strings bare, null as "-".
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The answer for people.
fn human(cmd: &AdminCommand, a: &Value) -> String {
    let mut out = String::new();
    let o = &mut out;
    match cmd {
        AdminCommand::Lookup { .. } => lookup_text(o, a),
        AdminCommand::Drop { .. } => {
            let _ = writeln!(
                o,
                "dropped {} (a live connection was {})",
                text(&a["uaid"]),
                if a["disconnected"] == true {
                    "closed"
                } else {
                    "not found"
                }
            );
        }
        AdminCommand::Block { .. } => {
            let _ = writeln!(o, "blocked {}", text(&a["id"]));
        }
        AdminCommand::Unblock { .. } => {
            let _ = writeln!(o, "unblocked {}", text(&a["id"]));
        }
        AdminCommand::Blocks { .. } => {
            let blocks = a["blocks"].as_array().cloned().unwrap_or_default();
            if blocks.is_empty() {
                let _ = writeln!(o, "no blocks");
            }
            for b in blocks {
                let _ = writeln!(
                    o,
                    "{}  since {}  reason: {}",
                    text(&b["id"]),
                    text(&b["created"]),
                    text(&b["reason"])
                );
            }
        }
        AdminCommand::Top { .. } => {
            let _ = writeln!(
                o,
                "busiest senders of the last {} minutes on this node (count ± error):",
                text(&a["minutes"])
            );
            for s in a["senders"].as_array().cloned().unwrap_or_default() {
                let who = match s.get("address") {
                    Some(addr) => format!("address {}", text(addr)),
                    None => format!(
                        "vapid_key_hash {}  sub {}",
                        text(&s["vapid_key_hash"]),
                        text(&s["sub"])
                    ),
                };
                let _ = writeln!(
                    o,
                    "{:>8} ± {:<6} {who}",
                    text(&s["count"]),
                    text(&s["error"])
                );
            }
        }
        AdminCommand::Summary { .. } => summary_text(o, a),
    }
    out
}

fn lookup_text(o: &mut String, a: &Value) {
    let _ = writeln!(o, "uaid       {}", text(&a["uaid"]));
    let _ = writeln!(o, "created    {}", text(&a["created"]));
    let _ = writeln!(o, "last seen  {}", text(&a["last_seen"]));
    let connection = match &a["connection"] {
        Value::Null => "offline".to_string(),
        c if c["this_node"] == true => "connected to this node".to_string(),
        c => format!(
            "connected to node {} at {}",
            text(&c["node"]),
            text(&c["url"])
        ),
    };
    let _ = writeln!(o, "connection {connection}");
    if let Some(b) = a["bridge"].as_object() {
        let _ = writeln!(
            o,
            "bridge     {} app {} token {}",
            text(&b["kind"]),
            text(&b["app_id"]),
            text(&b["token"])
        );
    }
    let channels = a["channels"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(o, "channels   {}", channels.len());
    for c in channels {
        let bound = if c["key_bound"] == true {
            "key-bound"
        } else {
            "open"
        };
        let _ = writeln!(
            o,
            "  {}  {bound}  created {}",
            text(&c["channel_id"]),
            text(&c["created"])
        );
    }
    let _ = writeln!(o, "queued     {}", text(&a["messages"]["count"]));
    for m in a["messages"]["oldest"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let _ = writeln!(
            o,
            "  seq {}  {} bytes  ttl {}  expires {}  urgency {}  topic {}",
            text(&m["seq"]),
            text(&m["size"]),
            text(&m["ttl"]),
            text(&m["expires"]),
            text(&m["urgency"]),
            text(&m["topic"])
        );
    }
}

fn summary_text(o: &mut String, a: &Value) {
    let _ = writeln!(o, "connections         {}", text(&a["connections"]));
    let _ = writeln!(
        o,
        "user agents here    {}",
        text(&a["user_agents_connected"])
    );
    let _ = writeln!(
        o,
        "queued messages     {}",
        text(&a["store"]["estimated_messages"])
    );
    let _ = writeln!(o, "store size (bytes)  {}", text(&a["store"]["size_bytes"]));
    if let Some(t) = a["throttled"].as_object() {
        for (reason, n) in t {
            let _ = writeln!(o, "throttled {reason:<10}{}", text(n));
        }
    }
    let _ = writeln!(
        o,
        "blocked pushes      key {}, sub {}",
        text(&a["blocked_pushes"]["key"]),
        text(&a["blocked_pushes"]["sub"])
    );
    let _ = writeln!(o, "blocks              {}", text(&a["blocks"]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            percent_encode("https://h:1/wpush/v1/a-b_c~d.e"),
            "https%3A%2F%2Fh%3A1%2Fwpush%2Fv1%2Fa-b_c~d.e"
        );
    }
}
