//! The cluster directory on Redis: which node and connection serve each
//! user agent (`herald:o:{uaid}`, beside the user's other keys in its slot)
//! and where each live node is (`herald:node:<id>`, expiring with its
//! heartbeat).

use super::{Keys, RedisStore};
use crate::store::{Claim, Directory, Owner, SharedClock, StoreResult};
use herald_proto::ids::Uaid;
use redis::Script;
use std::sync::OnceLock;
use std::time::Duration;

/// Owner values are `node:conn:since`, all decimal. Node ids and connection
/// ids are compared as strings (they exceed a Lua number's exact range);
/// `since` is microseconds, exact below 2^53.
const CLAIM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local since = tonumber(string.match(cur, ':(%d+)$'))
  if since and since > tonumber(ARGV[2]) then
    return {0, cur}
  end
end
redis.call('SET', KEYS[1], ARGV[1])
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if cur then return {1, cur} end
return {1}
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

fn scripts() -> &'static (Script, Script) {
    static SCRIPTS: OnceLock<(Script, Script)> = OnceLock::new();
    SCRIPTS.get_or_init(|| (Script::new(CLAIM), Script::new(RELEASE)))
}

impl Keys {
    pub(super) fn owner(&self) -> String {
        format!("herald:o:{}", self.tag)
    }
}

fn node_key(node: u64) -> String {
    format!("herald:node:{node}")
}

fn encode_owner(o: &Owner) -> String {
    format!("{}:{}:{}", o.node, o.conn, o.since)
}

pub(super) fn decode_owner(v: &str) -> Option<Owner> {
    let mut parts = v.split(':').map(|p| p.parse::<u64>().ok());
    let owner = Owner {
        node: parts.next()??,
        conn: parts.next()??,
        since: parts.next()??,
    };
    parts.next().is_none().then_some(owner)
}

#[async_trait::async_trait]
impl Directory for RedisStore {
    async fn claim(&self, uaid: &Uaid, owner: &Owner) -> StoreResult<Claim> {
        let mut inv = scripts().0.prepare_invoke();
        inv.key(Keys::new(uaid).owner())
            .arg(encode_owner(owner))
            .arg(owner.since)
            .arg(self.ua_expiry_secs);
        let (won, other): (i64, Option<String>) = match self
            .eval::<Vec<redis::Value>>("claim", &inv)
            .await?
            .as_slice()
        {
            [won, rest @ ..] => (
                redis::from_redis_value_ref(won).unwrap_or(0),
                rest.first()
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok()),
            ),
            [] => (0, None),
        };
        let other = other.as_deref().and_then(decode_owner);
        Ok(match (won, other) {
            (1, replaced) => Claim::Won { replaced },
            (_, Some(newer)) => Claim::Lost { newer },
            // A malformed record lost to nothing: take it.
            (_, None) => Claim::Won { replaced: None },
        })
    }

    async fn release(&self, uaid: &Uaid, owner: &Owner) -> StoreResult<()> {
        let mut inv = scripts().1.prepare_invoke();
        inv.key(Keys::new(uaid).owner()).arg(encode_owner(owner));
        self.eval::<i64>("release", &inv).await.map(drop)
    }

    async fn owner(&self, uaid: &Uaid) -> StoreResult<Option<Owner>> {
        let v: Option<String> = self
            .query("owner", redis::cmd("GET").arg(Keys::new(uaid).owner()))
            .await?;
        Ok(v.as_deref().and_then(decode_owner))
    }

    async fn heartbeat(&self, node: u64, url: &str, ttl: Duration) -> StoreResult<()> {
        self.query::<()>(
            "heartbeat",
            redis::cmd("SET")
                .arg(node_key(node))
                .arg(url)
                .arg("PX")
                .arg(ttl.as_millis() as u64),
        )
        .await
    }

    async fn node_url(&self, node: u64) -> StoreResult<Option<String>> {
        self.query("node_url", redis::cmd("GET").arg(node_key(node)))
            .await
    }

    fn clock(&self) -> SharedClock {
        self.clock.clone()
    }
    async fn share_usage(
        &self,
        node: u64,
        usage: &[u8],
        cursor: Option<&str>,
    ) -> StoreResult<(String, Vec<Vec<u8>>)> {
        self.exchange_usage(node, usage, cursor).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_and_reject_garbage() {
        let o = Owner {
            node: u64::MAX >> 1,
            conn: 42,
            since: 1_700_000_000_000_000,
        };
        assert_eq!(decode_owner(&encode_owner(&o)), Some(o));
        for bad in ["", "1:2", "1:2:3:4", "a:2:3", "1:2:-3"] {
            assert_eq!(decode_owner(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_owner_key_shares_the_user_agents_slot() {
        // Redis hashes only what is inside the first `{…}`.
        let k = Keys::new(&Uaid::random());
        let tag = |key: &str| key[key.find('{').unwrap()..=key.find('}').unwrap()].to_string();
        assert_eq!(tag(&k.owner()), tag(&k.user()));
    }
}
