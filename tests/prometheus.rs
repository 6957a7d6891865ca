//! The chart's alert rules and dashboard against a real Prometheus (Debian's package):
//! the rendered PrometheusRule passes `promtool check rules`, every alert and recording
//! rule has a `promtool test rules` case on series shaped like a scrape of the mirror, and
//! a Prometheus server scraping a running cluster (bucket, two replicas, an upstream with
//! Docker Hub's rate-limit headers) answers every query of the dashboard with data.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::garage::{require_garage, Garage};
use common::passthrough::Passthrough;
use common::*;
use serde_yaml::Value;
use tempfile::TempDir;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/entrepot")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The value at `.Values.<path>` of the chart's defaults, as text.
fn value(values: &Value, path: &str) -> String {
    let v = path
        .split('.')
        .try_fold(values, |v, k| v.get(k))
        .unwrap_or_else(|| panic!(".Values.{path} is not in values.yaml"));
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        other => panic!(".Values.{path}: not a scalar: {other:?}"),
    }
}

/// Renders `templates/prometheusrule.yaml` with the chart's default values, for the
/// template actions it uses (helm is not packaged where CI runs): `.Values` scalars,
/// `mulf X 100`, the escaped `{{ "{{" }}` of Prometheus' own templates; the
/// `include`/`with`/`if` lines only shape metadata and are dropped. Returns the `spec`
/// as a Prometheus rule file.
fn rendered_rules() -> String {
    let values: Value =
        serde_yaml::from_str(&read(&chart().join("values.yaml"))).expect("values.yaml");
    let text = read(&chart().join("templates/prometheusrule.yaml"))
        .replace(r#"{{ "{{" }}"#, "\u{1}")
        .replace(r#"{{ "}}" }}"#, "\u{2}");
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("{{-") {
            continue;
        }
        let mut line = line.to_string();
        while let Some(start) = line.find("{{") {
            let end = start + line[start..].find("}}").expect("closed action") + 2;
            let action = line[start + 2..end - 2].trim();
            let words: Vec<&str> = action.split_whitespace().collect();
            let rendered = match words.as_slice() {
                [v] if v.starts_with(".Values.") => value(&values, &v[8..]),
                ["mulf", v, n] if v.starts_with(".Values.") => {
                    let x: f64 = value(&values, &v[8..]).parse().expect("number");
                    let n: f64 = n.parse().expect("number");
                    format!("{}", x * n)
                }
                ["include", "\"entrepot.fullname\"", "."] => "entrepot".into(),
                _ => panic!("template action not understood by this test: {action}"),
            };
            line.replace_range(start..end, &rendered);
        }
        out.push_str(&line.replace('\u{1}', "{{").replace('\u{2}', "}}"));
        out.push('\n');
    }
    let doc: Value = serde_yaml::from_str(&out).expect("rendered PrometheusRule is YAML");
    assert_eq!(doc["kind"], "PrometheusRule");
    serde_yaml::to_string(&doc["spec"]).expect("spec")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_chart_rules_pass_promtool_and_each_alert_fires_when_it_should() {
    if !require(&["promtool"]) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    std::fs::write(tmp.path().join("rules.yml"), rendered_rules()).unwrap();
    let checked = promtool(&["check", "rules", "rules.yml"], tmp.path());
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/alerts.test.yml");
    std::fs::copy(&tests, tmp.path().join("alerts.test.yml")).unwrap();
    let tested = promtool(&["test", "rules", "alerts.test.yml"], tmp.path());
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert of the chart has a case.
    let cases = read(&tests);
    let rules: Value = serde_yaml::from_str(&rendered_rules()).unwrap();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
            assert!(
                cases.contains(name),
                "{name} has no case in tests/data/alerts.test.yml"
            );
        }
    }
}

/// Every `expr` of the dashboard.
fn dashboard_queries() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read(&chart().join("dashboards/entrepot.json"))).expect("json");
    dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect()
}

struct Prometheus {
    port: u16,
    _proc: Proc,
}

impl Prometheus {
    /// A Prometheus server scraping `targets` every second, with the chart's rules.
    fn start(dir: &Path, targets: &[String]) -> Prometheus {
        let port = free_port();
        std::fs::write(dir.join("rules.yml"), rendered_rules()).unwrap();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{}']\n\
                 scrape_configs:\n  - job_name: entrepot\n    static_configs:\n      - targets: [{}]\n",
                dir.join("rules.yml").display(),
                list.join(", ")
            ),
        )
        .unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let proc = Proc::spawn("prometheus", cmd, &dir.join("prometheus.log"));
        wait_port(port);
        Prometheus { port, _proc: proc }
    }

    /// The number of series a query returns now.
    fn series(&self, query: &str) -> usize {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let r = agent()
            .get(&url)
            .query("query", query)
            .call()
            .map(|r| r.into_string().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&r).expect("json");
        assert_eq!(v["status"], "success", "{query}: {r}");
        v["data"]["result"].as_array().map_or(0, Vec::len)
    }
}

/// A real Prometheus scrapes two replicas on a bucket that pulled an image through an
/// upstream with Docker Hub's rate-limit headers; every dashboard query gets data, the
/// recording rules evaluate, and the rules load without errors.
#[test]
fn a_real_prometheus_answers_every_dashboard_query_with_data() {
    if !require(PEERS) || !require(&["prometheus"]) {
        return;
    }
    let Some(bin) = require_garage() else {
        return;
    };
    let g = Garage::start(&bin);
    let up = Registry::start(Auth::Anonymous);
    let hub = Passthrough::start(&up.url());
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("app", &[("a", &noise(300_000, 271))]);
    layout.push("app", &format!("{}/library/app:1", up.host()), None);
    let replicas = common::garage::replicas(&g, 2, &hub.url(), "");
    for m in &replicas {
        wait_until("peers up", Duration::from_secs(20), || {
            m.metric("entrepot_cluster_peers", &[("state", "up")]) == 2.0
        });
    }
    let targets: Vec<String> = replicas
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.port))
        .collect();
    let prom = Prometheus::start(tmp.path(), &targets);
    // Pulls on both replicas for a while: cold (upstream, peers, bucket), then warm.
    let layers = layout.layers(&digest);
    let pull = |m: &Mirror| pull_checked(&m.url(), "docker.io/library/app", "1", &layers, None);
    let queries = dashboard_queries();
    let mut missing = queries.clone();
    for _ in 0..60 {
        for m in &replicas {
            pull(m);
        }
        std::thread::sleep(Duration::from_millis(500));
        missing.retain(|q| prom.series(q) == 0);
        if missing.is_empty() {
            break;
        }
    }
    assert!(
        missing.is_empty(),
        "dashboard queries with no data after 30 s of scrapes: {missing:#?}"
    );
    assert!(queries.len() >= 20, "{queries:?}");
    // The rules loaded and evaluate without errors.
    let r = agent()
        .get(&format!("http://127.0.0.1:{}/api/v1/rules", prom.port))
        .call()
        .expect("rules")
        .into_string()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r).unwrap();
    let rules: Vec<&serde_json::Value> = v["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(rules.len() >= 12, "{r}");
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
}
