//! `herald broadcast set|list`: the operator API from the command line.

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum BroadcastCommand {
    /// Set a broadcast's version; subscribed user agents hear of it at once.
    Set {
        /// Broadcast id, e.g. remote-settings/monitor_changes
        id: String,
        /// The new version
        version: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List every broadcast and its version.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Args)]
pub struct ServerArgs {
    /// Herald's API base URL
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// One of the server's broadcast_tokens
    #[arg(long, env = "HERALD_BROADCAST_TOKEN", hide_env_values = true)]
    token: String,
    /// Also trust the CA certificates in this PEM file for an https://
    /// --server (a private or self-signed certificate).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

pub fn run(cmd: BroadcastCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (method, server, path, body) = match &cmd {
        BroadcastCommand::Set {
            id,
            version,
            server,
        } => (
            http::Method::PUT,
            server,
            format!("/v1/broadcasts/{id}"),
            version.clone(),
        ),
        BroadcastCommand::List { server } => (
            http::Method::GET,
            server,
            "/v1/broadcasts".to_string(),
            String::new(),
        ),
    };
    let url = format!("{}{path}", server.server.trim_end_matches('/'));
    let client = herald_client::http::HttpClient::new(server.ca.as_deref())?;
    let (status, text) = runtime.block_on(request(&client, method, &url, &server.token, body))?;
    println!("{text}");
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("herald: {url} answered {status}");
        ExitCode::FAILURE
    })
}

async fn request(
    client: &herald_client::http::HttpClient,
    method: http::Method,
    url: &str,
    token: &str,
    body: String,
) -> anyhow::Result<(http::StatusCode, String)> {
    let client = client.pooled::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)))?;
    let resp = tokio::time::timeout(Duration::from_secs(15), client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within 15 s"))??;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
