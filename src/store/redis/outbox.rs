//! The bridges' outbox on Redis (see `Store::outbox_add` for its
//! semantics).
//!
//! | key | type | content |
//! |---|---|---|
//! | `herald:ob` | sorted set | member = uaid (32 hex), score = when its next attempt is due (Unix ms) |
//!
//! The score is also the claim that keeps two nodes from sending the same
//! user agent's messages at once: `outbox_add` lists a user agent only if
//! it is absent (`ZADD NX`), and `outbox_take` moves every entry it returns
//! to the end of a lease in the same script, so a second node's sweep does
//! not see it as due until that lease runs out. It works as an expiring
//! lock per user agent (what `SET NX PX` on a key of its own would give)
//! without a second key to keep in step with the first. The sender extends
//! the lease before each message it sends; a node that dies mid-send lets
//! it run out, and another node takes over.
//!
//! `herald:ob` is one key, so in a cluster the outbox lives in one slot,
//! like the receipt sweep's index: it holds one member per bridged user
//! agent with messages in flight, not one per message.

use super::{lua_count, RedisStore};
use crate::store::{StoreError, StoreResult};
use herald_proto::ids::Uaid;
use redis::Script;
use std::sync::OnceLock;

const OUTBOX_KEY: &str = "herald:ob";

// KEYS: outbox. ARGV: now (ms), lease end (ms), limit.
const TAKE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
";

fn take_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(TAKE))
}

/// Scores are f64: exact for Unix milliseconds for the next 280,000 years.
fn score(ms: u64) -> u64 {
    ms.min(super::MAX_EXACT_SCORE)
}

impl RedisStore {
    pub(super) async fn outbox_add_impl(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<bool> {
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(OUTBOX_KEY)
            .arg("NX")
            .arg(score(due_ms))
            .arg(uaid.to_string());
        let added: i64 = self.query("outbox_add", &cmd).await?;
        Ok(added == 1)
    }

    pub(super) async fn outbox_set_impl(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<()> {
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(OUTBOX_KEY).arg(score(due_ms)).arg(uaid.to_string());
        let _: i64 = self.query("outbox_set", &cmd).await?;
        Ok(())
    }

    pub(super) async fn outbox_take_impl(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Uaid>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = take_script().prepare_invoke();
        inv.key(OUTBOX_KEY)
            .arg(score(now_ms))
            .arg(score(lease_until_ms))
            .arg(lua_count(limit));
        let members: Vec<String> = self.eval("outbox_take", &inv).await?;
        members
            .iter()
            .map(|m| {
                Uaid::parse(m).ok_or_else(|| {
                    StoreError::Corrupt(format!("redis outbox: member {m:?} is not a uaid"))
                })
            })
            .collect()
    }

    pub(super) async fn outbox_remove_impl(&self, uaid: &Uaid) -> StoreResult<()> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(OUTBOX_KEY).arg(uaid.to_string());
        let _: i64 = self.query("outbox_remove", &cmd).await?;
        Ok(())
    }

    pub(super) async fn outbox_due_impl(&self, uaid: &Uaid) -> StoreResult<Option<u64>> {
        let mut cmd = redis::cmd("ZSCORE");
        cmd.arg(OUTBOX_KEY).arg(uaid.to_string());
        let due: Option<f64> = self.query("outbox_due", &cmd).await?;
        Ok(due.map(|d| d as u64))
    }
}
