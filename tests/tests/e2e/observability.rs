//! Metrics, traces and logs of real processes: the scheduler's reconciliation seen through
//! `/metrics` (checked by `promtool` and against the Grafana dashboard), one sync's trace
//! collected by an OTLP/HTTP receiver, and the job fields on every JSON log line.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::Value;
use syncfleet_shared::db::entities::sync_run;
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::{TestEnv, free_ports, http_get, metric_value};
use syncfleet_tests::sim::SimConfig;
use tokio::io::AsyncWriteExt;

use crate::{LONG, SHORT};

const DASHBOARD: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/dashboards/syncfleet-fleet.json");

/// `promtool check metrics` on an exposition: returns its complaints (empty when clean).
async fn promtool_check_metrics(text: &str) -> String {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (script/test installs Debian's prometheus package)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool ran");
    let complaints =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        complaints.trim().to_string()
    } else {
        format!("exit {}: {complaints}", out.status)
    }
}

/// Waits for a final run of `database` with `reason`.
async fn wait_run_with_reason(env: &TestEnv, database: uuid::Uuid, reason: &str) -> sync_run::Model {
    let deadline = Instant::now() + LONG;
    loop {
        let runs = sync_run::Entity::find()
            .filter(sync_run::Column::DatabaseId.eq(database))
            .filter(sync_run::Column::Reason.eq(reason))
            .all(&env.db)
            .await
            .expect("runs");
        if let Some(run) = runs.into_iter().find(|r| sync_run::status::is_final(&r.status)) {
            return run;
        }
        assert!(Instant::now() < deadline, "no final {reason} run: {}", env.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut token = String::new();
    let mut in_braces = false;
    let mut in_quotes = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if in_quotes {
            in_quotes = c != '"';
            continue;
        }
        match c {
            '"' => in_quotes = true,
            '{' => in_braces = true,
            '}' => in_braces = false,
            _ => {}
        }
        if !in_braces && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            token.push(c);
            continue;
        }
        if ["syncfleet_", "rabbitmq_", "process_"].iter().any(|p| token.starts_with(p)) {
            names.insert(std::mem::take(&mut token));
        }
        token.clear();
    }
    names
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("dashboard file");
    serde_json::from_str(&text).expect("dashboard is JSON")
}

fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

fn exposes(text: &str, name: &str) -> bool {
    text.lines()
        .any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
}

#[tokio::test]
async fn the_scheduler_reconciles_and_live_metrics_pass_promtool_and_feed_every_dashboard_query() {
    let sim = SimConfig { pages: 250, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    let [worker_port, producer_port] = free_ports().expect("ports");
    let worker_addr = format!("127.0.0.1:{worker_port}");
    env.spawn_worker_with(2, &["--metrics-addr", &worker_addr], &[]).expect("worker");
    let producer_addr = format!("127.0.0.1:{producer_port}");
    env.spawn_producer(&["--metrics-addr", &producer_addr], &[("SYNCFLEET_SCHEDULER__TICK_SECS", "1")])
        .expect("producer serve");

    // Never synced: the scheduler publishes a full reconciliation at once.
    let run = wait_run_with_reason(&env, db, "reconcile").await;
    assert_eq!((run.mode.as_str(), run.status.as_str()), ("full", "succeeded"), "{run:?}");
    assert_eq!(run.pages_created, 250);

    for port in [worker_port, producer_port] {
        assert_eq!(http_get(port, "/healthz", SHORT).await.expect("healthz").0, 200);
        assert_eq!(http_get(port, "/readyz", SHORT).await.expect("readyz").0, 200);
    }
    let (_, worker) = http_get(worker_port, "/metrics", SHORT).await.expect("worker metrics");
    assert_eq!(metric_value(&worker, "syncfleet_pages_total{change=\"created\"}"), Some(250.0), "{worker}");
    assert_eq!(metric_value(&worker, "syncfleet_jobs_processed_total{outcome=\"succeeded\"}"), Some(1.0));
    assert_eq!(metric_value(&worker, "syncfleet_fence_rejected_writes_total"), Some(0.0));
    // Two normal slots plus the default one for the high-priority queue.
    assert_eq!(metric_value(&worker, "syncfleet_worker_concurrency"), Some(3.0));
    assert_eq!(metric_value(&worker, "syncfleet_job_duration_seconds_count"), Some(1.0));
    let queries = metric_value(
        &worker,
        "syncfleet_notion_requests_total{endpoint=\"/v1/data_sources/{data_source_id}/query\",integration=\"acme\",status_class=\"2xx\"}",
    );
    assert_eq!(queries, Some(3.0), "250 pages take 3 queries");
    assert!(exposes(&worker, "process_resident_memory_bytes"));

    // The freshness gauge follows the run within a tick or two.
    let slug_line = "syncfleet_database_last_success_timestamp_seconds{database=";
    let deadline = Instant::now() + SHORT;
    let producer = loop {
        let (_, text) = http_get(producer_port, "/metrics", SHORT).await.expect("producer metrics");
        if text.lines().any(|l| l.starts_with(slug_line)) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(producer.lines().any(|l| l.starts_with(slug_line)), "{producer}");
    assert_eq!(metric_value(&producer, "syncfleet_jobs_published_total{reason=\"reconcile\"}"), Some(1.0));

    for (who, text) in [("worker", &worker), ("producer", &producer)] {
        assert_eq!(promtool_check_metrics(text).await, "", "promtool complains about the {who}'s metrics");
        assert!(!text.contains(&env.token), "the token leaked into the {who}'s metrics");
    }

    // Every metric a dashboard query reads exists in what the binaries (or RabbitMQ) export.
    // RabbitMQ's detailed queue metrics appear some seconds after a queue is created (on a
    // fresh machine the queues are new): wait for them, bounded, instead of reading once.
    let wanted: Vec<String> = panels(&dashboard())
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .flat_map(|t| metric_names(t["expr"].as_str().unwrap_or_default()))
        .filter(|name| name.starts_with("rabbitmq_"))
        .collect();
    let deadline = Instant::now() + LONG;
    let rabbit = loop {
        let text = reqwest::get(
            "http://127.0.0.1:15692/metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count",
        )
        .await
        .expect("RabbitMQ's Prometheus endpoint (script/services enables rabbitmq_prometheus)")
        .text()
        .await
        .expect("rabbit metrics");
        if wanted.iter().all(|name| exposes(&text, name)) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let dash = dashboard();
    let mut missing = Vec::new();
    for panel in panels(&dash) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            for name in metric_names(expr) {
                let source =
                    if name.starts_with("rabbitmq_") { &rabbit } else { &format!("{worker}{producer}") };
                if !exposes(source, &name) {
                    missing.push(format!("{name} (panel {:?})", panel["title"]));
                }
            }
        }
    }
    assert!(missing.is_empty(), "dashboard queries read metrics nobody exports: {missing:#?}");
    env.cleanup().await;
}

#[tokio::test]
async fn every_dashboard_panel_has_a_unit_a_description_and_a_templated_datasource() {
    let dash = dashboard();
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for wanted in ["datasource", "namespace", "integration", "instance"] {
        assert!(vars.contains(&wanted), "variable {wanted} is missing: {vars:?}");
    }
    let panels = panels(&dash);
    assert!(panels.len() >= 15, "five rows of panels");
    let rows: Vec<&str> = dash["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(rows.len(), 5, "RED, budget, queue, data, coordination: {rows:?}");
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(panel["description"].as_str().is_some_and(|d| d.len() > 10), "{title}: description");
        assert!(
            panel["fieldConfig"]["defaults"]["unit"].as_str().is_some_and(|u| !u.is_empty()),
            "{title}: unit"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}: datasource must be the variable");
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}: target datasource");
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!metric_names(expr).is_empty(), "{title}: {expr}");
            if expr.contains("rate(") || expr.contains("increase(") {
                assert!(expr.contains("$__rate_interval"), "{title}: use $__rate_interval: {expr}");
            }
        }
    }
}

#[test]
fn the_committed_dashboard_is_what_its_generator_writes() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/build_dashboard.py");
    let out = std::env::temp_dir().join(format!("syncfleet-dashboard-{}.json", std::process::id()));
    let status = std::process::Command::new("python3").arg(script).arg(&out).status().expect("python3 runs");
    assert!(status.success());
    let generated: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("generated")).expect("json");
    let _ = std::fs::remove_file(&out);
    assert_eq!(generated, dashboard(), "run deploy/grafana/build_dashboard.py and commit the result");
}

#[tokio::test]
async fn promtool_accepts_the_alert_rules_and_their_unit_tests_pass() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus");
    for args in [
        vec!["check", "rules", "rules/syncfleet.rules.yml"],
        vec!["test", "rules", "tests/syncfleet.rules.test.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out =
            std::process::Command::new("promtool").args(&args).current_dir(dir).output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A minimal OTLP/HTTP (JSON) receiver: keeps every exported span.
async fn otlp_receiver() -> (u16, Arc<Mutex<Vec<Value>>>) {
    let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                if let Ok(doc) = serde_json::from_slice::<Value>(&body) {
                    let mut sink = sink.lock().expect("lock");
                    for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
                        let service = rs["resource"]["attributes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|a| a["key"] == "service.name")
                            .map(|a| a["value"]["stringValue"].clone())
                            .unwrap_or(Value::Null);
                        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                            for span in ss["spans"].as_array().into_iter().flatten() {
                                let mut span = span.clone();
                                span["service"] = service.clone();
                                sink.push(span);
                            }
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, spans)
}

fn kind(span: &Value) -> i64 {
    match &span["kind"] {
        Value::Number(n) => n.as_i64().unwrap_or_default(),
        Value::String(s) if s.ends_with("PRODUCER") => 4,
        Value::String(s) if s.ends_with("CONSUMER") => 5,
        Value::String(s) if s.ends_with("CLIENT") => 3,
        _ => 0,
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"].as_array()?.iter().find(|a| a["key"] == key).map(|a| &a["value"])
}

#[tokio::test]
async fn a_sync_is_one_trace_from_publish_to_notion_requests_and_its_log_lines_name_the_job() {
    let (otlp_port, spans) = otlp_receiver().await;
    let endpoint = format!("http://127.0.0.1:{otlp_port}");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let sim = SimConfig { pages: 250, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    let mut worker_env = otel.to_vec();
    worker_env.push(("SYNCFLEET_LOG_FORMAT", "json"));
    let worker = env.spawn_worker_with(1, &[], &worker_env).expect("worker");

    // The producer CLI publishes inside its `publish syncfleet.jobs` span.
    let database = db.to_string();
    let status = env
        .producer_command(&["enqueue", "--database", &database, "--mode", "full"])
        .expect("producer")
        .envs(otel)
        .status()
        .await
        .expect("enqueue ran");
    assert!(status.success());
    let traced = wait_run_with_reason(&env, db, "manual").await;
    assert_eq!(traced.status, "succeeded");
    // A job from a service that sends no traceparent starts a trace of its own.
    let untraced = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
    env.wait_run(untraced, LONG).await.expect("untraced run");
    env.signal_worker(worker, nix::sys::signal::Signal::SIGTERM).expect("sigterm");
    assert_eq!(env.wait_worker_exit(worker, SHORT).await.expect("exit"), Some(0));

    let spans = spans.lock().expect("lock").clone();
    let by_id: HashMap<&str, &Value> =
        spans.iter().filter_map(|s| Some((s["spanId"].as_str()?, s))).collect();
    let publish = spans
        .iter()
        .find(|s| s["name"] == "publish syncfleet.jobs")
        .unwrap_or_else(|| panic!("no publish span among {} spans", spans.len()));
    assert_eq!(kind(publish), 4, "publish is a producer span");
    assert_eq!(publish["service"], "syncfleet-producer");
    let message_id =
        |s: &Value| attr(s, "messaging.message.id").and_then(|v| v["stringValue"].as_str()).map(String::from);
    let process = spans
        .iter()
        .find(|s| s["name"] == "process syncfleet.jobs" && message_id(s) == Some(traced.id.to_string()))
        .expect("the traced job's process span");
    assert_eq!(kind(process), 5, "process is a consumer span");
    assert_eq!(process["traceId"], publish["traceId"], "the worker continues the producer's trace");
    assert_eq!(process["parentSpanId"], publish["spanId"]);
    assert_eq!(attr(process, "messaging.system").and_then(|v| v["stringValue"].as_str()), Some("rabbitmq"));

    let descends_from_process = |span: &Value| {
        let mut current = span;
        for _ in 0..20 {
            let Some(parent) = current["parentSpanId"].as_str().filter(|p| !p.is_empty()) else {
                return false;
            };
            if parent == process["spanId"].as_str().unwrap_or_default() {
                return true;
            }
            match by_id.get(parent) {
                Some(p) => current = p,
                None => return false,
            }
        }
        false
    };
    let in_trace: Vec<&Value> = spans.iter().filter(|s| s["traceId"] == process["traceId"]).collect();
    let requests: Vec<&&Value> = in_trace.iter().filter(|s| s["name"] == "notion.request").collect();
    let template =
        |r: &Value| attr(r, "url.template").and_then(|v| v["stringValue"].as_str()).map(String::from);
    let queries = requests
        .iter()
        .filter(|r| template(r).as_deref() == Some("/v1/data_sources/{data_source_id}/query"))
        .count();
    assert_eq!(queries, 3, "250 pages take 3 queries");
    assert!(
        requests.iter().any(|r| template(r).as_deref() == Some("/v1/data_sources/{data_source_id}")),
        "the schema read is traced too"
    );
    for r in &requests {
        assert!(descends_from_process(r), "notion.request descends from the process span");
        assert_eq!(kind(r), 3, "notion.request is an HTTP client span");
        assert!(attr(r, "http.response.status_code").is_some(), "{r}");
    }
    for name in ["budget.acquire", "db.upsert", "job.process"] {
        let found: Vec<&&Value> = in_trace.iter().filter(|s| s["name"] == name).collect();
        assert!(
            !found.is_empty() && found.iter().all(|s| descends_from_process(s)),
            "{name} spans in the trace"
        );
    }
    let other = spans
        .iter()
        .find(|s| s["name"] == "process syncfleet.jobs" && message_id(s) == Some(untraced.to_string()))
        .expect("the untraced job's process span");
    assert_ne!(other["traceId"], publish["traceId"]);
    assert!(
        other["parentSpanId"].as_str().unwrap_or_default().is_empty(),
        "a new trace starts at the worker"
    );
    let exported = serde_json::to_string(&spans).expect("json");
    assert!(!exported.contains(&env.token), "the token leaked into a span");

    // Every JSON log line written while processing a job names the job, database and attempt.
    let log = env.log();
    let mut finished_lines = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let entry: Value = serde_json::from_str(line).expect("one JSON object per line");
        let in_job =
            entry["spans"].as_array().into_iter().flatten().any(|s| s["name"] == "process syncfleet.jobs");
        if !in_job {
            continue;
        }
        if entry["message"] == "Sync finished." {
            finished_lines += 1;
        }
        let field = |k: &str| entry["spans"].as_array().into_iter().flatten().find_map(|s| s.get(k).cloned());
        for key in ["job.id", "database", "attempt"] {
            assert!(field(key).is_some(), "log line without {key}: {line}");
        }
    }
    assert_eq!(finished_lines, 2, "each job's summary line is one of its lines: {log}");
    assert!(!log.contains(&env.token), "the token leaked into the log");
    env.cleanup().await;
}
