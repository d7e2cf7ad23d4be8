//! `deploy/README.md` against the files it describes and README.md.

use crate::shared::*;

/// Every `N KiB` in a sentence (or table cell) of `text` about memory per
/// connection.
pub(crate) fn per_connection_kib(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for sentence in text.split(". ").flat_map(|s| s.split('|')) {
        let lower = sentence.to_ascii_lowercase().replace('\n', " ");
        if !(lower.contains("per idle connection")
            || lower.contains("per connection")
            || lower.contains("per idle registered connection"))
        {
            continue;
        }
        let words: Vec<&str> = lower.split_whitespace().collect();
        for pair in words.windows(2) {
            let number = pair[0].trim_start_matches(['(', '*']);
            if pair[1].starts_with("kib") && number.parse::<f64>().is_ok() {
                found.push(number.to_string());
            }
        }
    }
    found
}

/// The README's measured per-connection memory: figures in sentences about
/// it, and the cells of tables whose header has a "KiB per connection"
/// column.
pub(crate) fn readme_per_connection_figures(readme: &str) -> BTreeSet<String> {
    let mut figures: BTreeSet<String> = per_connection_kib(readme).into_iter().collect();
    let mut columns: Vec<usize> = Vec::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if !line.trim_start().starts_with('|') {
            columns.clear();
            continue;
        }
        if cells.iter().any(|c| c.contains("KiB per connection")) {
            columns = (0..cells.len())
                .filter(|&i| cells[i].contains("KiB per connection"))
                .collect();
            continue;
        }
        for &i in &columns {
            if let Some(cell) = cells.get(i) {
                let n = cell.trim_matches('*');
                if n.parse::<f64>().is_ok() {
                    figures.insert(n.to_string());
                }
            }
        }
    }
    figures
}

/// `text` without the block `herald-loadtest sizing` printed (between its
/// two markers): that block is regenerated from the result files it names,
/// so its per-connection figures follow those files, not README.md.
pub(crate) fn without_sizing_output(text: &str) -> String {
    const START: &str = "<!-- herald-loadtest sizing output -->";
    const END: &str = "<!-- end of herald-loadtest sizing output -->";
    match (text.find(START), text.find(END)) {
        (Some(a), Some(b)) if a < b => format!("{}{}", &text[..a], &text[b + END.len()..]),
        _ => text.to_string(),
    }
}

/// deploy/README.md links to the README's measurements rather than
/// repeating them; any per-connection figure it does quote must be one the
/// README measured (it once said 5.0 KiB where the README said 5.7).
#[test]
pub(crate) fn deploy_readme_quotes_no_per_connection_figure_the_readme_lacks() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let measured = readme_per_connection_figures(&readme);
    assert!(
        measured.contains("5.7"),
        "README's per-connection figures not found (the parser is stale): {measured:?}"
    );
    let deploy = without_sizing_output(&read("README.md"));
    let quoted = per_connection_kib(&deploy);
    let stray: Vec<&String> = quoted.iter().filter(|q| !measured.contains(*q)).collect();
    assert!(
        stray.is_empty(),
        "deploy/README.md quotes {stray:?} KiB per connection; README.md measures {measured:?}: link to README instead"
    );
    // Outside the generated block, a figure is still caught.
    let sized = "<!-- herald-loadtest sizing output -->\n9.9 KiB per connection\n<!-- end of herald-loadtest sizing output -->\n1.2 KiB per connection";
    assert_eq!(per_connection_kib(&without_sizing_output(sized)), ["1.2"]);
    // The check bites: the old wording is caught.
    let old = "5.6 KiB of resident memory per idle connection with `store = \"redis\"`; the embedded store measures 5.0 KiB per connection";
    assert_eq!(per_connection_kib(old), ["5.6", "5.0"]);
}

#[test]
pub(crate) fn deploy_readme_describes_every_file() {
    let mut p = Problems::new("README.md");
    let readme = read("README.md");
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(deploy_dir())
                .unwrap()
                .to_string_lossy()
                .to_string();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            // Below a subdirectory of a subdirectory (kubernetes/redis/...),
            // the name alone is ambiguous: the directory must be named too.
            let parent = Path::new(&rel)
                .parent()
                .filter(|d| d.components().count() >= 2)
                .and_then(|d| d.file_name())
                .map(|d| d.to_string_lossy().to_string());
            let mentioned = match &parent {
                None => readme.contains(&name),
                Some(dir) => {
                    readme.contains(&format!("{dir}/{name}"))
                        || (readme.contains(&format!("{dir}/")) && readme.contains(&name))
                }
            };
            if rel != "README.md" {
                p.check(mentioned, format!("README.md does not mention {rel}"));
            }
        }
    }
    p.finish();
}

/// GitHub's anchor for a Markdown heading.
pub(crate) fn heading_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

pub(crate) fn markdown_anchors(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| heading_anchor(h.trim_start_matches('#')))
        .collect()
}

#[test]
pub(crate) fn deploy_readme_documents_several_nodes_on_redis() {
    let mut p = Problems::new("README.md");
    let readme = read("README.md");
    let Some(start) = readme.find("\n## Several nodes on Redis\n") else {
        p.add("no \"## Several nodes on Redis\" section");
        p.finish();
        return;
    };
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    for must in [
        "`store = \"redis\"`",
        "`redis_url`",
        "`endpoint_keys`",
        "`public_url`",
        "`node_url`",
        "`redis_wait_replicas`",
        "`redis_wait_timeout`",
        "herald keygen",
        "/_herald/",
        "noeviction",
        "`appendfsync`",
        "`everysec`",
        "`always`",
        "`cluster-node-timeout`",
        "`maxmemory`",
        "status.podIP",
        "docker-compose.cluster.yml",
        "kubernetes/redis/",
        "proto-docs/storage.md",
        "proto-docs/cluster.md",
    ] {
        p.check(
            section.contains(must),
            format!("\"Several nodes on Redis\" does not mention {must}"),
        );
    }

    // Links: files relative to deploy/ exist, anchors name headings.
    let anchors = markdown_anchors(&readme);
    for part in readme.split("](").skip(1) {
        let target = part.split(')').next().unwrap_or("");
        if target.starts_with("http://") || target.starts_with("https://") {
            continue;
        }
        let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
        if file.is_empty() {
            p.check(
                anchors.contains(anchor),
                format!("link to #{anchor}: no such heading"),
            );
            continue;
        }
        let path = deploy_dir().join(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => p.check(
                anchor.is_empty() || markdown_anchors(&text).contains(anchor),
                format!("link to {target}: no such heading in {file}"),
            ),
            Err(_) => p.check(path.exists(), format!("link to {target}: no such file")),
        }
    }
    p.finish();
}
