//! What the demo application server keeps between runs: its VAPID key and
//! the subscriptions browsers handed it.

use crate::appserver::VapidKey;
use anyhow::Context;
use herald_proto::subscription::Subscription;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const KEY_FILE: &str = "vapid.pem";
const SUBSCRIPTIONS_FILE: &str = "subscriptions.json";

/// Loads the demo's VAPID key from `dir`, creating it on first start. The
/// key must outlive restarts: browsers' subscriptions are bound to it.
pub fn load_or_create_key(dir: &Path) -> anyhow::Result<VapidKey> {
    let path = dir.join(KEY_FILE);
    if path.exists() {
        return VapidKey::from_file(&path);
    }
    let key = VapidKey::generate();
    crate::appserver::write_private_file(&path, key.to_pkcs8_pem()?.as_bytes(), false)?;
    Ok(key)
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    subscriptions: Vec<Subscription>,
}

/// The stored subscriptions, written through to a JSON file on every change.
pub struct Subscriptions {
    path: PathBuf,
    list: Vec<Subscription>,
}

impl Subscriptions {
    /// Reads `dir/subscriptions.json`; a missing file means none yet.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(SUBSCRIPTIONS_FILE);
        let list = match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str::<File>(&text)
                    .with_context(|| {
                        format!(
                            "{} is corrupt; delete it to start without subscriptions",
                            path.display()
                        )
                    })?
                    .subscriptions
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(Subscriptions { path, list })
    }

    pub fn list(&self) -> &[Subscription] {
        &self.list
    }

    /// Stores `sub`, replacing one with the same endpoint (a browser sends
    /// its subscription again on every page load). Returns whether it is new.
    pub fn add(&mut self, sub: Subscription) -> anyhow::Result<bool> {
        let new = match self.list.iter_mut().find(|s| s.endpoint == sub.endpoint) {
            Some(existing) => {
                *existing = sub;
                false
            }
            None => {
                self.list.push(sub);
                true
            }
        };
        self.save()?;
        Ok(new)
    }

    /// Forgets the subscription with this endpoint; returns whether it was known.
    pub fn remove(&mut self, endpoint: &str) -> anyhow::Result<bool> {
        let before = self.list.len();
        self.list.retain(|s| s.endpoint != endpoint);
        let removed = self.list.len() != before;
        if removed {
            self.save()?;
        }
        Ok(removed)
    }

    fn save(&self) -> anyhow::Result<()> {
        let file = File {
            subscriptions: self.list.clone(),
        };
        let text = serde_json::to_string_pretty(&file)?;
        // Write then rename, so a crash never leaves half a file behind.
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("cannot replace {}", self.path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(endpoint: &str, auth: &str) -> Subscription {
        Subscription {
            endpoint: endpoint.into(),
            keys: Some(herald_proto::subscription::SubscriptionKeys {
                p256dh: "p".into(),
                auth: auth.into(),
            }),
        }
    }

    #[test]
    fn subscriptions_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut subs = Subscriptions::load(dir.path()).unwrap();
        assert!(subs.add(sub("http://h/1", "a")).unwrap());
        assert!(subs.add(sub("http://h/2", "a")).unwrap());
        assert!(!subs.add(sub("http://h/1", "b")).unwrap());
        assert!(subs.remove("http://h/2").unwrap());
        assert!(!subs.remove("http://h/2").unwrap());

        let again = Subscriptions::load(dir.path()).unwrap();
        assert_eq!(again.list(), &[sub("http://h/1", "b")]);
    }

    #[test]
    fn corrupt_state_is_reported_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SUBSCRIPTIONS_FILE), "{nope").unwrap();
        let err = Subscriptions::load(dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("corrupt"));
    }

    #[test]
    fn key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_key(dir.path()).unwrap();
        let second = load_or_create_key(dir.path()).unwrap();
        assert_eq!(first.public_key_b64(), second.public_key_b64());
    }
}
