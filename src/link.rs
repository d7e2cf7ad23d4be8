//! `Link` header fields (RFC 8288), which carry receipt subscriptions both
//! ways (RFC 8030 §5.1): in Herald's 202 answers, and in pushes that pass a
//! receipt subscription back. Pure code.

/// The link relation naming a receipt subscription (RFC 8030 §5.1).
pub const RECEIPT: &str = "urn:ietf:params:push:receipt";

/// One link of a `Link` header (RFC 8288): its target and relation types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub target: String,
    /// The `rel` parameter split into relation types; empty without one.
    pub rels: Vec<String>,
}

impl Link {
    /// Relation types compare case-insensitively (RFC 8288 §2.1).
    pub fn has_rel(&self, rel: &str) -> bool {
        self.rels.iter().any(|r| r.eq_ignore_ascii_case(rel))
    }
}

/// Parses one `Link` field value into its links. Tolerant: a link that
/// does not parse ends the list instead of failing the whole answer,
/// since the push itself already succeeded.
pub fn parse_links(value: &str) -> Vec<Link> {
    let mut links = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
        let Some(after_lt) = rest.strip_prefix('<') else {
            return links;
        };
        let Some(end) = after_lt.find('>') else {
            return links;
        };
        let target = after_lt[..end].trim().to_owned();
        rest = &after_lt[end + 1..];
        let mut rel = None;
        // Parameters: `; name = value` where value is a token or a quoted
        // string, until a comma outside quotes.
        loop {
            rest = rest.trim_start();
            let Some(after_semi) = rest.strip_prefix(';') else {
                break;
            };
            let name_end = after_semi.find(['=', ';', ',']).unwrap_or(after_semi.len());
            let name = after_semi[..name_end].trim();
            rest = &after_semi[name_end..];
            let mut param_value = String::new();
            if let Some(after_eq) = rest.strip_prefix('=') {
                let after_eq = after_eq.trim_start();
                if let Some(quoted) = after_eq.strip_prefix('"') {
                    let mut chars = quoted.char_indices();
                    let mut consumed = quoted.len();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, escaped)) = chars.next() {
                                    param_value.push(escaped);
                                }
                            }
                            '"' => {
                                consumed = i + 1;
                                break;
                            }
                            c => param_value.push(c),
                        }
                    }
                    rest = &quoted[consumed..];
                } else {
                    let end = after_eq.find([';', ',']).unwrap_or(after_eq.len());
                    param_value = after_eq[..end].trim().to_owned();
                    rest = &after_eq[end..];
                }
            }
            // Only the first `rel` counts (RFC 8288 §3.3).
            if name.eq_ignore_ascii_case("rel") && rel.is_none() {
                rel = Some(param_value);
            }
        }
        links.push(Link {
            target,
            rels: rel
                .unwrap_or_default()
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect(),
        });
    }
}

/// The target of the first link with relation type `rel` in any of the
/// field values.
pub fn find_rel<'a>(values: impl IntoIterator<Item = &'a str>, rel: &str) -> Option<String> {
    values
        .into_iter()
        .flat_map(parse_links)
        .find(|link| link.has_rel(rel))
        .map(|link| link.target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_parse_per_rfc8288() {
        let receipt = |v: &str| {
            parse_links(v)
                .into_iter()
                .find(|l| l.has_rel(RECEIPT))
                .map(|l| l.target)
        };
        assert_eq!(
            receipt(r#"<http://p/r/a>; rel="urn:ietf:params:push:receipt""#).as_deref(),
            Some("http://p/r/a")
        );
        // Unquoted, other case, extra spaces.
        assert_eq!(
            receipt("< http://p/r/b > ;REL = URN:IETF:PARAMS:PUSH:RECEIPT").as_deref(),
            Some("http://p/r/b")
        );
        // Several links; several rel types; commas and semicolons in
        // quoted parameters and in targets do not split links.
        let many = r##"<http://p/x,y>; title="a, b; c"; rel="next", </r/c>; anchor="#z"; rel="prev urn:ietf:params:push:receipt", <http://p/r/d>; rel="urn:ietf:params:push:receipt""##;
        let links = parse_links(many);
        assert_eq!(links.len(), 3, "{links:?}");
        assert_eq!(links[0].target, "http://p/x,y");
        assert_eq!(links[0].rels, ["next"]);
        assert_eq!(receipt(many).as_deref(), Some("/r/c"));
        // Escapes in quoted strings; only the first rel counts.
        let escaped = r#"<http://p/r/e>; title="say \"hi\""; rel="other"; rel="urn:ietf:params:push:receipt""#;
        assert_eq!(parse_links(escaped)[0].rels, ["other"]);
        assert_eq!(receipt(escaped), None);
        // Links without rel, other rels, and junk.
        assert_eq!(receipt("<http://p/r/f>"), None);
        assert_eq!(receipt(r#"<http://p/r/f>; rel="next""#), None);
        assert_eq!(receipt(""), None);
        assert_eq!(receipt("not a link"), None);
        assert_eq!(
            receipt(r#"<http://p/r/g; rel="urn:ietf:params:push:receipt""#),
            None
        );
    }
}
