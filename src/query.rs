//! URL query strings as browsers and `herald admin` write them: the demo
//! page's and the admin API's few parameters, percent-decoded.

/// The first value of `name` in a query string, percent-decoded (`+` is a
/// space, as browsers' `URLSearchParams` write it).
pub fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+`; a stray `%` stays as it is, and bytes
/// that are not UTF-8 become U+FFFD.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_percent_decoded() {
        assert_eq!(
            param("a=1&endpoint=http%3A%2F%2Fh%2Fx%2By+z&b=", "endpoint").as_deref(),
            Some("http://h/x+y z")
        );
        assert_eq!(param("a=1", "endpoint"), None);
        assert_eq!(param("endpoint", "endpoint").as_deref(), Some(""));
        // A stray % is kept as it is.
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
