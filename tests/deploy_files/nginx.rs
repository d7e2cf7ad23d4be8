//! The reverse-proxy snippets (nginx, Caddy) and what the guide says of them.

use crate::shared::*;

// ---------------------------------------------------------------------------
// Reverse proxies and the guide
// ---------------------------------------------------------------------------

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

pub(crate) fn balanced_braces(text: &str) -> bool {
    let mut depth = 0i64;
    for line in text.lines() {
        let code = line.split('#').next().unwrap();
        for c in code.chars() {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            if depth < 0 {
                return false;
            }
        }
    }
    depth == 0
}

/// nginx directives (`name args...;`), comments dropped.
pub(crate) fn nginx_directives(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| l.ends_with(';'))
        .map(|l| l.trim_end_matches(';').split_whitespace().collect())
        .collect()
}

/// nginx blocks opened by a line starting with `word` (`location`,
/// `upstream`): the words before `{`, and the directives inside.
pub(crate) fn nginx_blocks<'a>(
    text: &'a str,
    word: &str,
) -> Vec<(Vec<&'a str>, Vec<Vec<&'a str>>)> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(head) = line.strip_suffix('{') else {
            continue;
        };
        let head: Vec<&str> = head.split_whitespace().collect();
        if head.first() != Some(&word) {
            continue;
        }
        let mut depth = 0i64;
        let mut body = Vec::new();
        for (j, l) in lines.iter().enumerate().skip(i) {
            if j > i && depth == 1 && l.ends_with(';') {
                body.push(l.trim_end_matches(';').split_whitespace().collect());
            }
            depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
            if depth <= 0 {
                break;
            }
        }
        out.push((head, body));
    }
    out
}

/// What every nginx file in front of Herald needs for websockets and pushes,
/// and its refusal of the node-to-node paths.
/// The location nginx picks for `path`: an exact `=` match, else the
/// longest prefix; regex locations are not used in deploy/ and are refused
/// here rather than modelled.
pub(crate) fn nginx_location<'a, 'b>(
    locations: &'b [(Vec<&'a str>, Vec<Vec<&'a str>>)],
    path: &str,
) -> Option<&'b (Vec<&'a str>, Vec<Vec<&'a str>>)> {
    if let Some(exact) = locations
        .iter()
        .find(|(head, _)| head.len() == 3 && head[1] == "=" && head[2] == path)
    {
        return Some(exact);
    }
    locations
        .iter()
        .filter_map(|l| {
            let prefix = match l.0.as_slice() {
                [_, prefix] => *prefix,
                [_, "^~", prefix] => *prefix,
                _ => return None,
            };
            path.starts_with(prefix).then_some((prefix.len(), l))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, l)| l)
}

pub(crate) fn check_nginx_proxy(file: &str, text: &str, p: &mut Problems) {
    let idle = herald_duration_secs(&default_value("ping_interval")).unwrap()
        + herald_duration_secs(&default_value("ping_timeout")).unwrap();
    p.check(balanced_braces(text), format!("{file}: unbalanced braces"));
    let directives = nginx_directives(text);
    let has = |d: &[&str]| directives.iter().any(|x| x.as_slice() == d);
    p.check(
        has(&["proxy_http_version", "1.1"]),
        format!("{file}: proxy_http_version 1.1 is needed for websockets"),
    );
    p.check(
        has(&["proxy_set_header", "Upgrade", "$http_upgrade"]),
        format!("{file}: Upgrade header not passed"),
    );
    p.check(
        directives
            .iter()
            .any(|d| d.len() == 3 && d[0] == "proxy_set_header" && d[1] == "Connection"),
        format!("{file}: Connection header not set"),
    );
    p.check(
        has(&["proxy_buffering", "off"]),
        format!("{file}: proxy_buffering off is missing"),
    );
    let read_timeout = directives
        .iter()
        .find(|d| d[0] == "proxy_read_timeout")
        .and_then(|d| d.get(1))
        .and_then(|v| nginx_secs(v));
    p.check(
        read_timeout.is_some_and(|t| t >= 3600 && t > idle),
        format!("{file}: proxy_read_timeout {read_timeout:?} s must be at least 1h (websockets idle between pings)"),
    );
    // /_herald/ (node-to-node wake-ups and evictions) is refused, by a
    // location regexes cannot override.
    let locations = nginx_blocks(text, "location");
    let refuses = |d: &Vec<&str>| {
        (d.first() == Some(&"return") && d.get(1).is_some_and(|s| s.starts_with('4')))
            || d.as_slice() == ["deny", "all"]
    };
    p.check(
        locations.iter().any(|(head, body)| {
            head.len() == 3
                && ["^~", "="].contains(&head[1])
                && head[2].starts_with("/_herald")
                && body.iter().any(refuses)
        }),
        format!("{file}: no `location ^~ /_herald/ {{ return 404; }}`: the node-to-node paths must not be reachable through the proxy"),
    );
    p.check(
        locations.iter().any(|(head, body)| {
            head.get(1) == Some(&"=")
                && head.get(2) == Some(&"/metrics")
                && body.iter().any(refuses)
        }),
        format!("{file}: /metrics is not refused"),
    );
    p.check(
        locations
            .iter()
            .all(|(head, _)| !head.iter().any(|w| w.starts_with('~'))),
        format!("{file}: regex locations are not checked by this test; use prefix locations"),
    );
    for public in public_request_paths() {
        let proxied = nginx_location(&locations, &public).is_some_and(|(_, body)| {
            body.iter().any(|d| d.first() == Some(&"proxy_pass")) && !body.iter().any(refuses)
        });
        p.check(
            proxied,
            format!("{file}: {public} (a public path of Herald's router) is not proxied to Herald"),
        );
    }
}

#[test]
pub(crate) fn reverse_proxy_snippets_pass_websockets_and_keep_them_open() {
    let mut p = Problems::new("nginx.conf / nginx-cluster.conf / Caddyfile");
    let nginx = read("nginx.conf");
    check_nginx_proxy("nginx.conf", &nginx, &mut p);
    p.check(
        nginx.contains("ssl_certificate "),
        "nginx.conf: TLS is not terminated (no ssl_certificate)",
    );
    p.check(
        nginx_blocks(&nginx, "upstream")
            .iter()
            .flat_map(|(_, body)| body)
            .any(|d| {
                d.first() == Some(&"server")
                    && d.get(1) == Some(&format!("127.0.0.1:{HTTP_PORT}").as_str())
            }),
        format!("nginx.conf: no upstream server 127.0.0.1:{HTTP_PORT}"),
    );

    // The cluster file is a whole nginx.conf spreading over several nodes.
    let cluster = read("nginx-cluster.conf");
    check_nginx_proxy("nginx-cluster.conf", &cluster, &mut p);
    let top = nginx_directives(&cluster);
    let limit = top
        .iter()
        .find(|d| d[0] == "worker_rlimit_nofile")
        .and_then(|d| d.get(1)?.parse::<u64>().ok());
    let per_worker = top
        .iter()
        .find(|d| d[0] == "worker_connections")
        .and_then(|d| d.get(1)?.parse::<u64>().ok());
    p.check(
        per_worker.is_some_and(|w| w > 1024) && limit.is_some_and(|l| Some(l) >= per_worker),
        format!("nginx-cluster.conf: worker_connections {per_worker:?} must exceed nginx's default 1024 (two sockets per websocket) and fit in worker_rlimit_nofile {limit:?}"),
    );
    let upstreams = nginx_blocks(&cluster, "upstream");
    let servers: Vec<&str> = upstreams
        .iter()
        .flat_map(|(_, body)| body)
        .filter(|d| d.first() == Some(&"server"))
        .filter_map(|d| d.get(1).copied())
        .collect();
    p.check(
        servers.len() >= 2,
        format!("nginx-cluster.conf: upstream servers {servers:?}: want several nodes"),
    );
    for (head, _) in &upstreams {
        let name = head.get(1).copied().unwrap_or("");
        p.check(
            top.iter().any(|d| {
                d[0] == "proxy_pass" && d.get(1) == Some(&format!("http://{name}").as_str())
            }),
            format!("nginx-cluster.conf: upstream {name} is not proxied to"),
        );
    }

    let caddy = read("Caddyfile");
    p.check(balanced_braces(&caddy), "Caddyfile: unbalanced braces");
    p.check(
        caddy.lines().any(|l| {
            l.trim_start()
                .starts_with(&format!("reverse_proxy 127.0.0.1:{HTTP_PORT}"))
        }),
        format!("Caddyfile: no reverse_proxy to 127.0.0.1:{HTTP_PORT}"),
    );
    p.check(
        caddy.contains("flush_interval -1"),
        "Caddyfile: flush_interval -1 is missing",
    );
    p.check(
        caddy
            .lines()
            .any(|l| l.trim() == "respond /_herald/* 404" || l.trim() == "respond /_herald/* 403"),
        "Caddyfile: /_herald/* is not refused (respond /_herald/* 404)",
    );
    // Caddy sends everything to reverse_proxy except what a `respond`
    // answers first.
    for public in public_request_paths() {
        let refused_by = caddy.lines().map(str::trim).find(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.first() == Some(&"respond")
                && words.get(1).is_some_and(|m| match m.strip_suffix('*') {
                    Some(prefix) => public.starts_with(prefix),
                    None => *m == public,
                })
        });
        p.check(
            refused_by.is_none(),
            format!("Caddyfile: {public} (a public path of Herald's router) is refused by {refused_by:?}"),
        );
    }
    p.finish();
}
