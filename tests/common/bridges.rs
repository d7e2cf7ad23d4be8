//! Herald with bridge tables, and phones registering through the mobile
//! registration API as Firefox for Android and iOS do. The upstreams are
//! whatever the test points the tables at (the loopback mocks in
//! tests/support); this module only knows the config file and the API.

use super::*;
use std::fmt::Write as _;

/// The key every bridged Herald of these helpers signs secrets with.
pub const BRIDGE_KEY: &str = "bridged-test-key-0123456789abcdef";
pub const REL_RECEIPT: &str = "urn:ietf:params:push:receipt";

/// `[bridges.fcm.<app>]` for a mock FCM.
pub fn fcm_table(app: &str, project_id: &str, credentials: &Path, base_url: &str) -> String {
    format!(
        "[bridges.fcm.{app}]\nproject_id = \"{project_id}\"\ncredentials = \"{}\"\nbase_url = \"{base_url}\"\n",
        credentials.display()
    )
}

/// `[bridges.apns.<app>]` with provider-token auth, trusting `ca`.
pub struct ApnsTable<'a> {
    pub app: &'a str,
    pub topic: &'a str,
    pub team_id: &'a str,
    pub key_id: &'a str,
    pub key: &'a Path,
    pub base_url: &'a str,
    pub ca: &'a Path,
}

impl ApnsTable<'_> {
    pub fn toml(&self) -> String {
        let mut t = String::new();
        let _ = write!(
            t,
            "[bridges.apns.{}]\ntopic = \"{}\"\nsandbox = false\nteam_id = \"{}\"\nkey_id = \"{}\"\nkey = \"{}\"\nbase_url = \"{}\"\nca = \"{}\"\n",
            self.app,
            self.topic,
            self.team_id,
            self.key_id,
            self.key.display(),
            self.base_url,
            self.ca.display()
        );
        t
    }
}

/// A Herald started from a config file holding `bridge_auth_keys` and the
/// given tables; the file lives as long as this, so restarts reuse it.
pub struct Bridged {
    pub h: Herald,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bridged {
    /// `tables`: `[bridges.*]` tables (`fcm_table`, `ApnsTable::toml`);
    /// `args` and `env` as for [`Herald::start_with`].
    pub async fn start(tables: &[String], args: &[&str], env: &[(&str, &str)]) -> Bridged {
        let dir = tempfile::tempdir().unwrap();
        let config = write_bridge_config(dir.path(), tables);
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        let h = Herald::start_with(&all, env).await;
        Bridged {
            h,
            config,
            _dir: dir,
        }
    }
}

/// Writes `herald.toml` into `dir`: the bridge key, then `tables`.
pub fn write_bridge_config(dir: &Path, tables: &[String]) -> PathBuf {
    let file = dir.join("herald.toml");
    let mut text = format!("bridge_auth_keys = [\"{BRIDGE_KEY}\"]\n");
    for t in tables {
        text.push_str(t);
    }
    std::fs::write(&file, text).unwrap();
    file
}

/// A phone registered through `POST /v1/{kind}/{app}/registration`: its
/// answer, and the subscription keys its browser hands to the site (they
/// never reach Herald; the payload is decrypted with them).
pub struct Phone {
    pub kind: String,
    pub app: String,
    pub uaid: String,
    pub channel: String,
    pub endpoint: String,
    pub secret: String,
    pub keys: UaKeys,
}

impl Phone {
    /// Registers as Firefox does: `{"token", "key"}` (the site's VAPID key,
    /// binding the endpoint, when `app_server` is given).
    pub async fn register(
        h: &Herald,
        kind: &str,
        app: &str,
        token: &str,
        app_server: Option<&AppServer>,
    ) -> Phone {
        let key = app_server.map(|a| Value::String(a.public()));
        let body = json!({"token": token, "key": key});
        let r = http(
            h,
            "POST",
            &format!("/v1/{kind}/{app}/registration"),
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        let field = |f: &str| {
            v[f].as_str()
                .unwrap_or_else(|| panic!("{f} in {v}"))
                .to_string()
        };
        Phone {
            kind: kind.into(),
            app: app.into(),
            uaid: field("uaid"),
            channel: field("channelID"),
            endpoint: field("endpoint"),
            secret: field("secret"),
            keys: UaKeys::new(),
        }
    }

    /// `GET …/registration/{uaid}` with the phone's secret.
    pub async fn get_registration(&self, h: &Herald) -> Resp {
        let path = format!("/v1/{}/{}/registration/{}", self.kind, self.app, self.uaid);
        let auth = format!("webpush {}", self.secret);
        http(h, "GET", &path, &[("authorization", &auth)], vec![])
            .await
            .unwrap()
    }
}

/// The receipt subscription named by a 202's `Link`.
pub fn receipt_url(r: &Resp) -> String {
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let link = r.header("link").expect("a Link header");
    assert!(link.contains(&format!("rel=\"{REL_RECEIPT}\"")), "{link}");
    link[link.find('<').unwrap() + 1..link.find('>').unwrap()].to_string()
}

/// The receipts at `url` once there are `n` (polled as a `Prefer: wait=0`
/// batch), within `within`.
pub async fn receipts(url: &str, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let r = request("GET", url, &[("prefer", "wait=0")], vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let b = r.json();
        let got = b["receipts"].as_array().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} receipts of {n}: {b}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of every sample of metric `name` whose labels include all of
/// `labels` (`app="fenix"` …), whatever their order.
pub async fn metric_sum(h: &Herald, name: &str, labels: &[&str]) -> f64 {
    let text = metrics_text(h).await;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `f` every 50 ms until it returns Some, for at most `within`.
pub async fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
