//! Starting and stopping Herald: listeners, request routing, background
//! upkeep, and graceful shutdown.

use crate::app::App;
use crate::bridge::registry::Bridges;
use crate::config::StoreKind;
use crate::config::{LogFormat, ServeArgs, Settings};
use crate::endpoint;
use crate::errors::{ApiError, Errno};
use crate::metrics::Metrics;
use crate::reply::{error_response, json, Response};
use crate::router::{Cluster, Router};
use crate::starting::{until_available, Starting};
use crate::store::{now_secs, Directory, ReceiptStore, RedisStore, RocksStore, Store};
use crate::token::{load_or_create_keys, ApiVersion, TokenCodec};
use anyhow::Context;
use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The largest request head (request line and headers) read before the
/// request is refused with 431. Web Push's largest legitimate head is an
/// `aesgcm` push with VAPID: `Encryption` and `Crypto-Key` of up to 4096 bytes
/// each (webpush::MAX_CRYPTO_HEADER), a JWT of up to 4096 bytes
/// (vapid::MAX_JWT_BYTES), the endpoint URL and a few short headers.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// What one listener answers besides the health checks.
#[derive(Clone, Copy)]
struct Serves {
    websocket: bool,
    api: bool,
    metrics: bool,
    /// Node-to-node wake-ups and evictions (`/_herald/node/…`).
    node: bool,
}

/// Entry point of `herald serve`.
pub fn run_from_args(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let (settings, env) = match Settings::for_command(&args) {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    init_logging(&settings);
    warn_unknown_env(&env);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = settings.worker_threads {
        runtime.worker_threads(n);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let server = Server::start(settings).await?;
        wait_for_signal().await;
        server.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

fn init_logging(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr_wants_colour())
        .with_writer(std::io::stderr);
    let _ = match settings.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Settings come from `HERALD_<SETTING>` only; any other `HERALD_*` is most
/// likely a typo that would otherwise change nothing without a word.
fn warn_unknown_env(env: &std::collections::BTreeMap<String, String>) {
    let unknown = crate::config::unknown_env_vars(
        env.keys().map(String::as_str),
        crate::config::OTHER_COMMANDS_ENV,
    );
    for (name, closest) in unknown {
        match closest {
            Some(c) => tracing::warn!("environment variable {name} is not a setting and is ignored; did you mean {c}?"),
            None => tracing::warn!("environment variable {name} is not a setting and is ignored (see `herald serve --help`)"),
        }
    }
}

/// Whether logs on stderr may carry colour codes; see `colour_logs`.
pub fn stderr_wants_colour() -> bool {
    colour_logs(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Colour codes only help a person at a terminal: in files, pipes, journald
/// and `docker logs` they are noise. `NO_COLOR` (no-color.org) set to
/// anything but the empty string turns them off even on a terminal.
fn colour_logs(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A running Herald.
pub struct Server {
    pub app: Arc<App>,
    /// Where each listener actually bound (ports may have been 0).
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Released when the server is dropped, after the store is flushed.
    _data_dir_lock: crate::datadir::DataDirLock,
}

impl Server {
    /// Starts with the bridges the settings' `[bridges]` tables configure.
    pub async fn start(settings: Settings) -> anyhow::Result<Server> {
        Self::start_inner(settings, None).await
    }

    /// Starts with `bridges` instead of those the settings configure (tests
    /// standing in for an upstream).
    pub async fn start_with_bridges(
        settings: Settings,
        bridges: Bridges,
    ) -> anyhow::Result<Server> {
        Self::start_inner(settings, Some(bridges)).await
    }

    async fn start_inner(settings: Settings, bridges: Option<Bridges>) -> anyhow::Result<Server> {
        let data_dir_lock = crate::datadir::claim(&settings.data_dir)?;
        let keys = if settings.endpoint_keys.is_empty() {
            load_or_create_keys(&settings.data_dir)?
        } else {
            settings.endpoint_keys.clone()
        };
        let tokens = TokenCodec::new(&keys)?;
        let metrics = Arc::new(Metrics::new());
        let bridges = match bridges {
            Some(b) => b,
            None => Bridges::from_settings(&settings.bridges, &metrics)?,
        };
        let tls = match (&settings.tls_cert, &settings.tls_key) {
            (Some(c), Some(k)) => Some(Arc::new(crate::tls::Tls::load(c, k)?)),
            _ => None,
        };
        // Listening before the store answers: probes see a node that is
        // alive but not ready while Redis is down or not yet up (starting).
        let (listeners, serves) = bind_listeners(&settings)?;
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<std::io::Result<Vec<_>>>()?;
        let starting = Starting::new(listeners, tls.clone());
        let (store, ledger, directory) = open_store(&settings, &metrics, &starting).await?;
        let cluster = directory
            .clone()
            .map(|d| Cluster::new(d, settings.node_url.clone(), &keys, metrics.clone()));
        let mut app = App::new(settings, store, ledger, tokens, metrics).with_bridges(bridges);
        if let Some(c) = &cluster {
            until_available(&starting, "announcing this node in Redis", || c.announce())
                .await
                .map_err(|e| anyhow::anyhow!("announcing this node in Redis: {e}"))?;
            tracing::info!(node = c.node(), url = %app.settings.node_url, "joined the cluster");
            app = app.with_router(Router::clustered(c.clone()));
        }
        let app = Arc::new(app);
        let versions = until_available(&starting, "reading broadcast versions", || {
            app.store.broadcasts()
        })
        .await
        .map_err(|e| anyhow::anyhow!("reading broadcast versions: {e}"))?;
        app.broadcaster.apply(versions);
        until_available(&starting, "reading blocked senders", || {
            app.blocks.refresh(app.store.as_ref())
        })
        .await
        .map_err(|e| anyhow::anyhow!("reading blocked senders: {e}"))?;

        let mut tasks = Vec::new();
        for (listener, serves) in starting.ready().await?.into_iter().zip(serves) {
            tasks.push(tokio::spawn(accept_loop(
                app.clone(),
                listener,
                serves,
                tls.clone(),
            )));
        }
        tasks.push(tokio::spawn(upkeep(app.clone())));
        tasks.push(tokio::spawn(
            app.receipts
                .clone()
                .sweep_loop(app.settings.receipt_retention),
        ));
        tasks.extend(broadcast_tasks(&app)?);
        if !app.bridges.is_empty() {
            tasks.push(tokio::spawn(crate::bridge::forward::sweep_loop(
                app.clone(),
            )));
        }
        if let (Some(c), Some(d)) = (&cluster, directory) {
            // Quotas hold across the nodes (see quota::share).
            let share = crate::quota::share::share_loop(app.quotas.clone(), d, c.node());
            tasks.push(tokio::spawn(share));
        }
        if let Some(c) = cluster {
            tasks.push(tokio::spawn(c.heartbeat_loop()));
            tasks.push(tokio::spawn(reconfirm_loop(app.clone())));
        }
        if let Some(tls) = tls {
            tasks.push(tokio::spawn(reload_on_sighup(tls)));
        }
        tracing::info!(public_url = %app.settings.public_url.base, "herald ready");
        Ok(Server {
            app,
            addrs,
            tasks,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// Turns /ready to 503 and refuses new websockets, closes open ones with
    /// 1001 so user agents reconnect elsewhere, waits for them (pushes are
    /// still accepted meanwhile), then stops listening and flushes the store.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.app.begin_shutdown();
        let deadline = tokio::time::Instant::now() + self.app.settings.shutdown_timeout;
        while self.app.connections.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        crate::bridge::forward::drain(&self.app, deadline).await;
        for t in &self.tasks {
            t.abort();
        }
        match self.app.store.flush().await {
            Ok(()) => tracing::info!("store flushed; bye"),
            Err(e) => tracing::error!("flushing the store: {e}"),
        }
    }
}

/// Says at start what the settings leave reachable that an operator may not
/// expect, and how to close it.
fn warn_about_exposure(s: &Settings) {
    if s.store == StoreKind::Redis && s.node_listen.is_none() {
        tracing::warn!(
            listen = %s.listen,
            "node-to-node requests (/_herald/node/wakes, /wake and /evict) are served on the public listener; they are signed (HMAC, timestamp, nonce), but set node_listen to a private address to keep them off it"
        );
    }
    if s.metrics_listen.is_none() && !s.metrics_public {
        tracing::info!("/metrics is not served: set metrics_listen to a private address (or metrics_public = true)");
    }
}

/// A listening socket on `addr` with `backlog` as its listen(2) backlog.
/// `TcpListener::bind` would do the same with a fixed backlog of 128 (std's
/// and mio's), which a connection storm overflows: the kernel then drops
/// SYNs and clients retry only after a second.
fn listen_on(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind`: a restart may bind while old connections of
    // the previous process linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The kernel's cap on listen backlogs, `net.core.somaxconn`; None where
/// /proc does not say (not Linux, or /proc not mounted).
fn read_somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Says at start when the kernel will quietly give the listeners a shorter
/// queue than `listen_backlog` asks for.
fn warn_about_backlog(backlog: u32, somaxconn: Option<u32>) {
    if let Some(cap) = backlog_capped_at(backlog, somaxconn) {
        tracing::warn!(
            listen_backlog = backlog,
            somaxconn = cap,
            "listen_backlog exceeds net.core.somaxconn, which caps it: the listeners queue at most {cap} connections; raise it with sysctl -w net.core.somaxconn={backlog} (see deploy/README.md)"
        );
    }
}

/// The cap that shortens `backlog`, if `somaxconn` is known and below it.
fn backlog_capped_at(backlog: u32, somaxconn: Option<u32>) -> Option<u32> {
    somaxconn.filter(|&cap| cap < backlog)
}

/// Where broadcast versions come from besides the API: other nodes (through
/// the shared store) and an upstream source.
fn broadcast_tasks(app: &Arc<App>) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if app.router.cluster().is_some() {
        tasks.push(tokio::spawn(crate::admin::api::sync_blocks(app.clone())));
        tasks.push(tokio::spawn(crate::broadcast::sync_loop(
            app.broadcaster.clone(),
            app.store.clone(),
        )));
    }
    if let Some(url) = &app.settings.broadcast_source_url {
        let source = crate::broadcast::source::Source::new(
            url,
            app.settings.broadcast_source_token.clone(),
        )?;
        tasks.push(tokio::spawn(crate::broadcast::source::poll_loop(
            source,
            app.settings.broadcast_poll_interval,
            app.broadcaster.clone(),
            app.store.clone(),
            app.metrics.clone(),
        )));
    }
    Ok(tasks)
}

/// Binds every listener the settings ask for, each with what it serves.
fn bind_listeners(s: &Settings) -> anyhow::Result<(Vec<TcpListener>, Vec<Serves>)> {
    let only = Serves {
        websocket: false,
        api: false,
        metrics: false,
        node: false,
    };
    let mut plan = vec![(
        s.listen,
        Serves {
            websocket: true,
            api: s.endpoint_listen.is_none(),
            metrics: s.metrics_listen.is_none() && s.metrics_public,
            node: s.node_listen.is_none(),
        },
    )];
    if let Some(a) = s.endpoint_listen {
        plan.push((a, Serves { api: true, ..only }));
    }
    if let Some(a) = s.metrics_listen {
        plan.push((
            a,
            Serves {
                metrics: true,
                ..only
            },
        ));
    }
    if let Some(a) = s.node_listen {
        plan.push((a, Serves { node: true, ..only }));
    }
    warn_about_exposure(s);
    warn_about_backlog(s.listen_backlog, read_somaxconn());
    let mut listeners = Vec::new();
    let mut serves = Vec::new();
    for (addr, what) in plan {
        let listener =
            listen_on(addr, s.listen_backlog).with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(%local, websocket = what.websocket, api = what.api, metrics = what.metrics, node = what.node, "listening");
        listeners.push(listener);
        serves.push(what);
    }
    Ok((listeners, serves))
}

/// The configured engine, and the directory nodes route through when it is
/// shared.
async fn open_store(
    settings: &Settings,
    metrics: &Metrics,
    starting: &Starting,
) -> anyhow::Result<(
    Arc<dyn Store>,
    Arc<dyn ReceiptStore>,
    Option<Arc<dyn Directory>>,
)> {
    match settings.store {
        StoreKind::Rocksdb => {
            let db_path = settings.data_dir.join("db");
            let store = RocksStore::open(
                &db_path,
                settings.sync_writes,
                Some(metrics.messages_expired.clone()),
            )
            .map_err(|e| anyhow::anyhow!("opening the store at {}: {e}", db_path.display()))?;
            Ok((Arc::new(store.clone()), Arc::new(store), None))
        }
        StoreKind::Redis => {
            let url = settings.redis_url.as_deref().unwrap_or_default();
            let what = format!("connecting to Redis at {url}");
            let store = until_available(starting, &what, || {
                RedisStore::connect(
                    url,
                    Some(metrics.messages_expired.clone()),
                    settings.ua_expiry.as_secs(),
                )
            })
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?
            .wait_for(settings.redis_wait_replicas, settings.redis_wait_timeout)
            .with_receipt_retention(settings.receipt_retention);
            let store = Arc::new(store);
            Ok((store.clone(), store.clone(), Some(store)))
        }
    }
}

async fn reload_on_sighup(tls: Arc<crate::tls::Tls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; certificates will not reload");
        return;
    };
    while hup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("TLS certificate reloaded"),
            Err(e) => tracing::error!("TLS reload failed, keeping the old certificate: {e:#}"),
        }
    }
}

async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    serves: Serves,
    tls: Option<Arc<crate::tls::Tls>>,
) {
    // Runs until shutdown aborts it, after websockets have drained: until
    // then /ready must answer 503 and pushes are still accepted.
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let peer = crate::peer::Peer(peer);
                match &tls {
                    None => {
                        tokio::spawn(serve_http(app.clone(), stream, serves, peer));
                    }
                    Some(tls) => {
                        let acceptor = tls.acceptor();
                        let app = app.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(stream),
                            )
                            .await
                            {
                                Ok(Ok(stream)) => serve_http(app, stream, serves, peer).await,
                                Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                                Err(_) => tracing::debug!("TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_http<I>(app: Arc<App>, stream: I, serves: Serves, peer: crate::peer::Peer)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Requests keep being served while websockets drain at shutdown (so
    // /ready can say 503 and pushes are still stored); the process exit
    // ends what is left.
    let service = service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(peer);
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(route(app, req, serves).await) }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        // hyper's default (about 400 KB) lets each connection hold that much
        // of an unfinished request head. Header count stays at hyper's
        // default of 100 (setting it would move the parser's array to the heap).
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

/// `/__version__`'s `source`: Cargo.toml's `repository`, or "unknown" when
/// the package names none (a made-up URL would be worse than none). The
/// commit comes from build.rs.
const SOURCE: &str = match env!("CARGO_PKG_REPOSITORY").as_bytes() {
    b"" => "unknown",
    _ => env!("CARGO_PKG_REPOSITORY"),
};

/// Where user agents open their websocket: exactly this path, with Upgrade.
pub const WEBSOCKET_PATH: &str = "/";
/// Push endpoints: `POST|GET /wpush/v1|v2/<token>`, and `/wpush/<token>`
/// (autopush-rs's legacy v1) with `autopush_crypto_keys` set.
const ENDPOINTS: &str = "/wpush/";
/// Message resources (a push's Location): `DELETE|GET /m/<id>`.
const MESSAGES: &str = "/m/";
/// Receipt subscriptions: `GET /r/<token>`.
const RECEIPTS: &str = "/r/";

/// The application-server API's path prefixes: with `WEBSOCKET_PATH`, what
/// the internet must reach, so what every reverse proxy and Ingress in
/// deploy/ must route (tests/deploy_files/ checks them against this list).
/// The router dispatches the push API only under these prefixes, so a
/// public route cannot exist without being listed here. Everything else
/// (health, metrics, the broadcast and node-to-node APIs) is for operators
/// and other nodes and may stay private.
pub const PUBLIC_PATH_PREFIXES: &[&str] = &[
    ENDPOINTS,
    MESSAGES,
    RECEIPTS,
    // The registration API of mobile user agents, one prefix per `{type}`
    // (gcm is FCM's old name, still sent by Firefox for Android): `/v1/`
    // alone would also publish the broadcast API.
    "/v1/fcm/",
    "/v1/gcm/",
    "/v1/apns/",
    // The Matrix push gateway, which homeservers call (`matrix::NOTIFY_PATH`).
    "/_matrix/push/v1/",
];

/// Every response body: whole, or streamed (receipt subscriptions).
pub type Body = http_body_util::Either<Full<Bytes>, crate::receipts::api::StreamingBody>;

async fn route(
    app: Arc<App>,
    req: http::Request<Incoming>,
    serves: Serves,
) -> http::Response<Body> {
    use http_body_util::Either;
    if serves.api && req.method() == Method::GET {
        if let Some(token) = req.uri().path().strip_prefix(RECEIPTS) {
            let result =
                crate::receipts::api::read(&app, token, req.headers(), req.uri().query()).await;
            return match result {
                Ok(r) => {
                    app.metrics
                        .http_responses
                        .with_label_values(&["200", "0"])
                        .inc();
                    r.map(Either::Right)
                }
                Err(e) => api_response(&app, Err(e)).map(Either::Left),
            };
        }
    }
    route_whole(app, req, serves).await.map(Either::Left)
}

async fn route_whole(app: Arc<App>, req: http::Request<Incoming>, serves: Serves) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(3, '/').collect();

    if serves.websocket && path == WEBSOCKET_PATH && is_upgrade(&req) {
        return upgrade(app, req);
    }
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["health"]) => return json(StatusCode::OK, r#"{"status":"OK"}"#.into()),
        (Method::GET, ["__lbheartbeat__"]) => return json(StatusCode::OK, "{}".into()),
        (Method::GET, ["ready"]) | (Method::GET, ["__heartbeat__"]) => {
            return readiness(&app).await
        }
        (Method::GET, ["__version__"]) => {
            return json(
                StatusCode::OK,
                serde_json::json!({
                    "source": SOURCE,
                    "version": env!("CARGO_PKG_VERSION"),
                    "commit": env!("BUILD_GIT_COMMIT"),
                    "build": "cargo",
                })
                .to_string(),
            )
        }
        (Method::GET, ["metrics"]) if serves.metrics => return metrics(&app),
        (Method::POST, ["_herald", "node", action]) if serves.node => {
            return node_request(&app, action, req).await
        }
        _ => {}
    }
    if !serves.api {
        return api_response(&app, Err(ApiError::not_found()));
    }
    let result = if let Some(rest) = path.strip_prefix(ENDPOINTS) {
        match (method, rest.split('/').collect::<Vec<_>>().as_slice()) {
            (Method::POST, [v, token]) => match api_version(v) {
                Some(v) => {
                    endpoint::push(&app, endpoint::EndpointPath::Versioned(v), token, req).await
                }
                None => Err(ApiError::invalid_endpoint()),
            },
            (Method::GET, [v, token]) => match api_version(v) {
                Some(v) => endpoint::discovery(&app, endpoint::EndpointPath::Versioned(v), token),
                None => Err(ApiError::invalid_endpoint()),
            },
            (_, [_, _]) => Err(ApiError::method_not_allowed()),
            // autopush-rs's unversioned endpoints exist only where its
            // tokens are accepted at all.
            (method, [token]) if app.settings.autopush_crypto_keys.is_some() => match method {
                Method::POST => {
                    endpoint::push(&app, endpoint::EndpointPath::AutopushLegacy, token, req).await
                }
                Method::GET => {
                    endpoint::discovery(&app, endpoint::EndpointPath::AutopushLegacy, token)
                }
                _ => Err(ApiError::method_not_allowed()),
            },
            _ => Err(ApiError::not_found()),
        }
    } else if let Some(rest) = path.strip_prefix(MESSAGES) {
        match (method, rest.split('/').collect::<Vec<_>>().as_slice()) {
            (Method::DELETE, [id]) => endpoint::cancel(&app, id).await,
            (Method::GET, [id]) => crate::receipts::api::status(&app, id).await,
            (_, [_]) => Err(ApiError::method_not_allowed()),
            _ => Err(ApiError::not_found()),
        }
    } else if let Some(rest) = path.strip_prefix(RECEIPTS) {
        // GET was answered by `route`, as a stream.
        match rest.split('/').count() {
            1 => Err(ApiError::method_not_allowed()),
            _ => Err(ApiError::not_found()),
        }
    } else if path == crate::matrix::NOTIFY_PATH {
        crate::matrix::handle(&app, req).await
    } else if crate::registration::claims(&path) {
        crate::registration::handle(&app, req).await
    } else {
        operator_api(&app, method, &segments, req).await
    };
    api_response(&app, result)
}

/// The APIs for operators: broadcast versions, and the admin API.
async fn operator_api(
    app: &App,
    method: Method,
    segments: &[&str],
    req: http::Request<Incoming>,
) -> Result<Response, ApiError> {
    match (method, segments) {
        (Method::GET, ["v1", "broadcasts"]) => crate::broadcast::api::list(app, &req),
        (Method::PUT, ["v1", "broadcasts", id]) => {
            let id = id.to_string();
            crate::broadcast::api::put(app, &id, req).await
        }
        (_, ["v1", "broadcasts", ..]) if !app.settings.broadcast_tokens.is_empty() => {
            Err(ApiError::method_not_allowed())
        }
        (_, ["v1", "admin", ..]) => crate::admin::api::handle(app, req).await,
        _ => Err(ApiError::not_found()),
    }
}

/// Wake-ups and evictions from other nodes (see router::cluster).
async fn node_request(app: &App, action: &str, req: http::Request<Incoming>) -> Response {
    use crate::router::cluster::{Evict, Wake};
    use http_body_util::{BodyExt, Limited};
    let Some(cluster) = app.router.cluster() else {
        return error_response(&ApiError::not_found());
    };
    let refused = |e: ApiError| {
        app.metrics
            .node_requests_refused
            .with_label_values(&[node_refusal(e.errno)])
            .inc();
        error_response(&e)
    };
    let (parts, body) = req.into_parts();
    let auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let signed = match cluster.check_header(auth) {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    let limit = match action {
        "wakes" => crate::router::cluster::MAX_WAKES_BODY,
        _ => 64 * 1024,
    };
    let body = match tokio::time::timeout(
        endpoint::BODY_READ_TIMEOUT,
        Limited::new(body, limit).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return error_response(&ApiError::new(
                400,
                Errno::UnreadableBody,
                "unreadable body",
            ))
        }
    };
    if let Err(e) = cluster.check_request(&signed, parts.method.as_str(), parts.uri.path(), &body) {
        return refused(e);
    }
    let done = match action {
        "wakes" => match cluster.on_wakes(&app.router.local, &body) {
            Some(reached) => {
                return json(
                    StatusCode::OK,
                    serde_json::json!({ "reached": reached }).to_string(),
                )
            }
            None => {
                return error_response(&ApiError::new(
                    400,
                    Errno::UnreadableBody,
                    "malformed wake-up batch",
                ))
            }
        },
        "wake" => match serde_json::from_slice::<Wake>(&body) {
            Ok(w) => cluster.on_wake(&app.router.local, &w),
            Err(_) => {
                return error_response(&ApiError::new(
                    400,
                    Errno::UnreadableBody,
                    "malformed wake-up",
                ))
            }
        },
        "evict" => match serde_json::from_slice::<Evict>(&body) {
            Ok(e) => cluster.on_evict(&app.router.local, &e),
            Err(_) => {
                return error_response(&ApiError::new(
                    400,
                    Errno::UnreadableBody,
                    "malformed eviction",
                ))
            }
        },
        _ => return error_response(&ApiError::not_found()),
    };
    json(
        StatusCode::OK,
        serde_json::json!({ "done": done }).to_string(),
    )
}

/// The metric label of a refused node request.
fn node_refusal(errno: Errno) -> &'static str {
    match errno {
        Errno::NodeClockSkew => "stale",
        Errno::NodeReplay => "replayed",
        Errno::NodeReplayWindowFull => "window_full",
        _ => "bad_signature",
    }
}

fn api_version(v: &str) -> Option<ApiVersion> {
    match v {
        "v1" => Some(ApiVersion::V1),
        "v2" => Some(ApiVersion::V2),
        _ => None,
    }
}

fn api_response(app: &App, result: Result<Response, ApiError>) -> Response {
    let (response, errno) = match result {
        Ok(r) => (r, 0u16),
        Err(e) => {
            if let Some(reason) = e.vapid_reason {
                app.metrics
                    .vapid_failures
                    .with_label_values(&[reason])
                    .inc();
            }
            (error_response(&e), e.errno.code())
        }
    };
    app.metrics
        .http_responses
        .with_label_values(&[response.status().as_str(), &errno.to_string()])
        .inc();
    response
}

async fn readiness(app: &Arc<App>) -> Response {
    if app.is_shutting_down() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"shutting down"}"#.into(),
        );
    }
    match app.store.health_check().await {
        Ok(()) => json(StatusCode::OK, r#"{"status":"OK"}"#.into()),
        Err(e) => {
            // Probes and load balancers see a fixed answer; the cause
            // (hosts, ports, engine errors) is for the log only.
            tracing::warn!("/ready: store unavailable: {e}");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"status":"store unavailable"}"#.into(),
            )
        }
    }
}

fn metrics(app: &App) -> Response {
    let stats = app.store.stats();
    let m = &app.metrics;
    m.ws_connections.set(app.connections.get() as i64);
    m.broadcast_subscribed
        .set(app.broadcaster.subscribed() as i64);
    m.stored_messages.set(stats.estimated_messages as i64);
    m.store_size.set(stats.size_bytes as i64);
    m.store_pending_compaction
        .set(stats.pending_compaction_bytes as i64);
    http::Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(m.render())))
        .expect("valid response")
}

fn is_upgrade<B>(req: &http::Request<B>) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    req.method() == Method::GET
        && has(header::CONNECTION, "upgrade")
        && has(header::UPGRADE, "websocket")
}

fn upgrade(app: Arc<App>, mut req: http::Request<Incoming>) -> Response {
    let plain = |status: StatusCode, text: &str| {
        http::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(text.to_string())))
            .expect("valid response")
    };
    let headers = req.headers();
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return http::Response::builder()
            .status(StatusCode::UPGRADE_REQUIRED)
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .body(Full::new(Bytes::from_static(
                b"websocket version 13 required",
            )))
            .expect("valid response");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let accept = derive_accept_key(key.as_bytes());
    let wants_push = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "push-notification");
    if app.is_shutting_down() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let max = app.settings.max_connections;
    let Some(place) = app.connections.try_hold(max) else {
        return http::Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header(header::RETRY_AFTER, "30")
            .body(Full::new(Bytes::from_static(b"too many connections")))
            .expect("valid response");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(crate::connect::run(app, on_upgrade, place));
    let mut response = http::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if wants_push {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, "push-notification");
    }
    response
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

/// Background upkeep: removes expired messages and user agents that have
/// been silent longer than `ua_expiry`, off the request path.
async fn upkeep(app: Arc<App>) {
    let mut tick = tokio::time::interval(app.settings.sweep_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        match sweep(&app).await {
            Ok(dropped) if dropped > 0 => tracing::info!(dropped, "removed silent user agents"),
            Ok(_) => {}
            Err(e) => tracing::error!("sweep: {e}"),
        }
    }
}

/// One sweep; returns how many user agents were dropped.
pub async fn sweep(app: &App) -> Result<usize, crate::store::StoreError> {
    let mailbox = crate::mailbox::Mailbox::of(app);
    mailbox.expire().await?;
    if let Some(cluster) = app.router.cluster() {
        // A shared store expires silent user agents by itself; those
        // connected here all along are not silent.
        cluster.refresh(app.store.as_ref(), now_secs()).await?;
    }
    let now = now_secs();
    let cutoff = now.saturating_sub(app.settings.ua_expiry.as_secs());
    let mut dropped = 0;
    for uaid in app.store.stale_users(cutoff, usize::MAX).await? {
        if app.router.is_connected(&uaid) {
            // Connected all along: it is not silent, only long-lived.
            if let Some(mut rec) = app.store.get_user(&uaid).await? {
                rec.last_seen = now;
                app.store.put_user(&uaid, &rec).await?;
            }
            continue;
        }
        let lost = app.store.count_messages(&uaid, now, usize::MAX).await?;
        mailbox.drop_user_agent(&uaid).await?;
        app.metrics
            .messages_dropped
            .with_label_values(&["ua_expired"])
            .inc_by(lost as u64);
        dropped += 1;
    }
    Ok(dropped)
}

/// Every heartbeat, forever: connections served while the store could not
/// record them are claimed again (`Router::reconfirm`), and user agents
/// whose wake-up was lost are woken again (`Router::rewake`).
async fn reconfirm_loop(app: Arc<App>) {
    let mut tick = tokio::time::interval(crate::router::cluster::HEARTBEAT_INTERVAL);
    loop {
        tick.tick().await;
        app.router.reconfirm().await;
        app.router.rewake().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(colour_logs(true, Some(OsStr::new(""))));
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None));
        assert!(!colour_logs(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn a_backlog_above_somaxconn_is_reported_with_the_cap() {
        assert_eq!(backlog_capped_at(4096, Some(4096)), None);
        assert_eq!(backlog_capped_at(4096, Some(65535)), None);
        assert_eq!(backlog_capped_at(8192, Some(4096)), Some(4096));
        assert_eq!(backlog_capped_at(8192, None), None, "unknown: no warning");
    }

    /// IPv4 and IPv6 addresses bind as themselves, and the port can be
    /// bound again at once after the listener closes (SO_REUSEADDR).
    #[tokio::test]
    async fn listeners_bind_both_families_with_reuseaddr() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let l = listen_on(addr.parse().unwrap(), 64).unwrap();
            let local = l.local_addr().unwrap();
            assert_eq!(local.is_ipv6(), addr.starts_with('['), "{addr}");
            let client = tokio::net::TcpStream::connect(local).await.unwrap();
            let (server_side, _) = l.accept().await.unwrap();
            drop(server_side);
            drop(client);
            drop(l);
            // The accepted side closed first, so it sits in TIME_WAIT.
            listen_on(local, 64).unwrap();
        }
    }

    /// Proxies route by these; each is a whole path segment ending in `/`
    /// so that `/m/` does not also claim `/metrics`.
    #[test]
    fn public_prefixes_are_whole_segments_and_exclude_private_paths() {
        assert_eq!(WEBSOCKET_PATH, "/");
        for prefix in PUBLIC_PATH_PREFIXES {
            assert!(prefix.starts_with('/') && prefix.ends_with('/'), "{prefix}");
            assert!(!prefix.contains("//"), "{prefix}");
            for private in [
                "/metrics",
                "/_herald/node/wake",
                "/health",
                "/v1/broadcasts",
            ] {
                assert!(!private.starts_with(prefix), "{prefix} claims {private}");
            }
        }
    }
}
