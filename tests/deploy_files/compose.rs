//! `deploy/docker-compose.cluster.yml`: several nodes on a Redis Cluster.

use crate::nginx::{nginx_listen_ports, nginx_upstream_servers, parse_nginx};
use crate::shared::*;

// ---------------------------------------------------------------------------
// Docker Compose: several nodes on a Redis Cluster
// ---------------------------------------------------------------------------

/// Compose's interpolation of `$$`, `${NAME:-default}`, `${NAME-default}`,
/// `${NAME:?message}`, `${NAME}` and `$NAME`, with every variable unset (as
/// on a machine with no .env): defaults apply, a required one becomes
/// `<NAME>` and is recorded in `required`.
pub(crate) fn compose_interpolate(s: &str, required: &mut BTreeSet<String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').unwrap_or(r.len());
            let inner = &r[..end];
            let name_end = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            let (name, op) = inner.split_at(name_end);
            if let Some(default) = op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
                out.push_str(default);
            } else if op.starts_with(":?") || op.starts_with('?') {
                required.insert(name.to_string());
                out.push_str(&format!("<{name}>"));
            }
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let name_end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            rest = &after[name_end..];
        }
    }
    out.push_str(rest);
    out
}

/// A Compose file's value with every string interpolated.
pub(crate) fn compose_interpolate_all(v: &Yaml, required: &mut BTreeSet<String>) -> Yaml {
    match v {
        Yaml::String(s) => Yaml::String(compose_interpolate(s, required)),
        Yaml::Sequence(items) => Yaml::Sequence(
            items
                .iter()
                .map(|i| compose_interpolate_all(i, required))
                .collect(),
        ),
        Yaml::Mapping(m) => Yaml::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), compose_interpolate_all(v, required)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A service's command as words (list form, or a string split on spaces).
pub(crate) fn compose_words(v: &Yaml) -> Vec<String> {
    match v {
        Yaml::String(s) => s.split_whitespace().map(String::from).collect(),
        _ => seq(v)
            .iter()
            .map(|w| match w {
                Yaml::String(s) => s.clone(),
                Yaml::Number(n) => n.to_string(),
                Yaml::Bool(b) => b.to_string(),
                _ => String::new(),
            })
            .collect(),
    }
}

/// A service's environment as name → value (map or `NAME=value` list).
pub(crate) fn compose_env(service: &Yaml) -> BTreeMap<String, String> {
    let env = &service["environment"];
    if let Some(list) = env.as_sequence() {
        return list
            .iter()
            .filter_map(|e| e.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    env.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Yaml::String(s) => s.clone(),
                        Yaml::Number(n) => n.to_string(),
                        Yaml::Bool(b) => b.to_string(),
                        _ => String::new(),
                    };
                    (k.as_str().unwrap_or("").to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Compose duration ("30s", "1m30s", "500ms") in seconds.
pub(crate) fn compose_secs(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        let unit_end = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .map_or(rest.len(), |i| digits + i);
        total += n * match &rest[digits..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        rest = &rest[unit_end..];
    }
    Some(total)
}

pub(crate) fn ipv4(s: &str) -> Option<u32> {
    s.parse::<std::net::Ipv4Addr>().ok().map(u32::from)
}

/// Whether `addr` is inside `cidr` ("a.b.c.d/n").
pub(crate) fn in_cidr(addr: u32, cidr: &str) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else {
        return false;
    };
    let (Some(net), Ok(bits)) = (ipv4(net), bits.parse::<u32>()) else {
        return false;
    };
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits.min(32))
    };
    addr & mask == net & mask
}

/// The value after `flag` in a word list.
pub(crate) fn word_after<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words
        .windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

/// The Compose file as the checks read it: the YAML with merge keys
/// applied (`raw`), the same with every variable interpolated as on a
/// machine with no .env (`doc`), and the variables it requires.
pub(crate) struct Compose {
    raw: Yaml,
    doc: Yaml,
    required: BTreeSet<String>,
}

pub(crate) fn load_compose(p: &mut Problems) -> Compose {
    let text = read("docker-compose.cluster.yml");
    let mut raw: Yaml = match serde_yaml_ng::from_str(&text) {
        Ok(v) => v,
        Err(e) => panic!("deploy/docker-compose.cluster.yml is not valid YAML: {e}"),
    };
    if let Err(e) = raw.apply_merge() {
        p.add(format!("YAML merge keys (<<): {e}"));
    }
    let mut required = BTreeSet::new();
    let doc = compose_interpolate_all(&raw, &mut required);
    Compose { raw, doc, required }
}

type Services<'a> = Vec<(&'a str, &'a Yaml)>;

impl Compose {
    fn services(&self) -> Services<'_> {
        self.doc["services"]
            .as_mapping()
            .map(|m| {
                m.iter()
                    .map(|(k, s)| (k.as_str().unwrap_or(""), s))
                    .collect()
            })
            .unwrap_or_default()
    }
    fn services_where(&self, keep: impl Fn(&Yaml) -> bool) -> Services<'_> {
        self.services()
            .into_iter()
            .filter(|(_, s)| keep(s))
            .collect()
    }
    /// The six Redis Cluster nodes.
    fn redis_nodes(&self) -> Services<'_> {
        self.services_where(|s| {
            image_of(s).starts_with("redis:")
                && compose_words(&s["command"])
                    .first()
                    .is_some_and(|c| c == "redis-server")
        })
    }
    /// `service:port` of every Redis node.
    fn redis_addrs(&self) -> BTreeSet<String> {
        self.redis_nodes()
            .iter()
            .map(|(name, svc)| {
                let words = compose_words(&svc["command"]);
                format!("{name}:{}", word_after(&words, "--port").unwrap_or("6379"))
            })
            .collect()
    }
    /// The one-shot running `redis-cli --cluster create`.
    fn init(&self) -> Services<'_> {
        self.services_where(|s| {
            compose_words(&s["command"])
                .join(" ")
                .contains("--cluster create")
        })
    }
    fn herald_nodes(&self) -> Services<'_> {
        self.services_where(|s| {
            s["build"]["dockerfile"].as_str() == Some("deploy/Dockerfile")
                || image_of(s).starts_with("herald")
        })
    }
}

pub(crate) fn image_of(svc: &Yaml) -> String {
    svc["image"].as_str().unwrap_or("").to_string()
}

/// A service's depends_on as service → condition.
pub(crate) fn depends(svc: &Yaml) -> BTreeMap<String, String> {
    match &svc["depends_on"] {
        Yaml::Sequence(list) => list
            .iter()
            .filter_map(|d| d.as_str())
            .map(|d| (d.to_string(), "service_started".to_string()))
            .collect(),
        Yaml::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap_or("").to_string(),
                    v["condition"]
                        .as_str()
                        .unwrap_or("service_started")
                        .to_string(),
                )
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

#[test]
fn docker_compose_file_has_known_keys_and_its_references_resolve() {
    let mut p = Problems::new("docker-compose.cluster.yml");
    check_yaml11_booleans(
        "docker-compose.cluster.yml",
        &read("docker-compose.cluster.yml"),
        &mut p,
    );
    let compose = load_compose(&mut p);
    let (raw, doc) = (&compose.raw, &compose.doc);
    // Top-level keys Compose knows (x-* are extensions).
    if let Some(m) = raw.as_mapping() {
        for k in m.keys().filter_map(|k| k.as_str()) {
            p.check(
                k.starts_with("x-")
                    || [
                        "name", "services", "networks", "volumes", "secrets", "configs",
                    ]
                    .contains(&k),
                format!("unknown top-level key {k:?}"),
            );
        }
    }
    let services = compose.services();
    p.check(!services.is_empty(), "no services");
    let service_names: BTreeSet<&str> = services.iter().map(|(k, _)| *k).collect();
    let declared_volumes: BTreeSet<&str> = doc["volumes"]
        .as_mapping()
        .map(|m| m.keys().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    let declared_networks: BTreeSet<&str> = doc["networks"]
        .as_mapping()
        .map(|m| m.keys().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    // References between services, volumes and networks resolve.
    for (name, svc) in &services {
        for dep in depends(svc).keys() {
            p.check(
                service_names.contains(dep.as_str()),
                format!("{name}: depends_on {dep}, which is not a service"),
            );
        }
        for v in seq(&svc["volumes"]) {
            let source = v.as_str().and_then(|s| s.split(':').next()).unwrap_or("");
            if source.starts_with("./") || source.starts_with("../") {
                p.check(
                    deploy_dir().join(source).exists(),
                    format!(
                        "{name}: mounts {source}, which does not exist next to the Compose file"
                    ),
                );
            } else if !source.starts_with('/') {
                p.check(
                    declared_volumes.contains(source),
                    format!("{name}: volume {source} is not declared under volumes"),
                );
            }
        }
        let networks: Vec<&str> = match &svc["networks"] {
            Yaml::Sequence(l) => l.iter().filter_map(|n| n.as_str()).collect(),
            Yaml::Mapping(m) => m.keys().filter_map(|n| n.as_str()).collect(),
            _ => Vec::new(),
        };
        for n in networks {
            p.check(
                declared_networks.contains(n),
                format!("{name}: network {n} is not declared under networks"),
            );
        }
    }

    p.finish();
}

/// The Redis Cluster: six nodes, as deploy/README.md recommends, each
/// persistent, at a fixed address the cluster remembers it by.
#[test]
fn docker_compose_redis_cluster_is_six_persistent_nodes_at_fixed_addresses() {
    let mut p = Problems::new("docker-compose.cluster.yml");
    let compose = load_compose(&mut p);
    let doc = &compose.doc;
    let redis_nodes = compose.redis_nodes();
    p.check(
        redis_nodes.len() == 6,
        format!(
            "{} Redis nodes: want 6 (3 primaries, 3 replicas)",
            redis_nodes.len()
        ),
    );
    let subnet_cfg = doc["networks"].as_mapping().and_then(|m| {
        m.values()
            .find_map(|n| seq(&n["ipam"]["config"]).first().cloned())
    });
    let subnet = subnet_cfg
        .as_ref()
        .and_then(|c| c["subnet"].as_str())
        .map(String::from);
    let ip_range = subnet_cfg
        .as_ref()
        .and_then(|c| c["ip_range"].as_str())
        .map(String::from);
    let mut fixed = BTreeSet::new();
    for (name, svc) in &redis_nodes {
        p.check(
            image_of(svc).starts_with("redis:7"),
            format!(
                "{name}: image {} is not redis:7 (Herald needs Redis 7 or later)",
                image_of(svc)
            ),
        );
        let words = compose_words(&svc["command"]);
        for (flag, want) in [
            ("--cluster-enabled", "yes"),
            ("--appendonly", "yes"),
            ("--appendfsync", "everysec"),
            ("--maxmemory-policy", "noeviction"),
            ("--cluster-require-full-coverage", "no"),
        ] {
            p.check(
                word_after(&words, flag) == Some(want),
                format!("{name}: {flag} {want} is missing from its command"),
            );
        }
        p.check(
            word_after(&words, "--cluster-config-file").is_some(),
            format!("{name}: no --cluster-config-file"),
        );
        p.check(
            word_after(&words, "--maxmemory").is_some(),
            format!("{name}: no --maxmemory (noeviction needs a limit to act on)"),
        );
        let timeout =
            word_after(&words, "--cluster-node-timeout").and_then(|t| t.parse::<u64>().ok());
        p.check(
            timeout.is_some_and(|t| (1000..=15000).contains(&t)),
            format!("{name}: --cluster-node-timeout {timeout:?} ms: set it, between 1000 and Redis's default 15000"),
        );
        p.check(
            seq(&svc["volumes"])
                .iter()
                .any(|v| v.as_str().is_some_and(|s| s.ends_with(":/data"))),
            format!("{name}: no volume at /data: the AOF and nodes.conf would not survive the container"),
        );
        p.check(
            !svc["healthcheck"]["test"].is_null(),
            format!("{name}: no healthcheck (the init service waits for it)"),
        );
        // A fixed address inside the network, outside the dynamic range.
        let addr = svc["networks"]
            .as_mapping()
            .and_then(|m| m.values().find_map(|n| n["ipv4_address"].as_str()))
            .and_then(ipv4);
        match (addr, &subnet) {
            (Some(a), Some(net)) => {
                p.check(in_cidr(a, net), format!("{name}: ipv4_address outside the subnet {net}"));
                p.check(
                    !ip_range.as_deref().is_some_and(|r| in_cidr(a, r)),
                    format!("{name}: ipv4_address inside ip_range, where Docker may give it to another container"),
                );
                p.check(fixed.insert(a), format!("{name}: ipv4_address used twice"));
            }
            _ => p.add(format!(
                "{name}: no fixed ipv4_address in a network with an ipam subnet (the cluster remembers its peers by address)"
            )),
        }
    }

    p.finish();
}

#[test]
fn docker_compose_init_creates_the_cluster_from_every_redis_node() {
    let mut p = Problems::new("docker-compose.cluster.yml");
    let compose = load_compose(&mut p);
    let init = compose.init();
    let redis_nodes = compose.redis_nodes();
    let redis_addrs = compose.redis_addrs();
    p.check(
        init.len() == 1,
        "no one-shot service running `redis-cli --cluster create`",
    );
    if let Some((name, svc)) = init.first() {
        p.check(
            image_of(svc).starts_with("redis:7"),
            format!("{name}: image {} is not redis:7", image_of(svc)),
        );
        p.check(
            svc["restart"].is_null() || svc["restart"].as_str() == Some("no"),
            format!("{name}: a one-shot must not restart"),
        );
        let script = compose_words(&svc["command"]).join("\n");
        // Shell variables assigned in the script (name="value"), expanded in
        // the create command.
        let mut vars = BTreeMap::new();
        for line in script.lines() {
            if let Some((k, v)) = line.trim().split_once("=\"") {
                if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    vars.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
            }
        }
        let create = script
            .lines()
            .find(|l| l.contains("--cluster create"))
            .unwrap_or("");
        let mut words: Vec<String> = Vec::new();
        for w in create.split_whitespace() {
            match w
                .strip_prefix('$')
                .map(|v| v.trim_matches(|c| c == '{' || c == '}'))
            {
                Some(var) => words.extend(
                    vars.get(var)
                        .map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
                        .unwrap_or_default(),
                ),
                None => words.push(w.to_string()),
            }
        }
        let listed: BTreeSet<String> = words
            .iter()
            .filter(|w| w.contains(':') && !w.starts_with('-'))
            .cloned()
            .collect();
        p.check(
            listed == redis_addrs,
            format!(
                "{name}: --cluster create lists {listed:?}, the Redis nodes are {redis_addrs:?}"
            ),
        );
        p.check(
            word_after(&words, "--cluster-replicas") == Some("1"),
            format!("{name}: --cluster-replicas 1 is missing"),
        );
        p.check(
            words.iter().any(|w| w == "--cluster-yes"),
            format!("{name}: --cluster-yes is missing (it would wait for a \"yes\")"),
        );
        let deps = depends(svc);
        for (node, _) in &redis_nodes {
            p.check(
                deps.get(*node).map(String::as_str) == Some("service_healthy"),
                format!("{name}: does not wait for {node} to be healthy"),
            );
        }
    }

    p.finish();
}

#[test]
fn docker_compose_herald_nodes_share_one_store_and_one_key() {
    let mut p = Problems::new("docker-compose.cluster.yml");
    let compose = load_compose(&mut p);
    let herald_nodes = compose.herald_nodes();
    p.check(
        herald_nodes.len() == 3,
        format!("{} Herald nodes: want 3", herald_nodes.len()),
    );
    let init_name = compose
        .init()
        .first()
        .map(|(n, _)| n.to_string())
        .unwrap_or_default();
    let redis_addrs = compose.redis_addrs();
    let mut shared: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut node_urls = BTreeSet::new();
    for (name, svc) in &herald_nodes {
        let raw_env = compose_env(&compose.raw["services"][*name]);
        for k in [
            "HERALD_REDIS_URL",
            "HERALD_ENDPOINT_KEYS",
            "HERALD_PUBLIC_URL",
        ] {
            match raw_env.get(k) {
                Some(v) => {
                    shared.entry(k).or_default().insert(v.clone());
                }
                None => p.add(format!("{name}: {k} is not set")),
            }
        }
        let node_url = compose_env(svc)
            .get("HERALD_NODE_URL")
            .cloned()
            .unwrap_or_default();
        p.check(
            node_urls.insert(node_url),
            format!("{name}: HERALD_NODE_URL shared with another node"),
        );
        check_herald_node(name, svc, &raw_env, &redis_addrs, &init_name, &mut p);
    }
    for (k, values) in &shared {
        p.check(
            values.len() == 1,
            format!("{k} differs between the Herald nodes: {values:?}"),
        );
    }
    p.check(
        compose.required.contains("HERALD_ENDPOINT_KEYS"),
        "HERALD_ENDPOINT_KEYS is not a required variable",
    );

    p.finish();
}

/// One Herald node: built from this repository, `serve` on the HTTP port,
/// its settings valid, its Redis URL naming the cluster, its node_url its
/// own, started after the cluster exists, and stopped gracefully.
fn check_herald_node(
    name: &str,
    svc: &Yaml,
    raw_env: &BTreeMap<String, String>,
    redis_addrs: &BTreeSet<String>,
    init_name: &str,
    p: &mut Problems,
) {
    if let Some(build) = svc["build"].as_mapping() {
        let context = build.get("context").and_then(|c| c.as_str()).unwrap_or(".");
        p.check(
            deploy_dir().join(context).join("Cargo.toml").exists()
                && deploy_dir()
                    .join(context)
                    .join(svc["build"]["dockerfile"].as_str().unwrap_or(""))
                    .exists(),
            format!(
                "{name}: build context {context} is not the repository root with deploy/Dockerfile"
            ),
        );
    }
    let words = compose_words(&svc["command"]);
    p.check(
        words.first().is_some_and(|w| w == "serve"),
        format!("{name}: command {words:?} must be `serve ...`"),
    );
    let listen = word_after(&words, "--listen").unwrap_or("");
    p.check(
        port_of(listen) == Some(HTTP_PORT) && listen.starts_with("0.0.0.0:"),
        format!("{name}: --listen {listen:?}: want 0.0.0.0:{HTTP_PORT}"),
    );
    let env = compose_env(svc);
    for (k, v) in &env {
        if k.starts_with("HERALD_") && !v.starts_with('<') {
            if let Err(e) = check_env_setting(k, v) {
                p.add(format!("{name}: {e}"));
            }
        } else if k.starts_with("HERALD_") {
            p.check(
                setting_of_env(k).is_some(),
                format!("{name}: {k} is not a Herald setting"),
            );
        }
    }
    p.check(
        env.get("HERALD_STORE").map(String::as_str) == Some("redis"),
        format!("{name}: HERALD_STORE must be redis"),
    );
    // The endpoint key: a reference to a required variable, never a
    // literal key in the file.
    let keys = raw_env
        .get("HERALD_ENDPOINT_KEYS")
        .cloned()
        .unwrap_or_default();
    p.check(
        keys.starts_with("${") && keys.contains(":?"),
        format!("{name}: HERALD_ENDPOINT_KEYS {keys:?} must be a required variable (${{HERALD_ENDPOINT_KEYS:?...}}), not a key written in the file"),
    );
    // The Redis URL names the cluster's nodes.
    let urls: BTreeSet<String> = env
        .get("HERALD_REDIS_URL")
        .map(|u| {
            u.split(',')
                .filter_map(|u| redis_host_port(u.trim()))
                .collect()
        })
        .unwrap_or_default();
    p.check(
        urls == *redis_addrs,
        format!("{name}: HERALD_REDIS_URL names {urls:?}, the Redis nodes are {redis_addrs:?}"),
    );
    // node_url: this very node, by its service name, on --listen's port.
    let node_url = env.get("HERALD_NODE_URL").cloned().unwrap_or_default();
    p.check(
        node_url == format!("http://{name}:{HTTP_PORT}"),
        format!("{name}: HERALD_NODE_URL {node_url:?}: want http://{name}:{HTTP_PORT}, where the other nodes reach this one"),
    );
    let deps = depends(svc);
    p.check(
        deps.get(init_name).map(String::as_str) == Some("service_completed_successfully"),
        format!("{name}: must start after {init_name} completed successfully"),
    );
    let grace = svc["stop_grace_period"].as_str().and_then(compose_secs);
    let shutdown = herald_duration_secs(&default_value("shutdown_timeout")).unwrap() as f64;
    p.check(
        grace.is_some_and(|g| g > shutdown),
        format!(
            "{name}: stop_grace_period {grace:?} s must exceed shutdown_timeout ({shutdown} s)"
        ),
    );
    p.check(
        !svc["ulimits"]["nofile"].is_null(),
        format!("{name}: no ulimits.nofile (one descriptor per websocket)"),
    );
    let health = compose_words(&svc["healthcheck"]["test"]).join(" ");
    p.check(
        [READINESS_PATH, LIVENESS_PATH]
            .iter()
            .any(|path| health.contains(&format!("127.0.0.1:{HTTP_PORT}{path}"))),
        format!("{name}: healthcheck `{health}` does not hit /ready or /health"),
    );
}

/// nginx in front: the cluster config, after the nodes, published where
/// public_url says.
#[test]
fn docker_compose_nginx_fronts_the_herald_nodes_where_public_url_says() {
    let mut p = Problems::new("docker-compose.cluster.yml");
    let compose = load_compose(&mut p);
    let services = compose.services();
    let herald_nodes = compose.herald_nodes();
    let public = compose
        .herald_nodes()
        .first()
        .and_then(|(name, _)| {
            compose_env(&compose.raw["services"][*name])
                .get("HERALD_PUBLIC_URL")
                .cloned()
        })
        .map(|v| compose_interpolate(&v, &mut BTreeSet::new()))
        .unwrap_or_default();
    let nginx: Vec<(&str, &Yaml)> = services
        .into_iter()
        .filter(|(_, s)| image_of(s).starts_with("nginx"))
        .collect();
    p.check(nginx.len() == 1, "no nginx service");
    if let Some((name, svc)) = nginx.first() {
        let mount = seq(&svc["volumes"])
            .iter()
            .filter_map(|v| v.as_str())
            .find(|v| v.starts_with("./nginx-cluster.conf:"))
            .unwrap_or("");
        p.check(
            mount.starts_with("./nginx-cluster.conf:/etc/nginx/nginx.conf"),
            format!("{name}: nginx-cluster.conf (a whole nginx.conf) is not mounted at /etc/nginx/nginx.conf"),
        );
        let conf = parse_nginx(&read("nginx-cluster.conf"));
        let upstream: BTreeSet<String> = nginx_upstream_servers(&conf).into_iter().collect();
        let nodes: BTreeSet<String> = herald_nodes
            .iter()
            .map(|(n, _)| format!("{n}:{HTTP_PORT}"))
            .collect();
        p.check(
            upstream == nodes,
            format!("nginx-cluster.conf upstream {upstream:?} != the Herald nodes {nodes:?}"),
        );
        let deps = depends(svc);
        for (node, _) in &herald_nodes {
            p.check(
                deps.contains_key(*node),
                format!(
                    "{name}: does not depend on {node} (nginx resolves its upstreams at start)"
                ),
            );
        }
        // public_url's port is nginx's published port.
        let listen_port = nginx_listen_ports(&conf).first().copied();
        let published: Vec<(String, String)> = seq(&svc["ports"])
            .iter()
            .filter_map(|p| p.as_str())
            .filter_map(|p| {
                let (host, container) = p.rsplit_once(':')?;
                let host_port = host.rsplit(':').next()?;
                Some((host_port.to_string(), container.to_string()))
            })
            .collect();
        let public_port = public
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.rsplit_once(':'))
            .map(|(_, port)| port.to_string());
        p.check(
            published.iter().any(|(host, container)| {
                Some(host) == public_port.as_ref()
                    && Some(container.as_str()) == listen_port.map(|l| l.to_string()).as_deref()
            }),
            format!("{name}: publishes {published:?}, but HERALD_PUBLIC_URL is {public} and nginx listens on {listen_port:?}"),
        );
    }
    p.finish();
}

/// Compose's own reading of the file, as far as Debian packages one that
/// works offline: `docker-compose config` (1.29) validates the file against
/// the Compose schema and interpolates it, with no Docker daemon. That
/// version predates the top-level `name` key (Compose v2), so the copy under
/// test goes without it (`name` is among the top-level keys checked above).
/// It runs with an empty environment and .env file, so nothing of this
/// machine's settles the outcome; first without HERALD_ENDPOINT_KEYS, which
/// it must refuse, then with one.
#[test]
fn docker_compose_config_accepts_the_file() {
    let mut p = Problems::new("docker-compose.cluster.yml");
    let dir = tempfile::tempdir().expect("temp dir");
    let text = read("docker-compose.cluster.yml");
    p.check(
        text.lines().any(|l| l.starts_with("name:")),
        "no top-level name: update this test",
    );
    let copy: String = text
        .lines()
        .filter(|l| !l.starts_with("name:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = dir.path().join("docker-compose.yml");
    std::fs::write(&file, copy).unwrap();
    let env_file = dir.path().join("empty.env");
    std::fs::write(&env_file, "").unwrap();
    let config = |endpoint_keys: Option<&str>| {
        let mut cmd = crate::tools::require("docker-compose", "docker-compose");
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg("--project-directory")
            .arg(deploy_dir())
            .arg("--env-file")
            .arg(&env_file)
            .arg("-f")
            .arg(&file)
            .args(["config", "-q"]);
        if let Some(keys) = endpoint_keys {
            cmd.env("HERALD_ENDPOINT_KEYS", keys);
        }
        crate::tools::run(cmd)
    };
    let (ok, _, err) = config(None);
    p.check(
        !ok && err.contains("HERALD_ENDPOINT_KEYS"),
        format!("docker-compose config without HERALD_ENDPOINT_KEYS: want a refusal naming it, got ok={ok}: {err}"),
    );
    let (ok, _, err) = config(Some("a-key-from-herald-keygen"));
    p.check(
        ok,
        format!("docker-compose config refused the file:\n{err}"),
    );
    p.finish();
}
