//! `herald listen`: the push client as a command, so any machine can
//! receive Web Push with one line.

use crate::appserver::VapidKey;
use anyhow::Context;
use herald_client::{
    normalize_app_server_key, Client, ClientOptions, Event, HelloRefused, PushMessage,
    PushSubscriptionJson, StateFile,
};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Receive push messages on this machine: a user agent of its own, with
/// its keys in a state file.
#[derive(clap::Args, Debug)]
pub struct ListenArgs {
    /// The state file: server, uaid, and each subscription's keys (mode
    /// 0600). Default: $XDG_STATE_HOME/herald/listen.json, else
    /// ~/.local/state/herald/listen.json.
    #[arg(long, global = true, value_name = "FILE", env = "HERALD_LISTEN_STATE")]
    pub state: Option<PathBuf>,

    /// Also trust the CA certificates in this PEM file for wss:// (for a
    /// push service with a private or self-signed certificate).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// The token of a private push service (Herald's user_agent_tokens),
    /// sent in every hello. Prefer the environment variable: arguments
    /// are visible to other users in the process list.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "HERALD_LISTEN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    #[command(subcommand)]
    pub command: ListenCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ListenCommand {
    /// Create subscription NAME and print its JSON, as a browser's
    /// `PushSubscription.toJSON()` gives it: feed it to `herald send
    /// --subscription` or to any application server library.
    ///
    /// Subscribing an existing NAME with the same key prints the existing
    /// subscription again.
    Subscribe {
        /// A name for this subscription (letters, digits, - _ . @).
        name: String,
        /// The push service's websocket URL (ws://, wss://; http(s):// also
        /// works). Needed for the first subscription of a state file; later
        /// ones use the stored server.
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// Bind the subscription to an application server's VAPID key, so
        /// the push service accepts only pushes signed with it: the public
        /// key (base64url, as `herald vapid generate` prints) or the private
        /// key file.
        #[arg(long, value_name = "PUBKEY_OR_FILE")]
        vapid_key: Option<String>,
    },
    /// Receive messages until stopped (SIGINT, SIGTERM).
    ///
    /// Each message is printed on stdout as one JSON line: name, channelID,
    /// version, ttl, encoding, endpoint, and the plaintext as `text` (when
    /// UTF-8) and `data` (base64url). Progress and problems go to stderr.
    /// A message is acknowledged only after it was printed (or its --exec
    /// command exited 0); one that cannot be decrypted is reported on
    /// stderr and acknowledged with code 101.
    Run(RunArgs),
    /// List the subscriptions in the state file.
    List {
        /// Print JSON: server, uaid, and each subscription's channelID,
        /// application server key and subscription JSON.
        #[arg(long)]
        json: bool,
    },
    /// Unregister subscription NAME with the push service (its endpoint
    /// answers 410 from then on) and forget its keys.
    Unsubscribe { name: String },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Instead of printing, run CMD (with `sh -c`) for each message: the
    /// plaintext on stdin, the metadata in HERALD_NAME, HERALD_CHANNEL_ID,
    /// HERALD_VERSION, HERALD_TTL, HERALD_ENCODING (empty without payload)
    /// and HERALD_ENDPOINT. The message is acknowledged only when CMD exits
    /// 0; otherwise it stays on the server and is delivered again.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,

    /// Exit after settling N messages: each one printed or handled by
    /// --exec, and each one acknowledged without being handled (code 101:
    /// it did not decrypt; 102: no subscription here has its channel).
    /// A message whose --exec failed comes again and counts then.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// After a failed --exec, reconnect after this many seconds so the
    /// server delivers the message again.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub retry_after: u64,

    /// Also follow broadcast ID (repeatable); announced versions are
    /// printed as `{"broadcasts": {...}}` lines.
    #[arg(long = "broadcast", value_name = "ID")]
    pub broadcasts: Vec<String>,
}

pub fn run(args: ListenArgs) -> anyhow::Result<ExitCode> {
    let path = match args.state {
        Some(path) => path,
        None => ClientOptions::default_state_path()?,
    };
    let mut options = ClientOptions::new(path);
    options.ca_file = args.ca;
    options.token = args.token.filter(|t| !t.is_empty());
    if let ListenCommand::List { json } = args.command {
        return list(&options.state_path, json);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        match args.command {
            ListenCommand::Subscribe {
                name,
                server,
                vapid_key,
            } => subscribe(options, &name, server.as_deref(), vapid_key.as_deref()).await,
            ListenCommand::Run(run_args) => listen(options, run_args).await,
            ListenCommand::Unsubscribe { name } => unsubscribe(options, &name).await,
            ListenCommand::List { .. } => unreachable!("handled above"),
        }
    });
    result.map_err(|e| {
        if e.downcast_ref::<HelloRefused>().is_some() {
            e.context("this push service needs a user agent token: pass --token or set HERALD_LISTEN_TOKEN")
        } else {
            e
        }
    })
}

/// A public key as given, or the public half of a key file.
fn app_server_key_arg(arg: &str) -> anyhow::Result<String> {
    let path = Path::new(arg);
    if path.is_file() {
        return Ok(VapidKey::from_file(path)?.public_key_b64());
    }
    normalize_app_server_key(arg).with_context(|| {
        format!("--vapid-key {arg:?} is neither a public key nor a readable key file")
    })
}

async fn subscribe(
    options: ClientOptions,
    name: &str,
    server: Option<&str>,
    vapid_key: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let key = vapid_key.map(app_server_key_arg).transpose()?;
    let mut client = match server {
        Some(server) => Client::open_or_create(options, server)?,
        None => Client::open(options)?,
    };
    let result = client.subscribe(name, key.as_deref()).await;
    client.close().await;
    for event in client.take_events() {
        report(&event);
    }
    println!("{}", result?.to_json());
    Ok(ExitCode::SUCCESS)
}

async fn unsubscribe(options: ClientOptions, name: &str) -> anyhow::Result<ExitCode> {
    let mut client = Client::open(options)?;
    let result = client.unsubscribe(name).await;
    client.close().await;
    result?;
    eprintln!("herald listen: unsubscribed {name}");
    Ok(ExitCode::SUCCESS)
}

fn list(path: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let Some(state) = StateFile::new(path).load_verified()? else {
        eprintln!(
            "herald listen: no subscriptions (no state file at {})",
            path.display()
        );
        if as_json {
            println!(
                "{}",
                json!({"server": null, "uaid": null, "subscriptions": {}})
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    if as_json {
        let subscriptions: serde_json::Map<String, serde_json::Value> = state
            .subscriptions
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    json!({
                        "channelID": s.channel_id,
                        "app_server_key": s.app_server_key,
                        "subscription": PushSubscriptionJson::of(s),
                    }),
                )
            })
            .collect();
        println!(
            "{}",
            json!({"server": state.server, "uaid": state.uaid, "subscriptions": subscriptions})
        );
        return Ok(ExitCode::SUCCESS);
    }
    let width = state
        .subscriptions
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(0);
    for (name, s) in &state.subscriptions {
        let kind = if s.app_server_key.is_some() {
            "vapid"
        } else {
            "open "
        };
        println!("{name:width$}  {kind}  {}", s.endpoint);
    }
    if state.subscriptions.is_empty() {
        eprintln!("herald listen: no subscriptions in {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn listen(mut options: ClientOptions, args: RunArgs) -> anyhow::Result<ExitCode> {
    options.retry_after = Duration::from_secs(args.retry_after.max(1));
    let retry_after = options.retry_after;
    let mut client = Client::open(options)?;
    if !args.broadcasts.is_empty() {
        let ids: Vec<&str> = args.broadcasts.iter().map(String::as_str).collect();
        client.follow_broadcasts(&ids).await?;
    }
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // Messages acknowledged, whatever the code: each is gone from the
    // server, so a `--count N` waiting for N sends must count it.
    let mut settled = 0u64;
    while args.count.is_none_or(|n| settled < n) {
        let event = tokio::select! {
            event = client.next_event() => event?,
            _ = &mut shutdown => break,
        };
        let message = match event {
            Event::Message(message) => message,
            Event::Broadcast(b) if args.exec.is_none() => {
                print_line(&json!({"broadcasts": b.changed, "errors": b.errors}).to_string())?;
                continue;
            }
            other => {
                report(&other);
                if matches!(other, Event::Dropped { .. }) {
                    settled += 1;
                }
                continue;
            }
        };
        if let Some(err) = message.decrypt_error() {
            eprintln!(
                "herald listen: cannot decrypt a message for {} ({}); acknowledged with code 101",
                message.name, err
            );
            client.ack(&message).await?;
            settled += 1;
            continue;
        }
        match &args.exec {
            None => {
                // A closed stdout fails here, before the ack: the message
                // stays on the server.
                print_line(&message_line(&message).to_string())?;
                client.ack(&message).await?;
                settled += 1;
            }
            Some(command) => match run_command(command, &message).await {
                Ok(status) if status.success() => {
                    client.ack(&message).await?;
                    settled += 1;
                }
                outcome => {
                    let why = match outcome {
                        Ok(status) => status.to_string(),
                        Err(e) => format!("{e:#}"),
                    };
                    eprintln!(
                        "herald listen: --exec command failed ({why}) for a message to {}; \
                         not acknowledged, delivered again in about {} s",
                        message.name,
                        retry_after.as_secs()
                    );
                    client.defer(&message);
                }
            },
        }
    }
    client.close().await;
    Ok(ExitCode::SUCCESS)
}

fn print_line(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
}

/// Status lines for people, on stderr.
fn report(event: &Event) {
    match event {
        Event::Connected { uaid } => eprintln!("herald listen: connected (uaid {uaid})"),
        Event::Disconnected { reason, retry_in } => eprintln!(
            "herald listen: {reason}; reconnecting in {:.1} s",
            retry_in.as_secs_f32()
        ),
        Event::SubscriptionsLost { names, uaid } => eprintln!(
            "herald listen: warning: the push service no longer knew this user agent and \
             issued a new uaid ({uaid}); these subscriptions are gone and were removed: {}. \
             Subscribe again and give the new subscriptions to their application servers.",
            names.join(", ")
        ),
        Event::Dropped { reason, .. } => {
            eprintln!("herald listen: dropped a message ({reason}); acknowledged with code 102")
        }
        Event::Broadcast(b) => eprintln!(
            "herald listen: broadcasts {}",
            json!({"broadcasts": b.changed, "errors": b.errors})
        ),
        Event::Message(m) => eprintln!("herald listen: message for {}", m.name),
    }
}

/// The JSON line printed for a message.
pub fn message_line(m: &PushMessage) -> serde_json::Value {
    let mut line = json!({
        "name": m.name,
        "channelID": m.channel_id,
        "version": m.version,
        "ttl": m.ttl,
        "encoding": m.encoding,
        "endpoint": m.endpoint,
    });
    if let Some(data) = m.data() {
        line["data"] = json!(herald_proto::b64::encode_b64url(data));
        if let Some(text) = m.text() {
            line["text"] = json!(text);
        }
    }
    line
}

/// The environment an --exec command gets.
pub fn exec_env(m: &PushMessage) -> Vec<(&'static str, String)> {
    vec![
        ("HERALD_NAME", m.name.clone()),
        ("HERALD_CHANNEL_ID", m.channel_id.clone()),
        ("HERALD_VERSION", m.version.clone()),
        (
            "HERALD_TTL",
            m.ttl.map(|t| t.to_string()).unwrap_or_default(),
        ),
        ("HERALD_ENCODING", m.encoding.clone().unwrap_or_default()),
        ("HERALD_ENDPOINT", m.endpoint.clone()),
    ]
}

async fn run_command(command: &str, m: &PushMessage) -> anyhow::Result<std::process::ExitStatus> {
    let command = command.to_string();
    let env = exec_env(m);
    let input = m.data().unwrap_or_default().to_vec();
    tokio::task::spawn_blocking(move || -> anyhow::Result<std::process::ExitStatus> {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .envs(env)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A command that ignores its input may close it early; its exit
            // status still decides.
            match stdin.write_all(&input) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(
                        anyhow::Error::new(e).context("cannot write the message to the command")
                    );
                }
                _ => {}
            }
        }
        child.wait().context("cannot wait for the command")
    })
    .await
    .context("the command runner stopped")?
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::crypto::DecryptError;

    fn message(payload: Result<Option<Vec<u8>>, DecryptError>) -> PushMessage {
        let mut m = PushMessage::detached("phone", "c", "v", "http://h/wpush/v1/t", payload);
        m.ttl = Some(60);
        m.encoding = Some("aes128gcm".into());
        m
    }

    #[test]
    fn lines_carry_text_and_lossless_data() {
        let line = message_line(&message(Ok(Some(b"hi".to_vec()))));
        assert_eq!(line["text"], "hi");
        assert_eq!(line["data"], "aGk");
        assert_eq!(line["name"], "phone");
        assert_eq!(line["channelID"], "c");
        assert_eq!(line["ttl"], 60);
        let binary = message_line(&message(Ok(Some(vec![0xff, 0xfe]))));
        assert!(binary.get("text").is_none());
        assert_eq!(binary["data"], "__4");
        let empty = message_line(&message(Ok(None)));
        assert!(empty.get("data").is_none() && empty.get("text").is_none());
    }

    #[test]
    fn commands_get_the_metadata() {
        let env = exec_env(&message(Ok(None)));
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(get("HERALD_NAME"), "phone");
        assert_eq!(get("HERALD_TTL"), "60");
        assert_eq!(get("HERALD_ENDPOINT"), "http://h/wpush/v1/t");
    }

    #[tokio::test]
    async fn command_exit_status_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let m = message(Ok(Some(b"payload".to_vec())));
        let ok = run_command(
            &format!("cat > {} && test \"$HERALD_NAME\" = phone", out.display()),
            &m,
        )
        .await
        .unwrap();
        assert!(ok.success());
        assert_eq!(std::fs::read(&out).unwrap(), b"payload");
        assert!(!run_command("exit 3", &m).await.unwrap().success());
        // Not reading stdin is fine; the exit status decides.
        assert!(run_command("true", &m).await.unwrap().success());
    }
}
