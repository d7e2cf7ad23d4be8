//! `deploy/grafana-dashboard.json`: every query names Herald's metrics and labels.

use crate::shared::*;

// ---------------------------------------------------------------------------
// Grafana dashboard
// ---------------------------------------------------------------------------

/// Labels a series of this name carries, and whether it is a counter-like
/// series (to be read through rate()/increase()).
pub(crate) fn series(name: &str) -> Option<(BTreeSet<&'static str>, bool, &'static [Label])> {
    for &(metric, kind, labels) in METRICS {
        let mut set: BTreeSet<&str> = labels
            .iter()
            .map(|(l, _)| *l)
            .chain(TARGET_LABELS.iter().copied())
            .collect();
        let counter_like = match kind {
            MetricType::Gauge if name == metric => false,
            MetricType::Counter if name == metric => true,
            MetricType::Histogram if name == format!("{metric}_bucket") => {
                set.insert("le");
                true
            }
            MetricType::Histogram
                if name == format!("{metric}_sum") || name == format!("{metric}_count") =>
            {
                true
            }
            _ => continue,
        };
        return Some((set, counter_like, labels));
    }
    None
}

pub(crate) fn metric_of_series(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if METRICS
                .iter()
                .any(|(m, t, _)| *m == base && *t == MetricType::Histogram)
            {
                return base;
            }
        }
    }
    name
}

/// Grafana's variables, replaced by values PromQL accepts.
pub(crate) fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    // Any other variable (here: $instance) stands inside a regex matcher.
    while let Some(start) = out.find('$') {
        let rest = &out[start + 1..];
        let len = if rest.starts_with('{') {
            rest.find('}').map(|i| i + 1).unwrap_or(rest.len())
        } else {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())
        };
        out.replace_range(start..start + 1 + len, ".*");
    }
    out
}

/// Walks a PromQL expression: checks every selector against METRICS and
/// returns the labels its result carries.
pub(crate) fn check_promql(
    expr: &Expr,
    in_rate: bool,
    used: &mut BTreeSet<String>,
    problems: &mut Vec<String>,
) -> BTreeSet<String> {
    let mut check_selector = |vs: &promql::VectorSelector, as_range: bool| -> BTreeSet<String> {
        let Some(name) = vs.name.as_deref() else {
            problems.push("a selector without a metric name".into());
            return BTreeSet::new();
        };
        let Some((labels, counter_like, values)) = series(name) else {
            problems.push(format!("`{name}` is not a Herald metric"));
            return BTreeSet::new();
        };
        used.insert(metric_of_series(name).to_string());
        if counter_like && !(as_range && in_rate) {
            problems.push(format!(
                "counter `{name}` must be read through rate() or increase()"
            ));
        }
        if !counter_like && in_rate {
            problems.push(format!("gauge `{name}` inside rate()/increase()"));
        }
        for m in &vs.matchers.matchers {
            if !labels.contains(m.name.as_str()) {
                problems.push(format!("`{name}` has no label `{}`", m.name));
            }
            let allowed = values
                .iter()
                .find(|(l, _)| *l == m.name)
                .map(|(_, v)| *v)
                .unwrap_or(&[]);
            if matches!(m.op, MatchOp::Equal)
                && !allowed.is_empty()
                && !allowed.contains(&m.value.as_str())
            {
                problems.push(format!(
                    "`{name}{{{}=\"{}\"}}`: the value is not one of {allowed:?}",
                    m.name, m.value
                ));
            }
        }
        labels.into_iter().map(String::from).collect()
    };
    match expr {
        Expr::VectorSelector(vs) => check_selector(vs, false),
        Expr::MatrixSelector(ms) => check_selector(&ms.vs, true),
        Expr::Call(call) => {
            let name = call.func.name;
            let rate = matches!(name, "rate" | "irate" | "increase");
            let mut labels = BTreeSet::new();
            for arg in &call.args.args {
                labels.extend(check_promql(arg, rate, used, problems));
            }
            if name == "histogram_quantile" && !labels.remove("le") {
                problems.push(
                    "histogram_quantile over series without an `le` label (missing `by (le)`?)"
                        .into(),
                );
            }
            labels
        }
        Expr::Aggregate(agg) => {
            let inner = check_promql(&agg.expr, false, used, problems);
            if let Some(param) = &agg.param {
                check_promql(param, false, used, problems);
            }
            match &agg.modifier {
                Some(LabelModifier::Include(by)) => {
                    for l in &by.labels {
                        if !inner.contains(l) {
                            problems.push(format!(
                                "aggregation by `{l}`, a label the aggregated series do not have"
                            ));
                        }
                    }
                    by.labels.iter().cloned().collect()
                }
                Some(LabelModifier::Exclude(without)) => inner
                    .into_iter()
                    .filter(|l| !without.labels.contains(l))
                    .collect(),
                None => BTreeSet::new(),
            }
        }
        Expr::Binary(b) => {
            let mut labels = check_promql(&b.lhs, false, used, problems);
            labels.extend(check_promql(&b.rhs, false, used, problems));
            labels
        }
        Expr::Paren(e) => check_promql(&e.expr, in_rate, used, problems),
        Expr::Unary(e) => check_promql(&e.expr, in_rate, used, problems),
        Expr::Subquery(e) => check_promql(&e.expr, false, used, problems),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => BTreeSet::new(),
    }
}

#[test]
pub(crate) fn grafana_dashboard_queries_only_herald_metrics() {
    let mut p = Problems::new("grafana-dashboard.json");
    let dash: Json = match serde_json::from_str(&read("grafana-dashboard.json")) {
        Ok(d) => d,
        Err(e) => panic!("deploy/grafana-dashboard.json is not valid JSON: {e}"),
    };
    p.check(
        dash["schemaVersion"].as_i64().is_some_and(|v| v >= 36),
        "schemaVersion must be 36 or later",
    );
    p.check(
        dash["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "uid must be set (at most 40 characters)",
    );
    p.check(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "title must be set",
    );

    // Data source chosen by a variable, so the dashboard imports anywhere.
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ds_var = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus");
    p.check(
        ds_var.is_some(),
        "no Prometheus data-source variable in templating",
    );
    let ds_ref = format!(
        "${{{}}}",
        ds_var
            .and_then(|v| v["name"].as_str())
            .unwrap_or("datasource")
    );

    let mut used = BTreeSet::new();
    for var in vars.iter().filter(|v| v["type"] == "query") {
        let q = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or("");
        if let Some(args) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let (metric, label) = args.rsplit_once(',').unwrap_or((args, ""));
            match series(metric.trim()) {
                Some((labels, ..)) => p.check(
                    labels.contains(label.trim()),
                    format!("variable query {q}: no label {label}"),
                ),
                None => p.add(format!("variable query {q}: not a Herald metric")),
            }
        }
    }

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(i64, i64, i64, i64, String)> = Vec::new();
    let panels = dash["panels"].as_array().cloned().unwrap_or_default();
    p.check(!panels.is_empty(), "no panels");
    for panel in panels
        .iter()
        .flat_map(|pn| std::iter::once(pn).chain(pn["panels"].as_array().into_iter().flatten()))
    {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_string();
        p.check(
            ids.insert(panel["id"].as_i64().unwrap_or(-1)),
            format!("panel {title:?}: missing or duplicate id"),
        );
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64(),
            g["y"].as_i64(),
            g["w"].as_i64(),
            g["h"].as_i64(),
        );
        match (x, y, w, h) {
            (Some(x), Some(y), Some(w), Some(h)) if x >= 0 && w > 0 && h > 0 && x + w <= 24 => {
                for (bx, by, bw, bh, other) in &boxes {
                    if x < bx + bw && *bx < x + w && y < by + bh && *by < y + h {
                        p.add(format!("panels {other:?} and {title:?} overlap"));
                    }
                }
                boxes.push((x, y, w, h, title.clone()));
            }
            _ => p.add(format!(
                "panel {title:?}: gridPos {g} is not within the 24-column grid"
            )),
        }
        if panel["type"] == "row" {
            continue;
        }
        p.check(
            panel["datasource"]["uid"] == ds_ref.as_str(),
            format!("panel {title:?}: datasource is not {ds_ref}"),
        );
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        p.check(!targets.is_empty(), format!("panel {title:?}: no queries"));
        for t in targets {
            let Some(expr) = t["expr"].as_str() else {
                p.add(format!("panel {title:?}: a target without expr"));
                continue;
            };
            let parsed = match promql::parse(&substitute_grafana_variables(expr)) {
                Ok(e) => e,
                Err(e) => {
                    p.add(format!(
                        "panel {title:?}: `{expr}` is not valid PromQL: {e}"
                    ));
                    continue;
                }
            };
            let mut problems = Vec::new();
            let labels = check_promql(&parsed, false, &mut used, &mut problems);
            for problem in problems {
                p.add(format!("panel {title:?}: {problem} in `{expr}`"));
            }
            // Legend placeholders must name labels the result has.
            let legend = t["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                let label = part.split("}}").next().unwrap_or("").trim();
                p.check(
                    labels.contains(label),
                    format!("panel {title:?}: legend {{{{{label}}}}} is not a label of `{expr}`"),
                );
            }
        }
    }
    // Every metric has a panel, so a metric added to the code (and to METRICS)
    // shows up on the dashboard too.
    for (metric, ..) in METRICS {
        p.check(used.contains(*metric), format!("no panel shows {metric}"));
    }
    p.finish();
}
