//! `herald import autopush --from <url|file>`: takes over what a running
//! autopush-rs stored (user agents, subscriptions, pending messages) into
//! the store Herald is configured with, so browsers keep their uaid.
//!
//! One file per source (`from_redis`, `from_postgres`, `from_jsonl`) reads
//! into the neutral `record::ImportedUa`; `writer` writes those through the
//! `Store` trait; `ledger` (a file in `data_dir`) makes re-runs and resumed
//! runs write only what is missing. See proto-docs/migration.md, "Import".

mod from_jsonl;
mod from_postgres;
mod from_redis;
mod ledger;
mod record;
mod summary;
mod writer;

pub use ledger::LEDGER_FILE;

use crate::config::{ServeArgs, Settings, StoreKind};
use crate::store::{RedisStore, RocksStore, Store};
use anyhow::Context;
use record::ImportedUa;
use std::process::ExitCode;
use std::sync::Arc;
use summary::{Progress, Summary};

#[derive(clap::Subcommand)]
pub enum ImportCommand {
    /// Import user agents, subscriptions and pending messages from autopush-rs's storage.
    Autopush(AutopushArgs),
}

#[derive(clap::Args)]
pub struct AutopushArgs {
    /// autopush-rs's storage: redis://HOST:PORT[/DB], postgres://USER@HOST:PORT/DB, or an export FILE.jsonl
    #[arg(long, value_name = "URL|FILE")]
    pub from: String,
    /// Read everything and print the counts; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Postgres only: the schema holding autopush's tables (its db_settings "schema").
    #[arg(long, value_name = "NAME")]
    pub pg_schema: Option<String>,
    /// The settings of the Herald to import into (as for `herald serve`).
    #[command(flatten)]
    pub settings: ServeArgs,
}

/// Which reader `--from` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    Redis(String),
    Postgres(String),
    Jsonl(String),
}

impl SourceKind {
    pub fn parse(from: &str) -> Result<SourceKind, String> {
        if from.starts_with("redis://") || from.starts_with("rediss://") {
            Ok(SourceKind::Redis(from.to_string()))
        } else if from.starts_with("postgres://") || from.starts_with("postgresql://") {
            Ok(SourceKind::Postgres(from.to_string()))
        } else if from.ends_with(".jsonl") {
            Ok(SourceKind::Jsonl(from.to_string()))
        } else {
            Err(format!(
                "--from {from:?}: expected redis://…, postgres://… or a file ending in .jsonl"
            ))
        }
    }
}

/// A reader of autopush-rs's storage, one user agent at a time.
#[async_trait::async_trait]
trait Source: Send {
    /// How many user agents there are, when known up front (progress bar).
    fn total(&self) -> Option<u64>;
    /// The next user agent; what it passes over goes into `summary`.
    async fn next(&mut self, summary: &mut Summary) -> anyhow::Result<Option<ImportedUa>>;
}

pub fn run(cmd: ImportCommand) -> anyhow::Result<ExitCode> {
    let ImportCommand::Autopush(args) = cmd;
    let (settings, _) = match Settings::for_command(&args.settings) {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let kind = match SourceKind::parse(&args.from) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("herald import: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(import(settings, kind, args))
}

async fn import(
    settings: Settings,
    kind: SourceKind,
    args: AutopushArgs,
) -> anyhow::Result<ExitCode> {
    let mut summary = Summary::default();
    // A dry run opens nothing of Herald's but the ledger, read only.
    // RocksDB allows one process: Herald must be stopped, and the data_dir
    // lock says so clearly. A shared Redis may stay in use meanwhile; the
    // ledger's own lock keeps two imports apart.
    let (_lock, store) = if args.dry_run {
        (None, None)
    } else if settings.store == StoreKind::Rocksdb {
        let lock = crate::datadir::claim(&settings.data_dir)?;
        (Some(lock), Some(open_store(&settings).await?))
    } else {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        (None, Some(open_store(&settings).await?))
    };
    let ledger_path = settings.data_dir.join(LEDGER_FILE);
    let ledger = ledger::Ledger::open(&ledger_path, !args.dry_run)
        .with_context(|| format!("opening {}", ledger_path.display()))?;
    let mut source: Box<dyn Source> = match &kind {
        SourceKind::Redis(url) => Box::new(from_redis::RedisSource::open(url, &mut summary).await?),
        SourceKind::Postgres(dsn) => {
            Box::new(from_postgres::PostgresSource::open(dsn, args.pg_schema.as_deref()).await?)
        }
        SourceKind::Jsonl(path) => Box::new(from_jsonl::JsonlSource::open(path)?),
    };
    let now = crate::store::now_secs();
    let mut writer = writer::Writer::new(store, ledger, settings.ua_expiry.as_secs(), now);
    let mut progress = Progress::new(source.total());
    let outcome = copy_all(source.as_mut(), &mut writer, &mut summary, &mut progress).await;
    progress.finish();
    let finished = writer.finish().await;
    print!("{}", summary.render(args.dry_run));
    outcome?;
    finished?;
    Ok(ExitCode::SUCCESS)
}

async fn copy_all(
    source: &mut dyn Source,
    writer: &mut writer::Writer,
    summary: &mut Summary,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    while let Some(ua) = source.next(summary).await? {
        writer.write(ua, summary).await?;
        progress.tick();
    }
    Ok(())
}

/// The store `herald serve` would open with these settings. The import
/// holds the data_dir lock, so Herald on RocksDB must be stopped; on Redis
/// it may keep running.
async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    match settings.store {
        StoreKind::Rocksdb => {
            let path = settings.data_dir.join("db");
            let store = RocksStore::open(&path, settings.sync_writes, None)
                .map_err(|e| anyhow::anyhow!("opening the store at {}: {e}", path.display()))?;
            Ok(Arc::new(store))
        }
        StoreKind::Redis => {
            let url = settings.redis_url.as_deref().unwrap_or_default();
            let store = RedisStore::connect(url, None, settings.ua_expiry.as_secs())
                .await
                .map_err(|e| anyhow::anyhow!("connecting to Redis at {url}: {e}"))?
                .wait_for(settings.redis_wait_replicas, settings.redis_wait_timeout);
            Ok(Arc::new(store))
        }
    }
}

/// A source URL without its password, for messages and the summary.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("postgres://u:secret@h:5/db"), "postgres://u@h:5/db");
        assert_eq!(redact("redis://:secret@h:6379/0"), "redis://@h:6379/0");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn from_names_its_source() {
        assert_eq!(
            SourceKind::parse("redis://127.0.0.1:6379/2"),
            Ok(SourceKind::Redis("redis://127.0.0.1:6379/2".into()))
        );
        assert!(matches!(
            SourceKind::parse("postgres://u@h/db"),
            Ok(SourceKind::Postgres(_))
        ));
        assert!(matches!(
            SourceKind::parse("/tmp/export.jsonl"),
            Ok(SourceKind::Jsonl(_))
        ));
        assert!(SourceKind::parse("grpc://bigtable")
            .unwrap_err()
            .contains("grpc://bigtable"));
    }
}
