//! `deploy/Caddyfile`, by hand: Debian's caddy (2.6) is older than the
//! `stream_close_delay` our file uses (Caddy 2.7), so `caddy validate` from
//! the distribution refuses a file today's Caddy accepts.

use crate::shared::*;

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

#[test]
fn caddyfile_proxies_public_paths_and_refuses_the_private_ones() {
    let mut p = Problems::new("Caddyfile");
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
