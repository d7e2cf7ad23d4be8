//! The bridges this node has, by upstream and app: what a bridged user
//! agent's `{type}` and `{app_id}` name. Empty when none are configured, and
//! then every bridged user agent is unreachable from this node.

use super::apns::ApnsBridge;
use super::fcm::FcmBridge;
use super::Bridge;
use crate::config::BridgeSettings;
use crate::metrics::Metrics;
use crate::store::BridgeKind;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Default, Clone)]
pub struct Bridges {
    /// By kind, then app id: a push looks one up by `&str`, no key built.
    by_kind: HashMap<BridgeKind, HashMap<String, Arc<dyn Bridge>>>,
}

impl Bridges {
    /// Each bridge under its own kind and app id; of two for the same pair
    /// (which the settings' tables cannot express) the last one counts.
    pub fn new(bridges: Vec<Arc<dyn Bridge>>) -> Self {
        let mut by_kind: HashMap<BridgeKind, HashMap<String, Arc<dyn Bridge>>> = HashMap::new();
        for b in bridges {
            by_kind
                .entry(b.kind())
                .or_default()
                .insert(b.app_id().to_string(), b);
        }
        Bridges { by_kind }
    }

    /// Every bridge the `[bridges]` tables configure. Reads and checks each
    /// credentials file now, so a bad one stops Herald at start instead of
    /// failing every push later.
    pub fn from_settings(
        settings: &BridgeSettings,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let mut bridges: Vec<Arc<dyn Bridge>> = Vec::new();
        for s in &settings.fcm {
            bridges.push(Arc::new(FcmBridge::new(s, metrics.clone())?));
        }
        for s in &settings.apns {
            bridges.push(Arc::new(ApnsBridge::new(s, metrics.clone())?));
        }
        Ok(Self::new(bridges))
    }

    pub fn get(&self, kind: BridgeKind, app_id: &str) -> Option<&Arc<dyn Bridge>> {
        self.by_kind.get(&kind)?.get(app_id)
    }

    pub fn is_empty(&self) -> bool {
        self.by_kind.values().all(HashMap::is_empty)
    }

    pub fn len(&self) -> usize {
        self.by_kind.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::Delivery;
    use crate::store::{BridgeRoute, Message};

    struct Named(BridgeKind, &'static str);

    #[async_trait::async_trait]
    impl Bridge for Named {
        fn kind(&self) -> BridgeKind {
            self.0
        }
        fn app_id(&self) -> &str {
            self.1
        }
        fn fits(&self, _: &Message) -> bool {
            true
        }
        async fn send(&self, _: &BridgeRoute, _: &Message, _: u64) -> Delivery {
            Delivery::Accepted
        }
    }

    #[test]
    fn bridges_are_found_by_kind_and_app_only() {
        let none = Bridges::default();
        assert!(none.is_empty());
        assert!(none.get(BridgeKind::Fcm, "a").is_none());
        let b = Bridges::new(vec![
            Arc::new(Named(BridgeKind::Fcm, "a")),
            Arc::new(Named(BridgeKind::Apns, "a")),
        ]);
        assert_eq!(b.len(), 2);
        assert_eq!(b.get(BridgeKind::Fcm, "a").unwrap().kind(), BridgeKind::Fcm);
        assert_eq!(
            b.get(BridgeKind::Apns, "a").unwrap().kind(),
            BridgeKind::Apns
        );
        assert!(b.get(BridgeKind::Fcm, "b").is_none());
    }
}
