//! `deploy/kubernetes/`: both layouts, with and without `kubectl kustomize`.
//!
//! Debian packages neither kubectl nor kustomize (bookworm), so `make
//! test-deps` cannot install them and the kustomization is resolved by hand
//! (`kustomize_static`); where a kubectl is on PATH anyway, its `kubectl
//! kustomize` build is compared with ours, and its absence is printed, not
//! failed. Server-side validation (`kubectl apply --dry-run=server`) needs a
//! cluster and is out of reach here.

use crate::docker::dockerfile_user_uid;
use crate::shared::*;

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

/// Parses every YAML document of a file (an error ends the file).
pub(crate) fn yaml_documents(name: &str, text: &str, p: &mut Problems) -> Vec<Yaml> {
    check_yaml11_booleans(name, text, p);
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        match Yaml::deserialize(doc) {
            Ok(Yaml::Null) => {}
            Ok(v) => docs.push(v),
            // After an error the iterator repeats it forever: stop.
            Err(e) => {
                p.add(format!("{name}: not valid YAML: {e}"));
                break;
            }
        }
    }
    docs
}

pub(crate) fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// A path under deploy/kubernetes, as written in messages.
pub(crate) fn kubernetes_rel(path: &Path) -> String {
    let base = kubernetes_dir().canonicalize().unwrap();
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    path.strip_prefix(&base)
        .map(|r| r.to_string_lossy().to_string())
        .unwrap_or_else(|_| path.to_string_lossy().to_string())
}

pub(crate) fn yaml_files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect()
}

/// What `kubectl apply -k DIR` applies, read the way kustomize reads it:
/// the kustomization's resources, files or directories with their own
/// kustomization (the layouts here use no patches or generators, which this
/// does not model). Returns every document with the file it came from
/// (relative to deploy/kubernetes); `files` collects every file read.
pub(crate) fn kustomize_static(
    dir: &Path,
    p: &mut Problems,
    files: &mut BTreeSet<PathBuf>,
) -> Vec<(String, Yaml)> {
    let kfile = dir.join("kustomization.yaml");
    let rel_dir = kubernetes_rel(dir);
    let Ok(text) = std::fs::read_to_string(&kfile) else {
        p.add(format!("{rel_dir}: no kustomization.yaml"));
        return Vec::new();
    };
    files.insert(kfile.canonicalize().unwrap());
    let kdocs = yaml_documents(&kubernetes_rel(&kfile), &text, p);
    let Some(k) = kdocs.first() else {
        return Vec::new();
    };
    p.check(
        kind_of(k) == "Kustomization" && k["apiVersion"].is_string(),
        format!("{rel_dir}/kustomization.yaml: not a Kustomization with an apiVersion"),
    );
    for unsupported in [
        "patches",
        "patchesStrategicMerge",
        "configMapGenerator",
        "secretGenerator",
        "components",
    ] {
        p.check(
            k[unsupported].is_null(),
            format!("{rel_dir}/kustomization.yaml: `{unsupported}` is not modelled by this test"),
        );
    }
    let mut docs = Vec::new();
    let mut listed = BTreeSet::new();
    for r in seq(&k["resources"]) {
        let Some(r) = r.as_str() else {
            p.add(format!(
                "{rel_dir}/kustomization.yaml: a resource that is not a string"
            ));
            continue;
        };
        let path = dir.join(r);
        if path.is_dir() {
            // kustomize refuses a base that contains the including
            // directory ("cycle detected").
            let (base, this) = (path.canonicalize().unwrap(), dir.canonicalize().unwrap());
            p.check(
                !this.starts_with(&base),
                format!("{rel_dir}/kustomization.yaml: resource {r} contains this directory (kustomize: cycle detected)"),
            );
            if !this.starts_with(&base) {
                docs.extend(kustomize_static(&path, p, files));
            }
        } else if path.is_file() {
            let name = kubernetes_rel(&path);
            listed.insert(path.canonicalize().unwrap());
            files.insert(path.canonicalize().unwrap());
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in yaml_documents(&name, &text, p) {
                docs.push((name.clone(), doc));
            }
        } else {
            p.add(format!(
                "{rel_dir}/kustomization.yaml: resource {r} does not exist"
            ));
        }
    }
    // Every manifest beside the kustomization is one of its resources.
    for f in yaml_files_in(dir) {
        let f = f.canonicalize().unwrap();
        if f.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        p.check(
            listed.contains(&f),
            format!(
                "{}: not listed in {rel_dir}/kustomization.yaml",
                kubernetes_rel(&f)
            ),
        );
    }
    docs
}

pub(crate) fn kind_of(doc: &Yaml) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

pub(crate) fn name_of(doc: &Yaml) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

/// A probe's or Service's port (number or name) resolved against a
/// container's ports.
pub(crate) fn resolve_port(port: &Yaml, container: &Yaml) -> Option<i64> {
    if let Some(n) = port.as_i64() {
        return Some(n);
    }
    let name = port.as_str()?;
    seq(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
}

/// Labels and annotations must be strings: `"true"`, not `true`.
pub(crate) fn check_string_map(what: &str, map: &Yaml, p: &mut Problems) {
    if let Some(m) = map.as_mapping() {
        for (k, v) in m {
            p.check(
                v.is_string(),
                format!("{what} {k:?} has a non-string value {v:?}: quote it"),
            );
        }
    }
}

/// Whether a `matchLabels` selector picks pods with these labels.
pub(crate) fn selects(match_labels: &Yaml, pod_labels: &Yaml) -> bool {
    match_labels.as_mapping().is_some_and(|sel| {
        !sel.is_empty()
            && sel
                .iter()
                .all(|(k, v)| pod_labels[k.as_str().unwrap_or("")] == *v)
    })
}

/// Whether an Ingress rule's paths send `request_path` to a backend
/// (Kubernetes path matching: Exact, or Prefix by whole path elements).
pub(crate) fn ingress_routes(rule: &Yaml, request_path: &str) -> bool {
    seq(&rule["http"]["paths"]).iter().any(|path| {
        let p = path["path"].as_str().unwrap_or("/");
        match path["pathType"].as_str() {
            Some("Exact") => p == request_path,
            _ => {
                let prefix: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
                let req: Vec<&str> = request_path.split('/').filter(|s| !s.is_empty()).collect();
                req.len() >= prefix.len() && req[..prefix.len()] == prefix[..]
            }
        }
    })
}

/// The parts of a Herald workload the layout-specific checks look at.
pub(crate) struct Workload {
    spec: Yaml,
    pod: Yaml,
    pod_labels: Yaml,
    container: Yaml,
    /// herald.toml of the ConfigMap mounted as --config.
    config: toml::Table,
    /// Volume claim templates (StatefulSet only).
    claims: BTreeSet<String>,
}

impl Workload {
    fn env(&self, name: &str) -> Option<&Yaml> {
        seq(&self.container["env"])
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
    }
    fn env_value(&self, name: &str) -> Option<&str> {
        self.env(name).and_then(|e| e["value"].as_str())
    }
    fn args(&self) -> Vec<&str> {
        seq(&self.container["args"])
            .iter()
            .filter_map(|a| a.as_str())
            .collect()
    }
    fn flag(&self, name: &str) -> Option<&str> {
        let args = self.args();
        args.windows(2).find(|w| w[0] == name).map(|w| w[1])
    }
    /// A string setting as Herald would see it: the environment beats the
    /// file, which beats the default.
    fn setting(&self, key: &str) -> Option<String> {
        self.env_value(&format!("HERALD_{}", key.to_ascii_uppercase()))
            .map(String::from)
            .or_else(|| {
                self.config
                    .get(key)
                    .and_then(|v| v.as_str())
                    .map(String::from)
            })
            .or_else(|| {
                setting(key)
                    .and_then(|(_, d)| d)
                    .and_then(|_| default_value(key).as_str().map(String::from))
            })
    }
}

/// Seconds a container's preStop hook sleeps (`sleep N` or the sleep action).
pub(crate) fn pre_stop_secs(container: &Yaml) -> i64 {
    let hook = &container["lifecycle"]["preStop"];
    if let Some(s) = hook["sleep"]["seconds"].as_i64() {
        return s;
    }
    let cmd: Vec<&str> = seq(&hook["exec"]["command"])
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    match cmd.as_slice() {
        [sleep, n] if sleep.ends_with("sleep") => n.parse().unwrap_or(0),
        _ => 0,
    }
}

/// The documents of one kind.
fn docs_of_kind<'a>(docs: &'a [(String, Yaml)], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .map(|(_, d)| d)
        .filter(|d| kind_of(d) == kind)
        .collect()
}

/// Checks every layout makes alike: the kinds, the one Herald workload of
/// `kind`, its pod, container, config, probes, Services and Ingress.
pub(crate) fn check_herald_layout(
    docs: &[(String, Yaml)],
    kind: &str,
    p: &mut Problems,
) -> Option<Workload> {
    check_documents(docs, kind, p);
    let workloads = docs_of_kind(docs, kind);
    p.check(
        workloads.len() == 1,
        format!("expected one {kind}, found {}", workloads.len()),
    );
    let w = *workloads.first()?;
    let spec = w["spec"].clone();
    let pod = spec["template"]["spec"].clone();
    let pod_labels = spec["template"]["metadata"]["labels"].clone();
    check_string_map("pod template label", &pod_labels, p);
    check_string_map(
        "pod template annotation",
        &spec["template"]["metadata"]["annotations"],
        p,
    );
    p.check(
        selects(&spec["selector"]["matchLabels"], &pod_labels),
        format!("{kind} selector.matchLabels does not match the pod labels"),
    );
    let Some(c) = seq(&pod["containers"])
        .iter()
        .find(|c| c["name"].as_str() == Some("herald"))
        .cloned()
    else {
        p.add("no container named herald");
        return None;
    };

    let (config, claims) = check_args_and_mounts(docs, &spec, &pod, &c, p);
    check_pod_security(&pod, &c, &config, p);
    let public_url = check_env(&c, p);
    check_ports_and_probes(&c, &config, p);
    let services = docs_of_kind(docs, "Service");
    check_services(&services, &pod_labels, &c, p);
    check_ingress(docs, &services, public_url.as_deref(), p);
    Some(Workload {
        spec,
        pod,
        pod_labels,
        container: c,
        config,
        claims,
    })
}

/// Every document: a known kind, apiVersion, a unique name, string labels
/// and annotations; and one kind of workload.
fn check_documents(docs: &[(String, Yaml)], kind: &str, p: &mut Problems) {
    let mut seen = BTreeSet::new();
    for (file, doc) in docs {
        let k = kind_of(doc);
        p.check(
            [
                "StatefulSet",
                "Deployment",
                "PodDisruptionBudget",
                "Service",
                "ConfigMap",
                "Ingress",
            ]
            .contains(&k),
            format!("{file}: unexpected kind {k:?}"),
        );
        p.check(
            doc["apiVersion"].is_string(),
            format!("{file}: {k} has no apiVersion"),
        );
        p.check(
            !name_of(doc).is_empty(),
            format!("{file}: {k} has no metadata.name"),
        );
        p.check(
            seen.insert((k.to_string(), name_of(doc).to_string())),
            format!("{file}: a second {k} named {:?}", name_of(doc)),
        );
        check_string_map(&format!("{file}: {k} label"), &doc["metadata"]["labels"], p);
        check_string_map(
            &format!("{file}: {k} annotation"),
            &doc["metadata"]["annotations"],
            p,
        );
    }
    for other in ["StatefulSet", "Deployment"].iter().filter(|k| **k != kind) {
        p.check(
            docs_of_kind(docs, other).is_empty(),
            format!("a {other} beside the {kind}: one workload per layout"),
        );
    }
}

/// Arguments: serve, config from a ConfigMap mount, listen on the HTTP
/// port; every mount has a volume. Returns the mounted herald.toml and the
/// volume claim templates.
fn check_args_and_mounts(
    docs: &[(String, Yaml)],
    spec: &Yaml,
    pod: &Yaml,
    c: &Yaml,
    p: &mut Problems,
) -> (toml::Table, BTreeSet<String>) {
    let args: Vec<&str> = seq(&c["args"]).iter().filter_map(|a| a.as_str()).collect();
    let flag = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1]);
    p.check(
        args.first() == Some(&"serve"),
        format!("args {args:?} must start with serve"),
    );
    p.check(
        flag("--listen").and_then(port_of) == Some(HTTP_PORT),
        format!(
            "--listen {:?} must be on port {HTTP_PORT}",
            flag("--listen")
        ),
    );
    let mounts = seq(&c["volumeMounts"]);
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(path))
    };
    let configmaps = docs_of_kind(docs, "ConfigMap");
    let mut config = toml::Table::new();
    match flag("--config") {
        None => p.add("args lack --config (the ConfigMap's herald.toml)"),
        Some(cfg) => {
            let (dir, file) = cfg.rsplit_once('/').unwrap_or(("", cfg));
            let volume = mount_of(dir).and_then(|m| m["name"].as_str());
            let source = seq(&pod["volumes"])
                .iter()
                .find(|v| v["name"].as_str() == volume);
            let cm_name = source.and_then(|v| v["configMap"]["name"].as_str());
            match configmaps
                .iter()
                .find(|cm| Some(name_of(cm)) == cm_name && cm["data"][file].is_string())
            {
                Some(cm) => {
                    config = check_herald_toml(
                        cm["data"][file].as_str().unwrap(),
                        p,
                        &format!("ConfigMap {} {file}", name_of(cm)),
                    )
                }
                None => p.add(format!(
                    "--config {cfg}: no ConfigMap with key {file} is mounted at {dir}"
                )),
            }
        }
    }
    let claims: BTreeSet<String> = seq(&spec["volumeClaimTemplates"])
        .iter()
        .filter_map(|t| t["metadata"]["name"].as_str().map(String::from))
        .collect();
    for m in mounts {
        let name = m["name"].as_str().unwrap_or("");
        p.check(
            claims.contains(name)
                || seq(&pod["volumes"])
                    .iter()
                    .any(|v| v["name"].as_str() == Some(name)),
            format!("volumeMount {name:?} has no volume"),
        );
    }

    (config, claims)
}

fn check_pod_security(pod: &Yaml, c: &Yaml, config: &toml::Table, p: &mut Problems) {
    // Graceful shutdown (after any preStop pause) fits in the grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_i64();
    let stop = shutdown_timeout_secs(config) as i64 + pre_stop_secs(c);
    p.check(
        grace.is_some_and(|g| g > stop),
        format!(
            "terminationGracePeriodSeconds {grace:?} must exceed preStop + shutdown_timeout ({stop} s)"
        ),
    );
    p.check(
        pod["enableServiceLinks"].as_bool() == Some(false),
        "enableServiceLinks must be false (HERALD_* service variables)",
    );

    // Non-root, matching the image's USER.
    let pod_sc = &pod["securityContext"];
    p.check(
        pod_sc["runAsNonRoot"].as_bool() == Some(true),
        "pod securityContext.runAsNonRoot must be true",
    );
    let image_uid = dockerfile_user_uid(&read("Dockerfile"));
    p.check(
        pod_sc["runAsUser"].as_i64() == image_uid,
        format!(
            "runAsUser {:?} differs from the Dockerfile's USER {image_uid:?}",
            pod_sc["runAsUser"].as_i64()
        ),
    );
    let csc = &c["securityContext"];
    p.check(
        csc["allowPrivilegeEscalation"].as_bool() == Some(false),
        "container allowPrivilegeEscalation must be false",
    );
    p.check(
        csc["readOnlyRootFilesystem"].as_bool() == Some(true),
        "container readOnlyRootFilesystem must be true",
    );
    p.check(
        seq(&csc["capabilities"]["drop"])
            .iter()
            .any(|d| d.as_str() == Some("ALL")),
        "container capabilities must drop ALL",
    );
    for part in ["requests", "limits"] {
        p.check(
            c["resources"][part]["memory"].is_string(),
            format!("resources.{part}.memory is missing"),
        );
    }
}

/// Returns HERALD_PUBLIC_URL.
fn check_env(c: &Yaml, p: &mut Problems) -> Option<String> {
    // Environment: strings or references; every HERALD_* is a setting with a
    // value Herald accepts (values built from $(VAR) are checked per layout).
    for e in seq(&c["env"]) {
        let name = e["name"].as_str().unwrap_or("");
        p.check(
            e["value"].is_string() || e["valueFrom"].is_mapping(),
            format!("env {name:?}: value must be a string"),
        );
        if name.starts_with("HERALD_") {
            match e["value"].as_str() {
                Some(v) if !v.contains("$(") => {
                    if let Err(err) = check_env_setting(name, v) {
                        p.add(format!("env {err}"));
                    }
                }
                _ => p.check(
                    setting_of_env(name).is_some(),
                    format!("env {name} is not a Herald setting"),
                ),
            }
        }
    }
    let public_url = seq(&c["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some("HERALD_PUBLIC_URL"))
        .and_then(|e| e["value"].as_str())
        .map(String::from);
    p.check(
        public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://")),
        format!("env HERALD_PUBLIC_URL {public_url:?} must be set to an https:// URL"),
    );
    public_url
}

fn check_ports_and_probes(c: &Yaml, config: &toml::Table, p: &mut Problems) {
    p.check(
        seq(&c["ports"])
            .iter()
            .any(|cp| cp["containerPort"].as_i64() == Some(HTTP_PORT)),
        format!("no containerPort {HTTP_PORT}"),
    );
    if let Some(metrics) = config.get("metrics_listen").and_then(|v| v.as_str()) {
        let port = port_of(metrics);
        p.check(
            seq(&c["ports"])
                .iter()
                .any(|cp| cp["containerPort"].as_i64() == port),
            format!("metrics_listen {metrics} has no containerPort"),
        );
    }
    for (probe, path) in [
        ("livenessProbe", LIVENESS_PATH),
        ("readinessProbe", READINESS_PATH),
        ("startupProbe", LIVENESS_PATH),
    ] {
        let get = &c[probe]["httpGet"];
        if probe == "startupProbe" && c[probe].is_null() {
            continue;
        }
        p.check(
            get["path"].as_str() == Some(path),
            format!("{probe} must GET {path}, has {:?}", get["path"]),
        );
        p.check(
            resolve_port(&get["port"], c) == Some(HTTP_PORT),
            format!("{probe} port {:?} is not {HTTP_PORT}", get["port"]),
        );
    }
}

/// Services select the pods and target their ports.
fn check_services(services: &[&Yaml], pod_labels: &Yaml, c: &Yaml, p: &mut Problems) {
    p.check(!services.is_empty(), "no Service");
    for s in services {
        p.check(
            selects(&s["spec"]["selector"], pod_labels),
            format!("Service {} does not select the Herald pods", name_of(s)),
        );
        for port in seq(&s["spec"]["ports"]) {
            let target = if port["targetPort"].is_null() {
                &port["port"]
            } else {
                &port["targetPort"]
            };
            p.check(
                resolve_port(target, c).is_some_and(|n| {
                    seq(&c["ports"])
                        .iter()
                        .any(|cp| cp["containerPort"].as_i64() == Some(n))
                }),
                format!(
                    "Service {} targetPort {target:?} is not a container port",
                    name_of(s)
                ),
            );
        }
    }
}

/// The Ingress: for the public URL's host, to Service ports that exist,
/// with TLS, and only for the public paths.
fn check_ingress(
    docs: &[(String, Yaml)],
    services: &[&Yaml],
    public_url: Option<&str>,
    p: &mut Problems,
) {
    for ing in docs_of_kind(docs, "Ingress") {
        for rule in seq(&ing["spec"]["rules"]) {
            if let Some(url) = &public_url {
                let host = url
                    .trim_start_matches("https://")
                    .split(['/', ':'])
                    .next()
                    .unwrap_or("");
                p.check(
                    rule["host"].as_str() == Some(host),
                    format!(
                        "Ingress host {:?} != HERALD_PUBLIC_URL host {host}",
                        rule["host"]
                    ),
                );
            }
            for path in seq(&rule["http"]["paths"]) {
                let backend = &path["backend"]["service"];
                let svc = services
                    .iter()
                    .find(|s| Some(name_of(s)) == backend["name"].as_str());
                let port = &backend["port"];
                p.check(
                    svc.is_some_and(|s| {
                        seq(&s["spec"]["ports"]).iter().any(|sp| {
                            (port["name"].is_string() && sp["name"] == port["name"])
                                || (port["number"].is_i64() && sp["port"] == port["number"])
                        })
                    }),
                    format!(
                        "Ingress backend {:?}:{port:?} is not a Service port",
                        backend["name"]
                    ),
                );
                p.check(
                    ["Exact", "Prefix"].contains(&path["pathType"].as_str().unwrap_or("")),
                    format!(
                        "Ingress path {:?}: pathType must be Exact or Prefix (ImplementationSpecific differs between controllers)",
                        path["path"]
                    ),
                );
            }
            for public in public_request_paths() {
                p.check(
                    ingress_routes(rule, &public),
                    format!("Ingress does not route {public}, a public path of Herald's router (herald::server::PUBLIC_PATH_PREFIXES)"),
                );
            }
            for private in ["/_herald/node/wake", "/_herald/node/evict", "/metrics"] {
                p.check(
                    !ingress_routes(rule, private),
                    format!("Ingress routes {private}, which must stay private"),
                );
            }
        }
        p.check(
            !seq(&ing["spec"]["tls"]).is_empty(),
            "Ingress has no tls section (Firefox needs wss://)",
        );
    }
}

/// `kubectl kustomize DIR`, when kubectl is installed: the documents
/// kustomize itself builds, or a problem.
pub(crate) fn kubectl_kustomize(dir: &Path, p: &mut Problems) -> Option<Vec<Yaml>> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(_) => {
            println!(
                "note: kubectl not found; skipped `kubectl kustomize {}`",
                kubernetes_rel(dir)
            );
            return None;
        }
    };
    if !out.status.success() {
        p.add(format!(
            "kubectl kustomize {}: {}",
            kubernetes_rel(dir),
            String::from_utf8_lossy(&out.stderr)
        ));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    Some(yaml_documents("kubectl kustomize output", &text, p))
}

/// kustomize's build has the same objects as `kustomize_static`, each with
/// the common labels.
pub(crate) fn compare_with_kustomize(dir: &Path, docs: &[(String, Yaml)], p: &mut Problems) {
    let Some(built) = kubectl_kustomize(dir, p) else {
        return;
    };
    let ids = |d: &Yaml| (kind_of(d).to_string(), name_of(d).to_string());
    let ours: BTreeSet<_> = docs.iter().map(|(_, d)| ids(d)).collect();
    let theirs: BTreeSet<_> = built.iter().map(ids).collect();
    p.check(
        ours == theirs,
        format!(
            "kubectl kustomize {} builds {theirs:?}, expected {ours:?}",
            kubernetes_rel(dir)
        ),
    );
    for d in &built {
        p.check(
            d["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str() == Some("herald"),
            format!(
                "kubectl kustomize {}: {} {} lacks the label app.kubernetes.io/part-of",
                kubernetes_rel(dir),
                kind_of(d),
                name_of(d)
            ),
        );
    }
}

#[test]
pub(crate) fn kubernetes_manifests_are_consistent() {
    let mut p = Problems::new("kubernetes/");
    let mut files = BTreeSet::new();
    let single = kustomize_static(&kubernetes_dir(), &mut p, &mut files);
    let redis = kustomize_static(&kubernetes_dir().join("redis"), &mut p, &mut files);
    // Every manifest belongs to one of the two layouts.
    let mut stack = vec![kubernetes_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                p.check(
                    files.contains(&path.canonicalize().unwrap()),
                    format!(
                        "{}: part of neither `kubectl apply -k deploy/kubernetes` nor deploy/kubernetes/redis",
                        kubernetes_rel(&path)
                    ),
                );
            }
        }
    }
    compare_with_kustomize(&kubernetes_dir(), &single, &mut p);
    compare_with_kustomize(&kubernetes_dir().join("redis"), &redis, &mut p);
    p.finish();
}

#[test]
pub(crate) fn kubernetes_single_node_is_one_statefulset_pod_with_a_volume() {
    let mut p = Problems::new("kubernetes/ (one node on RocksDB)");
    let docs = kustomize_static(&kubernetes_dir(), &mut p, &mut BTreeSet::new());
    let Some(w) = check_herald_layout(&docs, "StatefulSet", &mut p) else {
        p.finish();
        return;
    };
    p.check(
        w.spec["replicas"].as_i64() == Some(1),
        "replicas must be 1: each Herald on RocksDB keeps its own local store, replicas would not share user agents",
    );
    p.check(
        w.setting("store").as_deref() == Some("rocksdb"),
        "the single-node layout must keep the embedded store (store = \"rocksdb\")",
    );
    p.check(
        w.pod["securityContext"]["fsGroup"].as_i64().is_some(),
        "pod securityContext.fsGroup is missing: the volume may not be writable",
    );
    p.check(
        !w.claims.is_empty(),
        "StatefulSet has no volumeClaimTemplates",
    );
    let mounts = seq(&w.container["volumeMounts"]);
    match w
        .flag("--data-dir")
        .and_then(|d| mounts.iter().find(|m| m["mountPath"].as_str() == Some(d)))
    {
        Some(m) => p.check(
            w.claims.contains(m["name"].as_str().unwrap_or("")),
            format!(
                "--data-dir is mounted from {:?}, not from a volumeClaimTemplate",
                m["name"]
            ),
        ),
        None => p.add(format!(
            "--data-dir {:?} is not a volumeMount of the container",
            w.flag("--data-dir")
        )),
    }
    // The StatefulSet's governing Service is headless.
    let governing = w.spec["serviceName"].as_str().unwrap_or("");
    p.check(
        docs.iter().any(|(_, s)| {
            kind_of(s) == "Service"
                && name_of(s) == governing
                && s["spec"]["clusterIP"].as_str() == Some("None")
        }),
        format!("serviceName {governing:?} is not a headless Service"),
    );
    p.finish();
}

/// The Redis layout's documents and Herald workload, for the focused tests
/// below. What every layout shares is checked and reported by
/// `kubernetes_redis_layout_runs_three_stateless_nodes`; the others only need
/// the workload, and fail if there is none.
fn redis_layout(p: &mut Problems) -> Option<(Vec<(String, Yaml)>, Workload)> {
    let docs = kustomize_static(&kubernetes_dir().join("redis"), p, &mut BTreeSet::new());
    let mut shared = Problems::new("kubernetes/redis/");
    let w = check_herald_layout(&docs, "Deployment", &mut shared);
    p.check(w.is_some(), "no Herald Deployment");
    Some((docs, w?))
}

#[test]
fn kubernetes_redis_layout_runs_three_stateless_nodes() {
    let mut p = Problems::new("kubernetes/redis/ (several nodes on Redis)");
    let docs = kustomize_static(
        &kubernetes_dir().join("redis"),
        &mut p,
        &mut BTreeSet::new(),
    );
    let Some(w) = check_herald_layout(&docs, "Deployment", &mut p) else {
        return p.finish();
    };
    let replicas = w.spec["replicas"].as_i64().unwrap_or(1);
    p.check(replicas == 3, format!("replicas {replicas}: want 3 nodes"));

    // Stateless: no claims, no persistent volumes.
    p.check(
        seq(&w.pod["volumes"])
            .iter()
            .all(|v| v["persistentVolumeClaim"].is_null()),
        "a persistentVolumeClaim volume: nodes on Redis keep nothing locally",
    );

    p.finish();
}

#[test]
fn kubernetes_redis_layout_takes_its_keys_and_redis_url_from_secrets() {
    let mut p = Problems::new("kubernetes/redis/ (several nodes on Redis)");
    let Some((_, w)) = redis_layout(&mut p) else {
        return p.finish();
    };
    // Redis mode, with its required settings.
    p.check(
        w.setting("store").as_deref() == Some("redis"),
        "store is not \"redis\" (HERALD_STORE or herald.toml)",
    );
    p.check(
        w.config.contains_key("redis_url") || w.env("HERALD_REDIS_URL").is_some(),
        "no redis_url in herald.toml or the environment",
    );
    // Some(optional) when the variable comes from a Secret.
    let secret_ref = |name: &str| -> Option<bool> {
        let r = &w.env(name)?["valueFrom"]["secretKeyRef"];
        r["name"].as_str()?;
        Some(r["optional"].as_bool().unwrap_or(false))
    };
    match secret_ref("HERALD_ENDPOINT_KEYS") {
        Some(optional) => p.check(
            !optional,
            "HERALD_ENDPOINT_KEYS must not be optional: Herald refuses to start in redis mode without it",
        ),
        None => p.add("HERALD_ENDPOINT_KEYS must come from a Secret (secretKeyRef): every node needs the same key, and it is a secret"),
    }
    p.check(
        !w.config.contains_key("endpoint_keys"),
        "endpoint_keys in a ConfigMap: keep the key in a Secret",
    );
    if w.env("HERALD_REDIS_URL").is_some() {
        p.check(
            secret_ref("HERALD_REDIS_URL").is_some(),
            "HERALD_REDIS_URL must come from a Secret (it may hold a password)",
        );
    }

    p.finish();
}

#[test]
fn kubernetes_redis_layout_node_url_is_the_pods_own_address() {
    let mut p = Problems::new("kubernetes/redis/ (several nodes on Redis)");
    let Some((_, w)) = redis_layout(&mut p) else {
        return p.finish();
    };
    // node_url: this pod's own IP (downward API) and the --listen port.
    let env = seq(&w.container["env"]);
    match w.env_value("HERALD_NODE_URL") {
        None => p.add(
            "HERALD_NODE_URL is not set: the default http://0.0.0.0:8080 reaches no other node",
        ),
        Some(url) => {
            let mut expanded = url.to_string();
            let position = |name: &str| env.iter().position(|e| e["name"].as_str() == Some(name));
            let own = position("HERALD_NODE_URL").unwrap();
            for part in url.split("$(").skip(1) {
                let var = part.split(')').next().unwrap_or("");
                let field = position(var).map(|i| &env[i]["valueFrom"]["fieldRef"]["fieldPath"]);
                p.check(
                    position(var).is_some_and(|i| i < own),
                    format!("HERALD_NODE_URL uses $({var}), which is not defined before it (Kubernetes expands only earlier variables)"),
                );
                p.check(
                    field.and_then(|f| f.as_str()) == Some("status.podIP"),
                    format!(
                        "$({var}) in HERALD_NODE_URL must be the pod IP (fieldRef status.podIP)"
                    ),
                );
                expanded = expanded.replace(&format!("$({var})"), "10.1.2.3");
            }
            p.check(
                url.contains("$("),
                format!("HERALD_NODE_URL {url:?} must name the pod's own IP ($(POD_IP)), not a shared address"),
            );
            match check_env_setting("HERALD_NODE_URL", &expanded) {
                Err(e) => p.add(e),
                Ok(()) => {
                    let port = expanded
                        .trim_start_matches("http://")
                        .trim_start_matches("https://")
                        .split('/')
                        .next()
                        .and_then(|a| a.rsplit_once(':'))
                        .and_then(|(_, port)| port.parse::<i64>().ok());
                    p.check(
                        port == w.flag("--listen").and_then(port_of),
                        format!("HERALD_NODE_URL {url:?}: port is not the --listen port"),
                    );
                }
            }
        }
    }

    p.finish();
}

#[test]
fn kubernetes_redis_layout_spreads_nodes_and_keeps_capacity_in_updates() {
    let mut p = Problems::new("kubernetes/redis/ (several nodes on Redis)");
    let Some((docs, w)) = redis_layout(&mut p) else {
        return p.finish();
    };
    let replicas = w.spec["replicas"].as_i64().unwrap_or(1);
    // Spread over machines, sized, and updated without losing capacity.
    let anti =
        seq(&w.pod["affinity"]["podAntiAffinity"]
            ["preferredDuringSchedulingIgnoredDuringExecution"])
        .iter()
        .map(|t| &t["podAffinityTerm"])
        .chain(seq(
            &w.pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ));
    let mut spread = false;
    for term in anti {
        spread |= term["topologyKey"].as_str() == Some("kubernetes.io/hostname")
            && selects(&term["labelSelector"]["matchLabels"], &w.pod_labels);
    }
    p.check(
        spread,
        "no podAntiAffinity on kubernetes.io/hostname selecting the Herald pods: replicas may share a machine",
    );
    for c in seq(&w.pod["topologySpreadConstraints"]) {
        p.check(
            selects(&c["labelSelector"]["matchLabels"], &w.pod_labels),
            "a topologySpreadConstraint that does not select the Herald pods",
        );
    }
    for r in ["cpu", "memory"] {
        p.check(
            !w.container["resources"]["requests"][r].is_null(),
            format!("resources.requests.{r} is missing"),
        );
    }
    p.check(
        w.container["resources"]["limits"]["cpu"].is_null(),
        "a CPU limit: throttling delays every websocket at once",
    );
    p.check(
        w.spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_i64() == Some(0),
        "strategy.rollingUpdate.maxUnavailable must be 0: start a new node before stopping an old one",
    );
    let pdbs: Vec<&Yaml> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| kind_of(d) == "PodDisruptionBudget")
        .collect();
    p.check(pdbs.len() == 1, "expected one PodDisruptionBudget");
    for pdb in pdbs {
        p.check(
            selects(&pdb["spec"]["selector"]["matchLabels"], &w.pod_labels),
            "the PodDisruptionBudget does not select the Herald pods",
        );
        let allows = pdb["spec"]["maxUnavailable"]
            .as_i64()
            .or_else(|| pdb["spec"]["minAvailable"].as_i64().map(|m| replicas - m));
        p.check(
            allows.is_some_and(|n| n >= 1 && n < replicas),
            format!("the PodDisruptionBudget allows {allows:?} pods down: want at least 1 and fewer than {replicas}"),
        );
    }
    p.finish();
}
