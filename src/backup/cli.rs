//! `herald backup` and `herald restore`.

use super::meta::STORE_DIR;
use super::restore::restore;
use super::take::{take, Taken};
use crate::config::{ServeArgs, Settings, StoreKind};
use crate::store::RocksStore;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// How long `herald backup` waits for the server: a checkpoint first
/// flushes the memtables, which on a loaded node takes a while.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
#[command(after_long_help = "A running Herald is asked through its admin API \
(POST /v1/admin/backup, one of its admin_tokens): the server makes DIR, on the \
server's machine, as an absolute path there. Best on the data directory's \
filesystem: the store's table files are then hard links, and the backup takes \
little time and space until the store compacts them away. With --data-dir \
the store of a stopped Herald is backed up by this process instead.")]
pub struct BackupArgs {
    /// Directory to make for the backup (must not exist yet); with the admin API a path on the server's machine
    pub dir: PathBuf,
    /// Herald's API base URL
    #[arg(
        long,
        env = "HERALD_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// One of the server's admin_tokens
    #[arg(long, env = "HERALD_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Also trust the CA certificates in this PEM file for an https:// --url
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Print the JSON description of the backup instead of text
    #[arg(long)]
    json: bool,
    /// Back up the store in this data directory of a stopped Herald, without asking a server
    #[arg(long, value_name = "DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The backup directory (made by `herald backup`); it is copied, and stays usable
    pub backup: PathBuf,
    /// Move a store (and another endpoint key) in the data directory aside to <name>.before-restore-<unix time> instead of refusing
    #[arg(long)]
    pub force: bool,
    /// The settings of the Herald to restore into (as for `herald serve`): its data_dir
    #[command(flatten)]
    pub settings: ServeArgs,
}

pub fn run_backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = match &args.data_dir {
        Some(data_dir) => {
            let taken = runtime.block_on(offline(data_dir, &args.dir))?;
            taken.to_json()
        }
        None => match runtime.block_on(through_api(&args))? {
            Ok(answer) => answer,
            Err(code) => return Ok(code),
        },
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!(
            "backup of the {} store in {}: {} files, {} bytes{}, in {} ms",
            text(&answer["engine"]),
            text(&answer["dir"]),
            text(&answer["files"]),
            text(&answer["bytes"]),
            if answer["endpoint_keys"] == true {
                " (with the endpoint key)"
            } else {
                ""
            },
            text(&answer["took_ms"]),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `POST /v1/admin/backup`: the answer, or the exit code after printing
/// the error.
async fn through_api(args: &BackupArgs) -> anyhow::Result<Result<Value, ExitCode>> {
    let Some(token) = &args.token else {
        bail!("give --token (or HERALD_ADMIN_TOKEN) for the server's admin API, or --data-dir for a stopped Herald's data directory");
    };
    if !args.dir.is_absolute() {
        bail!(
            "{}: give an absolute path; the server makes it on its own machine",
            args.dir.display()
        );
    }
    let url = format!("{}/v1/admin/backup", args.url.trim_end_matches('/'));
    let client = herald_client::http::HttpClient::new(args.ca.as_deref())?;
    let body = json!({ "dir": args.dir.display().to_string() });
    let (status, text) = crate::admin::cli::request(
        &client,
        http::Method::POST,
        &url,
        token,
        Some(body),
        BACKUP_TIMEOUT,
    )
    .await?;
    if !status.is_success() {
        let detail = crate::admin::cli::error_detail(&text);
        eprintln!("herald backup: {url} answered {status}: {detail}");
        return Ok(Err(ExitCode::FAILURE));
    }
    let answer = serde_json::from_str(&text)
        .with_context(|| format!("{url} answered {status} with no JSON: {text}"))?;
    Ok(Ok(answer))
}

/// The store of a stopped Herald, opened here under the data_dir lock.
async fn offline(data_dir: &Path, dir: &Path) -> anyhow::Result<Taken> {
    let dir = std::path::absolute(dir).with_context(|| dir.display().to_string())?;
    let db = data_dir.join(STORE_DIR);
    if !db.join("CURRENT").is_file() {
        bail!("{}: no store in this data directory", data_dir.display());
    }
    let _lock = crate::datadir::claim(data_dir).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(a running Herald is backed up through its admin API: leave out --data-dir)"
        )
    })?;
    let store = RocksStore::open(&db, false, None)
        .map_err(|e| anyhow::anyhow!("opening the store at {}: {e}", db.display()))?;
    Ok(take(&store, data_dir, &dir).await?)
}

pub fn run_restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let (settings, _) = match Settings::for_command(&args.settings) {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    if settings.store != StoreKind::Rocksdb {
        bail!("store = \"redis\": Herald's data is in Redis, restored with Redis's own tools; `herald restore` restores a rocksdb store");
    }
    let data_dir = &settings.data_dir;
    let done = restore(&args.backup, data_dir, args.force)?;
    for aside in &done.moved_aside {
        println!("moved aside: {}", aside.display());
    }
    println!(
        "restored the backup taken at {} (Unix seconds) by Herald {} into {}: {} files, {} bytes, in {} ms",
        done.meta.created,
        done.meta.herald_version,
        data_dir.join(STORE_DIR).display(),
        done.files,
        done.bytes,
        done.took.as_millis()
    );
    Ok(ExitCode::SUCCESS)
}

/// A JSON value as text: strings bare.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
