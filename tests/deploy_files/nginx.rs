//! `deploy/nginx.conf` and `deploy/nginx-cluster.conf`.
//!
//! nginx itself judges them: `nginx -T` (test, then print what it read) on a
//! copy in a temporary directory, so syntax, directive names, argument counts
//! and contexts, certificates and upstream names are nginx's business, not
//! this file's. What nginx cannot know is ours: which paths reach Herald,
//! which are refused, websocket headers, timeouts against Herald's ping
//! interval, ports and upstreams. Those are checked on the directive tree of
//! the file (`nginx -T` prints the files verbatim, so parsing the file is
//! parsing what nginx read).

use crate::shared::*;
use crate::tools;

// ---------------------------------------------------------------------------
// The directive tree
// ---------------------------------------------------------------------------

/// One directive: `name args;` or `name args { block }`.
#[derive(Debug)]
pub(crate) struct Directive {
    pub(crate) name: String,
    pub(crate) args: Vec<String>,
    pub(crate) block: Option<Vec<Directive>>,
}

impl Directive {
    pub(crate) fn body(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or(&[])
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Open,
    Close,
    End,
}

/// nginx's lexical rules, for files `nginx -t` accepted: words, quoted
/// strings (quotes removed), `{`, `}`, `;`, and `#` comments.
fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '{' => out.push(Token::Open),
            '}' => out.push(Token::Close),
            ';' => out.push(Token::End),
            '"' | '\'' => {
                let mut word = String::new();
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => word.extend(chars.next()),
                        d if d == c => break,
                        d => word.push(d),
                    }
                }
                out.push(Token::Word(word));
            }
            c => {
                let mut word = c.to_string();
                while let Some(&d) = chars.peek() {
                    if d.is_whitespace() || matches!(d, '{' | '}' | ';') {
                        break;
                    }
                    word.push(d);
                    chars.next();
                }
                out.push(Token::Word(word));
            }
        }
    }
    out
}

fn block(tokens: &mut std::vec::IntoIter<Token>) -> Vec<Directive> {
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let directive = |words: &mut Vec<String>, block| {
        let mut w = std::mem::take(words).into_iter();
        Directive {
            name: w.next().unwrap_or_default(),
            args: w.collect(),
            block,
        }
    };
    while let Some(t) = tokens.next() {
        match t {
            Token::Word(w) => words.push(w),
            Token::End => out.push(directive(&mut words, None)),
            Token::Open => {
                let inner = block(tokens);
                out.push(directive(&mut words, Some(inner)));
            }
            Token::Close => break,
        }
    }
    out
}

pub(crate) fn parse_nginx(text: &str) -> Vec<Directive> {
    block(&mut tokens(text).into_iter())
}

/// Every directive named `name`, at any depth.
pub(crate) fn find_all<'a>(tree: &'a [Directive], name: &str) -> Vec<&'a Directive> {
    let mut out = Vec::new();
    for d in tree {
        if d.name == name {
            out.push(d);
        }
        out.extend(find_all(d.body(), name));
    }
    out
}

fn children<'a>(tree: &'a [Directive], name: &'a str) -> impl Iterator<Item = &'a Directive> {
    tree.iter().filter(move |d| d.name == name)
}

/// The `http {}` context: the file's own block when it is a whole
/// nginx.conf, else the file itself (a snippet included from `http {}`).
fn http_context(tree: &[Directive]) -> &[Directive] {
    children(tree, "http").next().map_or(tree, Directive::body)
}

/// `host:port` of every `server` in every `upstream` block.
pub(crate) fn nginx_upstream_servers(tree: &[Directive]) -> Vec<String> {
    find_all(tree, "upstream")
        .iter()
        .flat_map(|u| children(u.body(), "server"))
        .filter_map(|s| s.args.first().cloned())
        .collect()
}

/// The port of every `listen`.
pub(crate) fn nginx_listen_ports(tree: &[Directive]) -> Vec<u16> {
    find_all(tree, "listen")
        .iter()
        .filter_map(|l| l.args.first()?.rsplit(':').next()?.parse().ok())
        .collect()
}

/// The location nginx picks for `path` in a server: an exact `=` match, else
/// the longest prefix. Regex locations are not used in deploy/ and are
/// refused by `check_nginx_proxy` rather than modelled.
fn location_for<'a>(server: &'a [Directive], path: &str) -> Option<&'a Directive> {
    let locations: Vec<&Directive> = children(server, "location").collect();
    if let Some(exact) = locations
        .iter()
        .find(|l| l.args.len() == 2 && l.args[0] == "=" && l.args[1] == path)
    {
        return Some(exact);
    }
    locations
        .iter()
        .filter_map(|l| {
            let prefix = match l.args.as_slice() {
                [prefix] => prefix,
                [m, prefix] if m == "^~" => prefix,
                _ => return None,
            };
            path.starts_with(prefix.as_str())
                .then_some((prefix.len(), *l))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, l)| l)
}

/// The directives named `name` in force in the innermost of `scopes`: nginx
/// inherits a directive from an outer level only where the inner level has
/// none of that name (for the repeatable `proxy_set_header` too).
fn in_force<'a>(scopes: &[&'a [Directive]], name: &'a str) -> Vec<&'a Directive> {
    scopes
        .iter()
        .map(|s| children(s, name).collect::<Vec<_>>())
        .find(|found| !found.is_empty())
        .unwrap_or_default()
}

fn refuses(body: &[Directive]) -> bool {
    body.iter().any(|d| {
        (d.name == "return" && d.args.first().is_some_and(|s| s.starts_with('4')))
            || (d.name == "deny" && d.args == ["all"])
    })
}

/// nginx time ("1h", "3600s", "3600") in seconds.
pub(crate) fn nginx_secs(s: &str) -> Option<u64> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().ok()?;
    Some(
        n * match &s[digits.len()..] {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return None,
        },
    )
}

// ---------------------------------------------------------------------------
// Our invariants
// ---------------------------------------------------------------------------

/// What every nginx file in front of Herald needs: each server that proxies
/// to Herald passes every public path of Herald's router on, refuses
/// /metrics and the node-to-node paths, and keeps websockets open.
pub(crate) fn check_nginx_proxy(file: &str, tree: &[Directive], p: &mut Problems) {
    let http = http_context(tree);
    let servers: Vec<&[Directive]> = children(http, "server")
        .map(Directive::body)
        .filter(|s| !find_all(s, "proxy_pass").is_empty())
        .collect();
    p.check(
        !servers.is_empty(),
        format!("{file}: no server block proxies to Herald"),
    );
    for server in servers {
        check_refusals(file, server, p);
        // Each location serving a public path, once.
        let mut serving: Vec<&Directive> = Vec::new();
        for public in public_request_paths() {
            let location = location_for(server, &public);
            let proxied = location.is_some_and(|l| {
                children(l.body(), "proxy_pass").count() > 0 && !refuses(l.body())
            });
            p.check(
                proxied,
                format!(
                    "{file}: {public} (a public path of Herald's router) is not proxied to Herald"
                ),
            );
            if let Some(l) = location.filter(|_| proxied) {
                if !serving.iter().any(|s| std::ptr::eq(*s, l)) {
                    serving.push(l);
                }
            }
        }
        for location in serving {
            check_proxying_location(file, &[location.body(), server, http], p);
        }
    }
}

/// /_herald/ (node-to-node wake-ups and evictions) by a location regexes
/// cannot override, and /metrics.
fn check_refusals(file: &str, server: &[Directive], p: &mut Problems) {
    let locations: Vec<&Directive> = children(server, "location").collect();
    p.check(
        locations.iter().any(|l| {
            l.args.len() == 2
                && ["^~", "="].contains(&l.args[0].as_str())
                && l.args[1].starts_with("/_herald")
                && refuses(l.body())
        }),
        format!("{file}: no `location ^~ /_herald/ {{ return 404; }}`: the node-to-node paths must not be reachable through the proxy"),
    );
    p.check(
        locations
            .iter()
            .any(|l| l.args == ["=", "/metrics"] && refuses(l.body())),
        format!("{file}: /metrics is not refused"),
    );
    p.check(
        locations
            .iter()
            .all(|l| !l.args.iter().any(|w| w.starts_with('~'))),
        format!("{file}: regex locations are not checked by this test; use prefix locations"),
    );
}

/// Websocket upgrade, streaming, and a read timeout longer than a
/// websocket's silence between Herald's pings. `scopes`: the location, its
/// server, the http context.
fn check_proxying_location(file: &str, scopes: &[&[Directive]], p: &mut Problems) {
    let idle = herald_duration_secs(&default_value("ping_interval")).unwrap()
        + herald_duration_secs(&default_value("ping_timeout")).unwrap();
    let value = |name: &'static str| -> Option<String> {
        in_force(scopes, name)
            .last()
            .and_then(|d| d.args.first().cloned())
    };
    p.check(
        value("proxy_http_version").as_deref() == Some("1.1"),
        format!("{file}: proxy_http_version 1.1 is needed for websockets"),
    );
    let headers: Vec<&Vec<String>> = in_force(scopes, "proxy_set_header")
        .into_iter()
        .map(|d| &d.args)
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|a| a.len() == 2 && a[0].eq_ignore_ascii_case(name))
            .map(|a| a[1].clone())
    };
    p.check(
        header("Upgrade").as_deref() == Some("$http_upgrade"),
        format!("{file}: Upgrade header not passed"),
    );
    // "upgrade" for handshakes; a variable must come from a map on
    // $http_upgrade, or the header would not follow the request.
    let connection = header("Connection");
    let http = scopes.last().copied().unwrap_or(&[]);
    p.check(
        connection.as_deref().is_some_and(|c| {
            !c.starts_with('$')
                || children(http, "map")
                    .any(|m| m.args.first().map(String::as_str) == Some("$http_upgrade") && m.args.get(1).map(String::as_str) == Some(c))
        }),
        format!("{file}: Connection header {connection:?} not set (or its variable is not a map of $http_upgrade)"),
    );
    p.check(
        value("proxy_buffering").as_deref() == Some("off"),
        format!("{file}: proxy_buffering off is missing"),
    );
    let read_timeout = value("proxy_read_timeout").and_then(|v| nginx_secs(&v));
    p.check(
        read_timeout.is_some_and(|t| t >= 3600 && t > idle),
        format!("{file}: proxy_read_timeout {read_timeout:?} s must be at least 1h (websockets idle between pings)"),
    );
}

#[test]
fn nginx_snippet_terminates_tls_in_front_of_one_herald() {
    let mut p = Problems::new("nginx.conf");
    let tree = parse_nginx(&read("nginx.conf"));
    check_nginx_proxy("nginx.conf", &tree, &mut p);
    p.check(
        !find_all(&tree, "ssl_certificate").is_empty(),
        "nginx.conf: TLS is not terminated (no ssl_certificate)",
    );
    let upstreams = nginx_upstream_servers(&tree);
    p.check(
        upstreams.contains(&format!("127.0.0.1:{HTTP_PORT}")),
        format!("nginx.conf: upstream servers {upstreams:?}: want 127.0.0.1:{HTTP_PORT}"),
    );
    p.finish();
}

#[test]
fn nginx_cluster_conf_spreads_over_several_nodes() {
    let mut p = Problems::new("nginx-cluster.conf");
    let tree = parse_nginx(&read("nginx-cluster.conf"));
    check_nginx_proxy("nginx-cluster.conf", &tree, &mut p);
    let number = |d: Option<&Directive>| d?.args.first()?.parse::<u64>().ok();
    let limit = number(children(&tree, "worker_rlimit_nofile").next());
    let per_worker = number(
        children(&tree, "events")
            .flat_map(|e| children(e.body(), "worker_connections"))
            .next(),
    );
    p.check(
        per_worker.is_some_and(|w| w > 1024) && limit.is_some_and(|l| Some(l) >= per_worker),
        format!("nginx-cluster.conf: worker_connections {per_worker:?} must exceed nginx's default 1024 (two sockets per websocket) and fit in worker_rlimit_nofile {limit:?}"),
    );
    let servers = nginx_upstream_servers(&tree);
    p.check(
        servers.len() >= 2,
        format!("nginx-cluster.conf: upstream servers {servers:?}: want several nodes"),
    );
    let passes: Vec<&str> = find_all(&tree, "proxy_pass")
        .iter()
        .filter_map(|d| d.args.first().map(String::as_str))
        .collect();
    for upstream in find_all(&tree, "upstream") {
        let name = upstream.args.first().map_or("", String::as_str);
        p.check(
            passes.contains(&format!("http://{name}").as_str()),
            format!("nginx-cluster.conf: upstream {name} is not proxied to"),
        );
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// nginx's own verdict
// ---------------------------------------------------------------------------

/// Replaces `from` in a copy under test, failing if the file no longer has
/// it (then the copy would silently test something else).
fn rewrite(text: &str, from: &str, to: &str, p: &mut Problems) -> String {
    p.check(
        text.contains(from),
        format!("{from:?} is no longer in the file: update the nginx -T test"),
    );
    text.replace(from, to)
}

/// `nginx -T -c main.conf` in `dir` (as prefix); the error log named by
/// `-e` is there too, so nothing outside `dir` is written. Err: nginx's
/// messages.
fn nginx_t(dir: &Path) -> Result<String, String> {
    let mut cmd = tools::require("nginx", "nginx");
    cmd.arg("-T")
        .arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-c")
        .arg(dir.join("main.conf"))
        .arg("-e")
        .arg(dir.join("error.log"));
    match tools::run(cmd) {
        (true, dump, _) => Ok(dump),
        (false, _, err) => Err(err),
    }
}

/// nginx -t binds every `listen` address: the copy listens on free loopback
/// ports instead (ports below 1024 need root, and tests stay on loopback),
/// one per distinct address so that no server lists one twice.
fn loopback_listens(text: &str, tree: &[Directive], p: &mut Problems) -> String {
    let mut copy = text.to_string();
    let mut seen = BTreeSet::new();
    for listen in find_all(tree, "listen") {
        let Some(addr) = listen.args.first() else {
            continue;
        };
        if !seen.insert(addr.clone()) {
            continue;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut found = false;
        for end in [";", " "] {
            let from = format!("listen {addr}{end}");
            found |= copy.contains(&from);
            copy = copy.replace(&from, &format!("listen 127.0.0.1:{port}{end}"));
        }
        p.check(found, format!("`listen {addr}` not found to rewrite"));
    }
    copy
}

/// The `http {}` directives that keep nginx's files in `dir` (Debian's
/// defaults are under /var/lib/nginx and /var/log/nginx, root's).
fn temp_paths(dir: &Path) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("    {t}_temp_path {}/{t};\n", dir.display()))
        .collect()
}

/// The snippet's main configuration also names the access log, which the
/// cluster file sets itself.
fn access_log(dir: &Path) -> String {
    format!("    access_log {}/access.log;\n", dir.display())
}

/// A snippet for the `http {}` context, in a minimal main configuration, with
/// what an unprivileged run needs: pid file and temporary paths in `dir`.
fn snippet_main(dir: &Path, snippet: &str) -> String {
    let d = dir.display();
    format!(
        "pid {d}/nginx.pid;\nevents {{}}\nhttp {{\n{}{}    include {d}/{snippet};\n}}\n",
        temp_paths(dir),
        access_log(dir)
    )
}

/// nginx.conf's copy under test in `dir`, with its main configuration.
fn prepare_snippet(dir: &Path, text: &str, p: &mut Problems) {
    let tree = parse_nginx(text);
    // Its certificate paths (Let's Encrypt's) do not exist here, and nginx
    // loads certificates while testing: a fresh self-signed pair instead.
    let pair = rcgen::generate_simple_self_signed(vec!["push.example.com".into()]).unwrap();
    let mut copy = text.to_string();
    for (directive, file, pem) in [
        ("ssl_certificate", "cert.pem", pair.cert.pem()),
        (
            "ssl_certificate_key",
            "key.pem",
            pair.signing_key.serialize_pem(),
        ),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, pem).unwrap();
        for d in find_all(&tree, directive) {
            let from = d.args.first().cloned().unwrap_or_default();
            copy = rewrite(&copy, &from, path.to_str().unwrap(), p);
        }
    }
    let copy = loopback_listens(&copy, &tree, p);
    std::fs::write(dir.join("herald.conf"), copy).unwrap();
    std::fs::write(dir.join("main.conf"), snippet_main(dir, "herald.conf")).unwrap();
}

#[test]
fn nginx_t_accepts_the_tls_snippet() {
    let mut p = Problems::new("nginx.conf");
    let dir = tempfile::tempdir().expect("temp dir");
    prepare_snippet(dir.path(), &read("nginx.conf"), &mut p);
    match nginx_t(dir.path()) {
        Ok(dump) => p.check(
            dump.contains("# configuration file") && dump.contains("location ^~ /_herald/"),
            format!("nginx -T did not print the snippet:\n{dump}"),
        ),
        Err(e) => p.add(format!("nginx -t refused it:\n{e}")),
    }
    p.finish();
}

/// The check above can fail: nginx refuses a directive that does not exist
/// in the same copy.
#[test]
fn nginx_t_refuses_a_misspelt_directive() {
    let mut p = Problems::new("nginx.conf");
    let dir = tempfile::tempdir().expect("temp dir");
    let text = rewrite(
        &read("nginx.conf"),
        "proxy_buffering off;",
        "proxy_bufering off;",
        &mut p,
    );
    prepare_snippet(dir.path(), &text, &mut p);
    p.finish();
    let err = nginx_t(dir.path()).expect_err("nginx -t accepted proxy_bufering");
    assert!(
        err.contains("unknown directive \"proxy_bufering\""),
        "{err}"
    );
}

#[test]
fn nginx_t_accepts_the_cluster_conf() {
    let mut p = Problems::new("nginx-cluster.conf");
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display();
    let text = read("nginx-cluster.conf");
    let tree = parse_nginx(&text);
    // The `nginx` user exists in the nginx image the Compose file runs, not
    // necessarily here.
    let mut copy = rewrite(&text, "\nuser nginx;", "\n", &mut p);
    // Log and pid files go to the temporary directory.
    for name in ["error_log", "access_log", "pid"] {
        for directive in find_all(&tree, name) {
            let from = directive.args.first().cloned().unwrap_or_default();
            let file = from.rsplit('/').next().unwrap_or("nginx.out");
            copy = rewrite(&copy, &from, &format!("{d}/{file}"), &mut p);
        }
    }
    // nginx resolves upstream names when it loads the configuration; the
    // Compose service names (herald-1...) resolve only inside Compose's
    // network, so the copy names loopback instead. Ports stay as they are.
    for server in nginx_upstream_servers(&tree) {
        let Some((host, port)) = server.rsplit_once(':') else {
            continue;
        };
        if host.parse::<std::net::IpAddr>().is_err() {
            copy = rewrite(
                &copy,
                &format!(" {server}"),
                &format!(" 127.0.0.1:{port}"),
                &mut p,
            );
        }
    }
    copy = rewrite(
        &copy,
        "\nhttp {\n",
        &format!("\nhttp {{\n{}", temp_paths(dir.path())),
        &mut p,
    );
    let copy = loopback_listens(&copy, &tree, &mut p);
    std::fs::write(dir.path().join("main.conf"), copy).unwrap();
    if let Err(e) = nginx_t(dir.path()) {
        p.add(format!("nginx -t refused it:\n{e}"));
    }
    p.finish();
}

#[test]
fn nginx_parser_follows_blocks_quotes_and_comments() {
    let tree = parse_nginx(
        "a 1; # c { ;\nmap $x $y {\n  default up;\n  ''  '';\n}\nb \"q;{}\" { c; d { e 2; } }\n",
    );
    let names: Vec<&str> = tree.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["a", "map", "b"]);
    let quoted = &tree[1].body()[1];
    assert_eq!(
        (quoted.name.as_str(), quoted.args.as_slice()),
        ("", &[String::new()][..])
    );
    assert_eq!(tree[2].args, ["q;{}"]);
    assert_eq!(find_all(&tree, "e")[0].args, ["2"]);
    assert!(tree[0].block.is_none());
}
