//! `herald demo`: a web page that subscribes to pushes through a Herald, and
//! the small application server behind it that stores the subscriptions and
//! sends messages with the same code as `herald send`.
//!
//! The page never talks to Herald itself: the browser does, over the
//! websocket named by its `dom.push.serverURL` preference. The demo server
//! only POSTs to the endpoints the browser hands it.
//!
//! HTTP interface (also what the end-to-end tests use):
//! - `GET /`, `/app.js`, `/sw.js`: the page and its service worker; load the
//!   page with `?action=unsubscribe` to unsubscribe instead of subscribing
//! - `GET /vapid-public-key`: the application server key (base64url)
//! - `GET /config`: `{"vapidPublicKey","pushUrl","websocketUrl"}`
//! - `POST /subscribe` (a `PushSubscription` JSON), `POST /unsubscribe`
//!   (`{"endpoint"}`), `GET /subscriptions`
//! - `POST /send` `{"text","ttl","urgency","topic","endpoint"}` (all
//!   optional; without `endpoint` it goes to every subscription) answers
//!   `{"results":[{"endpoint","status","location","errno","message","forgotten"}]}`;
//!   subscriptions answered 404 or 410 are forgotten
//! - `POST /received` `{"text","endpoint"}` from the service worker (the
//!   subscription it came to), `GET /received?endpoint=URL` lists those of
//!   one subscription (the page asks for its own browser's) as
//!   `[{"seq","text","receivedAtMs","endpoint"}]`, all without the query
//! - `POST /log` `{"message"}`: the page's progress, written to the log

pub mod server;
pub mod state;

use crate::appserver::{vapid_sign, Vapid};
use anyhow::Context;
use server::Demo;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Address for the demo page and its application server. Open it as
    /// http://localhost:PORT/: browsers only allow service workers on
    /// secure origins, and localhost counts as one.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Base URL of the Herald the browser uses (its public URL). Only shown
    /// to the user and used to flag subscriptions from another push service:
    /// the browser reaches Herald through its own dom.push.serverURL.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:8080",
        env = "HERALD_PUSH_URL"
    )]
    pub push_url: String,

    /// Directory for the demo's VAPID key (vapid.pem, made on first start,
    /// a private key) and stored subscriptions (subscriptions.json).
    /// Default: $XDG_STATE_HOME/herald/demo, else ~/.local/state/herald/demo,
    /// never the current directory, where a private key could end up
    /// committed.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Contact put in the VAPID `sub` claim (mailto: or https:).
    #[arg(
        long,
        value_name = "URI",
        default_value = "mailto:herald-demo@example.com"
    )]
    pub subject: String,

    /// Also trust the CA certificates in this PEM file when sending to
    /// https:// endpoints (a push service with a private CA).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    vapid_sign::validate_subject(&args.subject)?;
    let push_origin = herald_proto::subscription::origin_of(&args.push_url)
        .with_context(|| format!("--push-url {:?} is not a URL", args.push_url))?;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => herald_client::user_state_dir("--data-dir DIR")?.join("demo"),
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let key = state::load_or_create_key(&data_dir)?;
    let subscriptions = state::Subscriptions::load(&data_dir)?;
    let demo = Arc::new(
        Demo::new(
            Vapid {
                key,
                subject: Some(args.subject.clone()),
            },
            push_origin,
            subscriptions,
        )
        .with_client(herald_client::http::HttpClient::new(args.ca.as_deref())?),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let page = if addr.ip().is_loopback() {
            format!("http://localhost:{}/", addr.port())
        } else {
            format!("http://{addr}/")
        };
        println!("herald demo: page at {page}");
        println!("herald demo: VAPID key and subscriptions in {}", data_dir.display());
        println!(
            "herald demo: the browser must use dom.push.serverURL = {} (and, for ws://, dom.push.testing.allowInsecureServerURL = true)",
            demo.websocket_url()
        );
        tokio::select! {
            result = server::serve(listener, demo) => result,
            _ = tokio::signal::ctrl_c() => {
                println!("herald demo: stopping");
                Ok(())
            }
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr at `info` unless RUST_LOG says otherwise. Quietly keeps an
/// already installed subscriber (tests running the demo in-process).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(crate::server::stderr_wants_colour())
        .try_init();
}
