//! The store's connection, replaced by a fresh one when calls time out on a
//! Redis Cluster.
//!
//! Why: a cluster client re-reads the slot map only when a node redirects
//! it (`MOVED`) or a connection drops. A primary cut off by the network does
//! neither: calls to it just time out. In `make chaos` (primary-cut) every
//! node kept sending the cut primary's slots to it for the whole 10 s cut,
//! answering 503 for a third of the user agents, although a replica had
//! taken over within about 3 s. A fresh connection discovers the cluster
//! anew, asking several nodes for the slot map, and finds the new primary.

use super::{open_cluster, Conn, CONNECT_BUDGET};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

/// How often timeouts are looked at.
const CHECK: Duration = Duration::from_secs(1);
/// At most one replacement this often: discovery itself waits for an
/// unreachable node's connection timeout, and until the failover is done a
/// fresh connection still names the old primary.
const SPACING: Duration = Duration::from_secs(4);

pub(super) struct Current {
    conn: RwLock<Conn>,
    seeds: Vec<String>,
    timeouts: AtomicU64,
}

impl Current {
    pub(super) fn new(conn: Conn, seeds: Vec<String>) -> Arc<Self> {
        let current = Arc::new(Current {
            conn: RwLock::new(conn),
            seeds,
            timeouts: AtomicU64::new(0),
        });
        if current.is_cluster() {
            tokio::spawn(renew_loop(Arc::downgrade(&current)));
        }
        current
    }

    pub(super) fn get(&self) -> Conn {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn is_cluster(&self) -> bool {
        let conn = self.conn.read().unwrap_or_else(|p| p.into_inner());
        matches!(*conn, Conn::Cluster(_))
    }

    /// A call on this connection got no answer in time.
    pub(super) fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    fn replace(&self, conn: Conn) {
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = conn;
    }
}

/// Replaces the connection after calls timed out, while the store lives.
async fn renew_loop(current: Weak<Current>) {
    let mut seen = 0;
    loop {
        tokio::time::sleep(CHECK).await;
        let Some(c) = current.upgrade() else {
            return;
        };
        let n = c.timeouts.load(Ordering::Relaxed);
        if n == seen {
            continue;
        }
        seen = n;
        match tokio::time::timeout(CONNECT_BUDGET, open_cluster(&c.seeds)).await {
            Ok(Ok(fresh)) => {
                c.replace(fresh);
                tracing::info!(
                    "redis: calls timed out; connected afresh to re-read the cluster's slot map"
                );
            }
            Ok(Err(e)) => tracing::warn!("redis: reconnecting after timeouts: {e}"),
            Err(_) => tracing::warn!("redis: reconnecting after timeouts: no answer in time"),
        }
        drop(c);
        tokio::time::sleep(SPACING.saturating_sub(CHECK)).await;
        if let Some(c) = current.upgrade() {
            seen = c.timeouts.load(Ordering::Relaxed).max(seen);
        }
    }
}
