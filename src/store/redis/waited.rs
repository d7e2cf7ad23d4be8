//! Writes under `redis_wait_replicas` (messages, registrations, the receipt
//! ledger's promises): the script and its `WAIT` sent together, on a
//! connection of their own.
//!
//! Why not `WAIT` after the script on the shared connection, as before:
//! - `WAIT` counts the replicas that have *this client's* writes, on the
//!   node it reaches. The shared cluster connection retries a command whose
//!   connection dropped by routing it again, and after a failover the slot
//!   has a new primary: a `WAIT` retried there confirmed a write it never
//!   saw, while the write itself sat on the demoted primary, which discarded
//!   it when it rejoined as a replica. `make chaos` lost 3 accepted
//!   messages so with `redis_wait_replicas = 1` (primary-cut-wait1).
//! - A client blocked in `WAIT` holds up every later command on its
//!   connection, and every command of the node goes to one Redis node over
//!   one multiplexed connection. While a primary's replicas were cut off,
//!   each push to it held that connection for `redis_wait_timeout`, and
//!   reads, acks and node look-ups of every user agent on that primary
//!   timed out behind it.
//!
//! So the script and `WAIT` go out as one pipeline, routed to the slot's
//! primary, on a connection that carries nothing else and never retries:
//! both reach the same node over the same connection or the push fails
//! with 503, which an application server retries.

use super::{error, open_cluster_with, open_standalone, redis_err, Conn, OP_TIMEOUT};
use crate::store::{StoreError, StoreResult};
use redis::aio::ConnectionLike;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{FromRedisValue, Pipeline, RedisError, Script, ScriptInvocation, Value};
use std::time::Duration;
use tokio::sync::Mutex;

/// The connection of waited writes, opened at the first one, and again
/// after one timed out (on a cluster, a fresh connection re-reads the slot
/// map: see renew.rs).
pub(super) struct Lane {
    seeds: Vec<String>,
    cluster: bool,
    conn: Mutex<Option<Conn>>,
}

impl Lane {
    pub(super) fn new(seeds: Vec<String>, cluster: bool) -> Self {
        Lane {
            seeds,
            cluster,
            conn: Mutex::new(None),
        }
    }

    async fn conn(&self) -> StoreResult<Conn> {
        let mut held = self.conn.lock().await;
        if let Some(c) = &*held {
            return Ok(c.clone());
        }
        let fresh = tokio::time::timeout(OP_TIMEOUT, open(&self.seeds, self.cluster))
            .await
            .map_err(|_| error::timed_out("connect for waited writes", OP_TIMEOUT))??;
        *held = Some(fresh.clone());
        Ok(fresh)
    }

    /// Forgets the connection after a timeout: the next write opens one.
    async fn drop_conn(&self) {
        if self.cluster {
            *self.conn.lock().await = None;
        }
    }

    /// Runs `invocation` of `script` (`what`, for errors; its keys are in
    /// one slot, that of `slot_key`), then `WAIT replicas timeout`, on one
    /// node. Returns the script's answer and how many replicas confirmed it.
    pub(super) async fn eval_and_wait<T: FromRedisValue>(
        &self,
        what: &str,
        script: &Script,
        invocation: &ScriptInvocation<'_>,
        slot_key: &str,
        (replicas, timeout): (u32, Duration),
    ) -> StoreResult<(T, i64)> {
        let mut conn = self.conn().await?;
        let budget = timeout + OP_TIMEOUT;
        let mut pipe = redis::pipe();
        pipe.invoke_script(invocation)
            .cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis() as u64);
        let what = format!("{what} and WAIT");
        let mut answers = self.send(&what, &mut conn, &pipe, slot_key, budget).await?;
        if is_noscript(&answers[0]) {
            // The node never saw the script (a new primary, a restarted
            // one): load it in the same pipeline and run it again.
            let mut pipe = redis::pipe();
            pipe.load_script(script)
                .invoke_script(invocation)
                .cmd("WAIT")
                .arg(replicas)
                .arg(timeout.as_millis() as u64);
            answers = self.send(&what, &mut conn, &pipe, slot_key, budget).await?;
            answers.remove(0);
        }
        let mut answers = answers.into_iter();
        let reply = answer::<T>(&what, answers.next())?;
        let confirmed = answer::<i64>(&what, answers.next())?;
        Ok((reply, confirmed))
    }

    async fn send(
        &self,
        what: &str,
        conn: &mut Conn,
        pipe: &Pipeline,
        slot_key: &str,
        budget: Duration,
    ) -> StoreResult<Vec<Value>> {
        let count = pipe.cmd_iter().count();
        let sent = async {
            match conn {
                Conn::Standalone(c) => c.req_packed_commands(pipe, 0, count).await,
                Conn::Cluster(c) => {
                    let route = Route::with_key(slot_key, SlotAddr::Master);
                    let to = SingleNodeRoutingInfo::SpecificNode(route);
                    c.route_pipeline(pipe.clone(), 0, count, to).await
                }
            }
        };
        let answers = match tokio::time::timeout(budget, sent).await {
            Ok(Ok(answers)) => answers,
            Ok(Err(e)) => {
                if e.is_timeout() {
                    self.drop_conn().await;
                }
                return Err(redis_err(what, e));
            }
            Err(_) => {
                self.drop_conn().await;
                return Err(error::timed_out(what, budget));
            }
        };
        if answers.len() != count {
            return Err(StoreError::Corrupt(format!(
                "redis {what}: {} answers to {count} commands",
                answers.len()
            )));
        }
        Ok(answers)
    }
}

async fn open(seeds: &[String], cluster: bool) -> StoreResult<Conn> {
    if cluster {
        // No retries: a retry is routed afresh and could reach another node
        // than the first attempt's (see the module documentation). No
        // overall limit either: `WAIT` may take `redis_wait_timeout`, and the
        // caller bounds the whole.
        open_cluster_with(seeds, 0, None).await
    } else {
        open_standalone(&seeds[0]).await
    }
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript))
}

fn answer<T: FromRedisValue>(what: &str, v: Option<Value>) -> StoreResult<T> {
    let v = v.ok_or_else(|| StoreError::Corrupt(format!("redis {what}: no answer")))?;
    if let Value::ServerError(e) = v {
        return Err(redis_err(what, RedisError::from(e)));
    }
    T::from_redis_value(v).map_err(|e| redis_err(what, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as Redis sends it.
    fn reply(wire: &str) -> Value {
        redis::parse_redis_value(wire.as_bytes()).unwrap()
    }

    #[test]
    fn noscript_is_told_apart_from_other_refusals() {
        assert!(is_noscript(&reply("-NOSCRIPT No matching script.\r\n")));
        assert!(!is_noscript(&reply("-ERR unknown command\r\n")));
        assert!(!is_noscript(&reply(":1\r\n")));
    }

    #[test]
    fn a_refused_command_is_an_error_not_a_count() {
        let refused = reply("-READONLY You can't write against a read only replica.\r\n");
        assert!(answer::<i64>("WAIT", Some(refused)).is_err());
        assert!(answer::<i64>("WAIT", None).is_err());
        assert_eq!(answer::<i64>("WAIT", Some(Value::Int(1))).unwrap(), 1);
    }
}
