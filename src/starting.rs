//! What a node does before its store answers.
//!
//! systemd and Kubernetes may start Herald before Redis, or while Redis is
//! down; exiting then only turns a slow Redis into a restart loop. So a node
//! listens at once and answers as one that is alive but not ready (`/health`
//! 200, `/ready` 503, everything else 503 with `Retry-After`), and retries
//! what it needs from the store with backoff, logging each failure, until
//! the store answers. Only the store's "not now" (`StoreError::Unavailable`)
//! is waited out: a refusal a retry would repeat (a malformed URL, a wrong
//! password) still ends the start at once.

use crate::errors::{ApiError, Errno, STORAGE_UNAVAILABLE};
use crate::reply::{error_response, json, Response};
use crate::store::{StoreError, StoreResult};
use http::StatusCode;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The first wait after a failure; it doubles up to `MAX_RETRY`.
pub const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Long enough not to flood a Redis that is coming up, short enough that a
/// node serves within seconds of it.
pub const MAX_RETRY: Duration = Duration::from_secs(5);

/// The wait after one that was `previous` long.
pub fn next_retry(previous: Duration) -> Duration {
    (previous * 2).min(MAX_RETRY)
}

/// Whether a failure at start is worth waiting out.
pub fn worth_retrying(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_))
}

/// Runs `op` until it succeeds or fails with something a retry would not
/// fix; `what` names it in the log. The first failure it waits out makes
/// `starting` answer as a node that is not ready.
pub async fn until_available<T, F, Fut>(
    starting: &Starting,
    what: &str,
    mut op: F,
) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StoreResult<T>>,
{
    let mut wait = FIRST_RETRY;
    let mut attempt = 1u32;
    loop {
        match op().await {
            Ok(v) => {
                if attempt > 1 {
                    tracing::info!(attempts = attempt, "{what}: the store answered");
                }
                return Ok(v);
            }
            Err(e) if worth_retrying(&e) => {
                tracing::warn!(
                    attempt,
                    retry_in_ms = wait.as_millis() as u64,
                    "{what}: {e}; not ready, retrying"
                );
                starting.not_ready();
                tokio::time::sleep(wait).await;
                wait = next_retry(wait);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The listeners of a node that is starting. While the store answers at
/// once they are only bound (connections wait in the backlog for the real
/// accept loops, as they always did); once the store keeps the node waiting
/// they answer as a node that is not ready.
pub struct Starting {
    state: std::sync::Mutex<State>,
    tls: Option<Arc<crate::tls::Tls>>,
}

enum State {
    Bound(Vec<TcpListener>),
    Answering(NotReady),
    Taken,
}

impl Starting {
    pub fn new(listeners: Vec<TcpListener>, tls: Option<Arc<crate::tls::Tls>>) -> Starting {
        Starting {
            state: std::sync::Mutex::new(State::Bound(listeners)),
            tls,
        }
    }

    /// Answers as a node that is not ready, from now until `ready`.
    pub fn not_ready(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Bound(_) = &*state {
            let State::Bound(listeners) = std::mem::replace(&mut *state, State::Taken) else {
                unreachable!("matched above");
            };
            *state = State::Answering(NotReady::serve(listeners, self.tls.clone()));
        }
    }

    /// The listeners, for the real accept loops, in the order given.
    pub async fn ready(self) -> anyhow::Result<Vec<TcpListener>> {
        let state = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        match state {
            State::Bound(l) => Ok(l),
            State::Answering(n) => n.ready().await,
            State::Taken => anyhow::bail!("the listeners were lost while starting"),
        }
    }
}

/// The answer of a node that is alive but not ready.
pub fn answer(path: &str) -> Response {
    match path {
        "/health" => json(StatusCode::OK, r#"{"status":"OK"}"#.into()),
        "/__lbheartbeat__" => json(StatusCode::OK, "{}".into()),
        "/ready" | "/__heartbeat__" => json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"starting"}"#.into(),
        ),
        // Pushes, websockets, node requests: the store is what they need.
        // Not `ApiError::storage`, which logs each one: the retries log.
        _ => {
            let mut e = ApiError::new(503, Errno::StorageUnavailable, STORAGE_UNAVAILABLE);
            e.retry_after = Some(10);
            error_response(&e)
        }
    }
}

/// Listeners answering `answer` until the node is ready, then handed back.
struct NotReady {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<TcpListener>>,
}

impl NotReady {
    fn serve(listeners: Vec<TcpListener>, tls: Option<Arc<crate::tls::Tls>>) -> NotReady {
        let (stop, stopped) = watch::channel(false);
        let tasks = listeners
            .into_iter()
            .map(|l| tokio::spawn(answer_until_ready(l, stopped.clone(), tls.clone())))
            .collect();
        NotReady { stop, tasks }
    }

    /// Stops answering and returns the listeners, in the order given.
    async fn ready(mut self) -> anyhow::Result<Vec<TcpListener>> {
        let _ = self.stop.send(true);
        let mut out = Vec::with_capacity(self.tasks.len());
        for t in std::mem::take(&mut self.tasks) {
            out.push(t.await?);
        }
        Ok(out)
    }
}

/// A start that failed must not leave its ports bound (tests start many
/// servers in one process).
impl Drop for NotReady {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn answer_until_ready(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    tls: Option<Arc<crate::tls::Tls>>,
) -> TcpListener {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return listener,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match &tls {
                    None => {
                        tokio::spawn(serve(stream));
                    }
                    Some(tls) => {
                        let acceptor = tls.acceptor();
                        tokio::spawn(async move {
                            let handshake = acceptor.accept(stream);
                            if let Ok(Ok(s)) =
                                tokio::time::timeout(Duration::from_secs(10), handshake).await
                            {
                                serve(s).await;
                            }
                        });
                    }
                },
                // Usually out of file descriptors: back off, as accept_loop does.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
        }
    }
}

async fn serve<I>(stream: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
        Ok::<_, std::convert::Infallible>(answer(req.uri().path()))
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let mut w = FIRST_RETRY;
        let mut waits = vec![w];
        for _ in 0..6 {
            w = next_retry(w);
            waits.push(w);
        }
        assert_eq!(
            waits.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
            [500, 1000, 2000, 4000, 5000, 5000, 5000]
        );
    }

    #[test]
    fn only_the_stores_not_now_is_waited_out() {
        assert!(worth_retrying(&StoreError::Unavailable("refused".into())));
        for e in [
            StoreError::Rejected("redis URL: bad".into()),
            StoreError::Corrupt("odd reply".into()),
            StoreError::Io("disk".into()),
        ] {
            assert!(!worth_retrying(&e), "{e}");
        }
    }

    #[tokio::test]
    async fn a_refusal_ends_the_wait_at_once_and_not_now_is_retried() {
        let starting = Starting::new(Vec::new(), None);
        let mut calls = 0;
        let r: StoreResult<()> = until_available(&starting, "test", || {
            calls += 1;
            async { Err(StoreError::Rejected("bad URL".into())) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let r = until_available(&starting, "test", || {
            calls += 1;
            let n = calls;
            async move {
                if n < 2 {
                    Err(StoreError::Unavailable("refused".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 2);
    }

    #[test]
    fn a_starting_node_is_alive_but_not_ready() {
        assert_eq!(answer("/health").status(), 200);
        assert_eq!(answer("/__lbheartbeat__").status(), 200);
        assert_eq!(answer("/ready").status(), 503);
        assert_eq!(answer("/__heartbeat__").status(), 503);
        let push = answer("/wpush/v2/abc");
        assert_eq!(push.status(), 503);
        assert!(push.headers().contains_key("retry-after"));
    }
}
