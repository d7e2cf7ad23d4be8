//! The settings table against README.md, `deploy/herald.toml` and the metrics
//! the code registers.

use crate::shared::*;

// ---------------------------------------------------------------------------
// The tables above, against the code
// ---------------------------------------------------------------------------

#[test]
pub(crate) fn settings_and_metrics_tables_match_the_code() {
    let mut p = Problems::new("../tests/deploy_files/shared.rs");
    // Settings come from the library's table; what this file derives from it
    // (a default written as TOML) must read back as the code's default.
    for s in SETTINGS {
        let Some((_, Some(_))) = setting(s.name) else {
            continue;
        };
        let ours = match default_value(s.name) {
            toml::Value::String(v) => v,
            toml::Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        p.check(
            ours == s.default_text(),
            format!(
                "`{}`: default {ours:?} here, {:?} in src/config.rs",
                s.name,
                s.default_text()
            ),
        );
    }
    p.check(
        WRITTEN_EMPTY.iter().all(|(k, _)| setting(k).is_some()),
        format!("WRITTEN_EMPTY names a setting src/config.rs lacks: {WRITTEN_EMPTY:?}"),
    );

    // Metrics: every one listed here is registered in src/metrics.rs (the
    // same rule for ones only the code has).
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"))
        .expect("src/metrics.rs");
    let registered: BTreeSet<String> = src
        .split("\"herald_")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|name| format!("herald_{name}"))
        .collect();
    let listed: BTreeSet<String> = METRICS.iter().map(|(m, ..)| m.to_string()).collect();
    let missing: Vec<&String> = listed.difference(&registered).collect();
    p.check(
        missing.is_empty(),
        format!("METRICS lists {missing:?}, which src/metrics.rs does not register"),
    );
    let unlisted: Vec<&String> = registered.difference(&listed).collect();
    p.check(
        unlisted.is_empty(),
        format!("metrics in src/metrics.rs that deploy/ does not list: {unlisted:?}"),
    );
    p.finish();
}

// ---------------------------------------------------------------------------
// README.md's configuration reference
// ---------------------------------------------------------------------------

/// The rows of README.md's "Configuration reference" table: the settings a
/// row names (`a`, `b` in its first cell) and its default cell, backticks
/// removed.
pub(crate) fn readme_settings_rows(readme: &str) -> Vec<(Vec<String>, String)> {
    let section = readme
        .split("### Configuration reference")
        .nth(1)
        .expect("README.md has a Configuration reference section");
    section
        .lines()
        .skip_while(|l| !l.starts_with("| setting |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let names = cells[1]
                .split(',')
                .map(|n| n.trim().trim_matches('`').to_string())
                .collect();
            (names, cells[2].replace('`', ""))
        })
        .collect()
}

#[test]
pub(crate) fn readme_configuration_table_matches_the_settings() {
    let mut p = Problems::new("../README.md");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let rows = readme_settings_rows(&readme);
    p.check(!rows.is_empty(), "the configuration table has no rows");
    let mut seen = BTreeSet::new();
    for (names, default) in &rows {
        for name in names {
            let Some(s) = herald::config::setting_named(name) else {
                p.add(format!(
                    "`{name}` is in the configuration table but is no setting"
                ));
                continue;
            };
            p.check(
                seen.insert(name.clone()),
                format!("`{name}` is listed twice"),
            );
            p.check(
                *default == s.shown_default(),
                format!(
                    "`{name}`: default {default:?} in README.md, {:?} in src/config.rs",
                    s.shown_default()
                ),
            );
        }
    }
    for s in SETTINGS {
        p.check(
            seen.contains(s.name),
            format!("`{}` is missing from the configuration table", s.name),
        );
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// herald.toml
// ---------------------------------------------------------------------------

#[test]
pub(crate) fn example_config_names_and_documents_every_setting() {
    let mut p = Problems::new("herald.toml");
    let text = read("herald.toml");
    let active = check_herald_toml(&text, &mut p, "herald.toml");
    let lines: Vec<&str> = text.lines().collect();

    for key in SETTINGS.iter().map(|s| s.name) {
        let (_, default) = setting(key).expect("a setting");
        // Where the setting is: an active `key = ...` line, or, for settings
        // without a default, a commented-out `# key = ...` example.
        let active_line = lines.iter().position(|l| toml_key_of(l) == Some(key));
        let commented_line = lines.iter().position(|l| {
            l.strip_prefix('#')
                .map(str::trim_start)
                .and_then(toml_key_of)
                == Some(key)
        });
        let line = match (&default, active_line, commented_line) {
            (Some(_), Some(i), _) => i,
            (Some(_), None, _) => {
                p.add(format!(
                    "`{key}` has a default but no active `{key} = ...` line"
                ));
                continue;
            }
            (None, Some(i), _) => {
                p.add(format!(
                    "`{key}` has no default: show it commented out, so the example runs as is \
                     (line {})",
                    i + 1
                ));
                i
            }
            (None, None, Some(i)) => {
                let example = lines[i].trim_start_matches('#');
                check_herald_toml(example, &mut p, &format!("commented example of `{key}`"));
                i
            }
            (None, None, None) => {
                p.add(format!(
                    "`{key}` is not mentioned (neither set nor commented out)"
                ));
                continue;
            }
        };
        // The comment block right above it says what it does and its default.
        let doc: Vec<&str> = lines[..line]
            .iter()
            .rev()
            .skip_while(|l| {
                l.trim_start().starts_with('#')
                    && toml_key_of(l.trim_start_matches(['#', ' '])).is_some()
            })
            .take_while(|l| l.trim_start().starts_with('#'))
            .copied()
            .collect();
        p.check(
            doc.len() >= 2,
            format!("`{key}` needs a comment of at least two lines above it"),
        );
        p.check(
            doc.iter().any(|l| l.contains("Default")),
            format!("the comment above `{key}` does not state its default (\"Default: ...\")"),
        );
        // The example shows the real defaults.
        if let (Some(written), Some(value)) = (&default, active.get(key)) {
            p.check(
                *value == default_value(key),
                format!("`{key}` = {value} in the example, but the default is {written}"),
            );
        }
    }
    p.finish();
}

/// The key of a `key = value` TOML line, if it is one.
pub(crate) fn toml_key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(key)
}
