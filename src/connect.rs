//! The websocket edge: reads frames, feeds them to a `Session`, carries out
//! what it returns, and runs the timers (hello deadline, keepalive pings).
//! Per-connection state is kept small so a node can hold many idle user
//! agents: small socket buffers, one task, no per-connection threads.

use crate::app::App;
use crate::broadcast::Snapshot;
use crate::occupancy::Held;
use crate::router::cluster::RECHECK_INTERVAL;
use crate::router::{Binding, Routed};
use crate::session::{close, Action, Now, Session};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{sleep, Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

/// Socket buffer sizes for a push session. Frames are small (a notification
/// is at most ~5.6 KiB of JSON); tungstenite's 128 KiB defaults would cost
/// far more than the session itself. Buffers grow on demand for larger frames.
/// The read buffer lives as long as the connection, idle or not, and what a
/// user agent sends (hello, register, an ack) mostly fits in 256 bytes: a
/// larger frame only takes a few more reads.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// How soon a session whose store read failed tries again.
const STORE_RETRY: Duration = Duration::from_secs(2);

enum Flow {
    Continue,
    Stop,
}

/// The task of one user agent's connection, from the HTTP upgrade to its
/// end. Every idle connection holds this future for its whole life, in a
/// task cell tokio aligns to 128 bytes: what it keeps beyond `serve`'s own
/// future (the config is made here, not captured) is paid per connection.
pub async fn run(app: Arc<App>, on_upgrade: OnUpgrade, place: Held) {
    match on_upgrade.await {
        Ok(upgraded) => {
            let config = ws_config(app.settings.max_frame_size);
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            serve(app, ws, place).await;
        }
        Err(e) => tracing::debug!("websocket upgrade failed: {e}"),
    }
}

/// Runs one user agent's connection to its end; `_place` is its place
/// under `max_connections`, given back when this returns or is dropped.
pub async fn serve<S>(app: Arc<App>, mut ws: WebSocketStream<S>, _place: Held)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session::new(app.clone(), Now::read().instant);
    let mut binding: Option<Binding> = None;
    let mut shutdown = app.shutdown.subscribe();
    let mut actions = Vec::new();
    // Until hello; boxed, as inline it would widen every task for good.
    let mut hello_timer = Some(Box::pin(sleep(app.settings.hello_timeout)));
    // One timer does double duty: when idle, it fires to send a ping; after
    // a ping, it fires if no pong (or anything else) came back in time.
    let keepalive = sleep(app.settings.ping_interval);
    tokio::pin!(keepalive);
    let mut awaiting_pong = false;
    // Re-reads the store now and then: across nodes (a wake-up lost on the
    // way) and after a failed read (the store was unreachable). Boxed and
    // made only when first needed: one node whose store answers never
    // needs it, and inline it cost every connection 112 bytes.
    let clustered = app.router.cluster().is_some();
    let mut recheck: Option<Pin<Box<Sleep>>> = clustered.then(|| Box::pin(sleep(RECHECK_INTERVAL)));
    // Held only once the user agent follows a broadcast.
    let mut broadcasts: Option<watch::Receiver<Arc<Snapshot>>> = None;

    loop {
        if broadcasts.is_none() {
            if let Some(seen) = session.broadcast_serial() {
                let mut rx = app.broadcaster.subscribe();
                let snapshot = rx.borrow_and_update().clone();
                broadcasts = Some(rx);
                // A change between the session's look and this subscription.
                if snapshot.serial != seen {
                    session.on_broadcast(&snapshot, &mut actions);
                    if perform(&app, &mut ws, &mut actions, &mut binding).await {
                        break;
                    }
                }
            }
        }
        if hello_timer.is_some() && session.uaid().is_some() {
            hello_timer = None;
        }
        if recheck.is_none() && session.needs_retry() {
            recheck = Some(Box::pin(sleep(STORE_RETRY)));
        }
        let flow = tokio::select! {
            frame = ws.next() => {
                match frame {
                    Some(Ok(frame)) => {
                        keepalive.as_mut().reset(Instant::now() + app.settings.ping_interval);
                        awaiting_pong = false;
                        match frame {
                            WsMessage::Text(text) => {
                                // Boxed, like every rarely-running await here: an
                                // inline future would widen every idle connection's
                                // task to its size (about 1.1 KiB for this one).
                                Box::pin(session.on_text(text.as_str(), Now::read(), &mut actions)).await;
                                Flow::Continue
                            }
                            WsMessage::Binary(_) => {
                                actions.push(Action::Close(close::UNSUPPORTED, "binary frames are not part of the protocol".into()));
                                Flow::Continue
                            }
                            WsMessage::Close(_) => {
                                Box::pin(answer_close(&mut ws)).await;
                                Flow::Stop
                            }
                            // tungstenite answers pings itself.
                            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => Flow::Continue,
                        }
                    }
                    Some(Err(WsError::Capacity(e))) => {
                        actions.push(Action::Close(close::TOO_BIG, format!("frame too large: {e}")));
                        Flow::Continue
                    }
                    Some(Err(WsError::Protocol(e))) => {
                        actions.push(Action::Close(close::PROTOCOL, e.to_string()));
                        Flow::Continue
                    }
                    Some(Err(WsError::Utf8(_))) => {
                        actions.push(Action::Close(close::PROTOCOL, "text frame is not UTF-8".into()));
                        Flow::Continue
                    }
                    Some(Err(_)) | None => Flow::Stop,
                }
            }
            routed = recv(binding.as_ref()) => {
                match routed {
                    Routed::Message(m) => session.on_routed(&m, Now::read(), &mut actions),
                    Routed::Backlog => session.on_backlog(),
                    Routed::Closed => actions.push(Action::Close(close::NORMAL, TAKEN_OVER.into())),
                }
                Flow::Continue
            }
            Some(snapshot) = broadcast_changed(broadcasts.as_mut()) => {
                session.on_broadcast(&snapshot, &mut actions);
                Flow::Continue
            }
            _ = timer(hello_timer.as_mut()) => {
                actions.push(Action::Close(close::POLICY, "no hello in time".into()));
                Flow::Continue
            }
            _ = timer(recheck.as_mut()), if clustered || session.needs_retry() => {
                let next = if session.needs_retry() { STORE_RETRY } else { RECHECK_INTERVAL };
                if let Some(t) = recheck.as_mut() {
                    t.as_mut().reset(Instant::now() + next);
                }
                session.on_backlog();
                Flow::Continue
            }
            _ = &mut keepalive => {
                if awaiting_pong {
                    tracing::debug!("closing a connection that stopped answering pings");
                    Flow::Stop
                } else {
                    awaiting_pong = true;
                    keepalive.as_mut().reset(Instant::now() + app.settings.ping_timeout);
                    match ws.send(WsMessage::Ping(Default::default())).await {
                        Ok(()) => Flow::Continue,
                        Err(_) => Flow::Stop,
                    }
                }
            }
            _ = crate::app::shutdown_begun(&mut shutdown) => {
                actions.push(Action::Close(close::GOING_AWAY, "server shutting down".into()));
                Flow::Continue
            }
        };
        if let Flow::Stop = flow {
            break;
        }
        // Carry out what the event produced, then let the session top up its
        // delivery window (after Bind, so nothing routed in between is lost).
        let mut stop = perform(&app, &mut ws, &mut actions, &mut binding).await;
        if !stop {
            session.pump(&mut actions).await;
            stop = perform(&app, &mut ws, &mut actions, &mut binding).await;
        }
        if stop {
            break;
        }
        // An idle connection should not keep 128 bytes for its next event;
        // allocating them again costs far less than the event itself.
        actions = Vec::new();
    }

    if let (Some(uaid), Some(b)) = (session.uaid(), &binding) {
        app.router.unbind(&uaid, b.id).await;
    }
}

/// Returns true when the connection must end. Boxed only when there is
/// something to do: its future (close handshake, router bind) is larger than
/// everything an idle connection waits on.
async fn perform<S>(
    app: &App,
    ws: &mut WebSocketStream<S>,
    actions: &mut Vec<Action>,
    binding: &mut Option<Binding>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if actions.is_empty() {
        return false;
    }
    Box::pin(perform_all(app, ws, actions, binding)).await
}

async fn perform_all<S>(
    app: &App,
    ws: &mut WebSocketStream<S>,
    actions: &mut Vec<Action>,
    binding: &mut Option<Binding>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut wrote = false;
    for action in actions.drain(..) {
        match action {
            Action::Send(text) => {
                if ws.feed(WsMessage::text(text)).await.is_err() {
                    return true;
                }
                wrote = true;
            }
            Action::Bind(uaid) => match app.router.bind(uaid).await {
                Some(b) => *binding = Some(b),
                None => {
                    // Returning drops the drain, discarding what was left.
                    close_with(ws, close::NORMAL, TAKEN_OVER.into()).await;
                    return true;
                }
            },
            Action::Close(code, reason) => {
                close_with(ws, code, reason).await;
                return true;
            }
        }
    }
    wrote && ws.flush().await.is_err()
}

const TAKEN_OVER: &str = "another connection took over this uaid";

async fn close_with<S>(ws: &mut WebSocketStream<S>, code: u16, reason: String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let _ = ws.send(WsMessage::Close(Some(frame))).await;
    // Give the peer a moment to answer the close handshake.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    end_tcp(ws).await;
}

/// How long a closing handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// RFC 6455 §5.5.1: the peer's Close gets a Close back, echoing its code.
/// tungstenite queues that echo when it reads the frame but sends it only on
/// the next write or flush; without this the connection was dropped with the
/// echo unsent and every client saw an abnormal closure (1006).
async fn answer_close<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Ends in ConnectionClosed once the echo is written: that is success.
    let _ = tokio::time::timeout(CLOSE_GRACE, ws.flush()).await;
    end_tcp(ws).await;
}

/// The server closes TCP first (RFC 6455 §7.1.1): a FIN after the last
/// frame (and TLS close_notify). Then whatever the peer still sends (its
/// answering Close, frames already in flight) is read and dropped until it
/// closes too: a socket closed with unread data sends a reset, which can
/// destroy our Close frame before the peer has read it.
async fn end_tcp<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = ws.get_mut();
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if stream.shutdown().await.is_ok() {
            let mut sink = [0u8; 512];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await;
}

async fn recv(binding: Option<&Binding>) -> Routed {
    match binding {
        Some(b) => b.recv().await,
        None => std::future::pending().await,
    }
}

/// The next broadcast snapshot; pending forever without a subscription (or
/// if the broadcaster went away, which happens only at exit). The wait is
/// boxed: inline it widened every connection's task by 144 bytes, follower
/// or not, and only followers pay the allocation per wait.
async fn broadcast_changed(
    rx: Option<&mut watch::Receiver<Arc<Snapshot>>>,
) -> Option<Arc<Snapshot>> {
    if let Some(rx) = rx {
        if Box::pin(rx.changed()).await.is_ok() {
            return Some(rx.borrow_and_update().clone());
        }
    }
    std::future::pending().await
}

/// Waits on a timer if there is one, forever if not.
async fn timer(t: Option<&mut Pin<Box<Sleep>>>) {
    match t {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Io = TokioIo<hyper::upgrade::Upgraded>;

    /// The size of the future a closure would return, without running it.
    fn size_of_future<F: std::future::Future>(_: impl FnOnce() -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection's task holds `serve`'s future for its whole
    /// life, at the size of its largest await: frame handling and actions
    /// are boxed so they do not set it. Run with --nocapture for the parts.
    #[test]
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn an_idle_connection_task_stays_small() {
        let serve = size_of_future(|| serve::<Io>(unreachable!(), unreachable!(), unreachable!()));
        let task = size_of_future(|| run(unreachable!(), unreachable!(), unreachable!()));
        let on_text = size_of_future(|| {
            Session::on_text(
                unreachable!(),
                unreachable!(),
                unreachable!(),
                unreachable!(),
            )
        });
        let perform = size_of_future(|| {
            perform_all::<Io>(
                unreachable!(),
                unreachable!(),
                unreachable!(),
                unreachable!(),
            )
        });
        let sleep = std::mem::size_of::<tokio::time::Sleep>();
        let ws = std::mem::size_of::<WebSocketStream<Io>>();
        let session = std::mem::size_of::<Session>();
        eprintln!(
            "bytes: task future {task}, serve future {serve} (of which websocket {ws}, \
             session {session}, each timer {sleep}); boxed: on_text {on_text}, perform {perform}"
        );
        assert!(serve < on_text + perform, "{serve}");
        // tokio adds 104 bytes of its own (header, scheduler, id, stage,
        // trailer) and rounds the cell up to a multiple of 128: up to 1,688
        // the cell is 1,792 bytes (2,048 before this bound).
        assert!(
            task <= 1688,
            "the connection's task future grew to {task} bytes"
        );
    }
}
