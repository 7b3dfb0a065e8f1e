//! The control-plane HTTP API, served by a real `syncfleet-producer serve --api-addr` against
//! real PostgreSQL, RabbitMQ, Redis, a worker and notion-sim: authentication, validation, jobs
//! over HTTP, run history, statistics, Server-Sent Events with `Last-Event-ID`, the OpenAPI
//! document (fuzzed with schemathesis) and the status page in headless Chromium.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use syncfleet_shared::db::entities::sync_run;
use syncfleet_tests::harness::{Servers, TestEnv, free_port, http_get};
use syncfleet_tests::private::{PrivatePostgres, PrivateRabbit};
use syncfleet_tests::sim::SimConfig;

pub const TOKEN: &str = "api-token-alpha-7f3c";
const FILE_TOKEN: &str = "api-token-from-file-91be";

pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl Api {
    /// Starts `serve` with the API on a free port and waits for it to answer.
    pub async fn start(env: &mut TestEnv) -> Api {
        Self::start_with(env, &[]).await
    }

    /// As [`start`](Self::start), with more environment for the producer.
    pub async fn start_with(env: &mut TestEnv, extra: &[(&str, &str)]) -> Api {
        let port = free_port().expect("port");
        let token_file = std::env::temp_dir().join(format!("{}-tokens", env.name));
        std::fs::write(&token_file, format!("# operators\n{FILE_TOKEN}\n\n")).expect("token file");
        let addr = format!("127.0.0.1:{port}");
        let tokens = format!("{TOKEN}, second-token");
        let mut vars = vec![
            ("SYNCFLEET_API__TOKENS", tokens.as_str()),
            ("SYNCFLEET_API__TOKEN_FILE", token_file.to_str().expect("utf-8 path")),
            ("SYNCFLEET_SCHEDULER__DEFAULT_INTERVAL_SECS", "0"),
            ("SYNCFLEET_SCHEDULER__FULL_EVERY_SECS", "0"),
        ];
        vars.extend_from_slice(extra);
        env.spawn_producer(&["--api-addr", &addr], &vars).expect("producer");
        let (status, _) = http_get(port, "/openapi.json", Duration::from_secs(60)).await.expect("api up");
        assert_eq!(status, 200);
        Api { base: format!("http://{addr}"), client: reqwest::Client::new() }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req =
            self.client.request(method, format!("{}{path}", self.base)).timeout(Duration::from_secs(30));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let text = res.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(TOKEN), None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(TOKEN), Some(body)).await
    }

    async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PATCH, path, Some(TOKEN), Some(body)).await
    }

    /// Polls `GET /v1/jobs/{id}` until the run is final.
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, run) = self.get(&format!("/v1/jobs/{id}")).await;
            if status == 200 && run["is_final"] == json!(true) {
                return run;
            }
            assert!(Instant::now() < deadline, "run {id} not final within {timeout:?}: {run}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs `syncfleet-producer <args>` and returns its standard output; it must exit 0.
pub async fn cli_text(env: &TestEnv, args: &[&str]) -> String {
    let mut cmd = env.producer_command(args).expect("command");
    cmd.stdout(std::process::Stdio::piped());
    let out =
        tokio::time::timeout(Duration::from_secs(180), cmd.output()).await.expect("in time").expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args:?} exited {:?}: {stdout}\n{}", out.status, env.log_tail());
    stdout
}

/// The JSON documents `syncfleet-producer <args>` prints (one pretty document, or JSON lines).
async fn cli_json(env: &TestEnv, args: &[&str]) -> Vec<Value> {
    let stdout = cli_text(env, args).await;
    serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .map(|v| v.expect("JSON output"))
        .collect()
}

fn assert_field(resp: &(u16, Value), field: &str, what: &str) {
    assert_eq!(resp.0, 400, "{what}: {}", resp.1);
    assert_eq!(resp.1["error"]["code"], "bad_request", "{what}: {}", resp.1);
    assert_eq!(resp.1["error"]["field"], field, "{what}: {}", resp.1);
}

#[tokio::test]
async fn the_api_authenticates_validates_and_runs_a_job_whose_status_matches_sync_runs() {
    let mut env =
        TestEnv::start(SimConfig { pages: 240, databases: 2, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(2).expect("worker");
    let api = Api::start(&mut env).await;
    let simple = db.simple().to_string();

    // Authentication: 401 with a JSON error without a token, with a wrong one, with a prefix.
    for token in [None, Some("wrong"), Some(&TOKEN[..TOKEN.len() - 1]), Some("")] {
        let (status, body) = api.call(reqwest::Method::GET, "/v1/databases", token, None).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    for token in [TOKEN, "second-token", FILE_TOKEN] {
        assert_eq!(
            api.call(reqwest::Method::GET, "/v1/databases", Some(token), None).await.0,
            200,
            "{token}"
        );
    }

    // Validation: each kind of bad input is a 400 naming the field.
    assert_field(&api.post("/v1/jobs", json!({"database": "not-an-id"})).await, "database", "bad id");
    assert_field(
        &api.post("/v1/jobs", json!({"database": simple, "mode": "sideways"})).await,
        "mode",
        "bad mode",
    );
    assert_field(&api.post("/v1/jobs", json!({"database": simple, "mode": 5})).await, "mode", "mode type");
    assert_field(
        &api.post("/v1/jobs", json!({"database": simple, "priority": "urgent"})).await,
        "priority",
        "priority",
    );
    assert_field(
        &api.post("/v1/jobs", json!({"database": simple, "extra": 1})).await,
        "extra",
        "unknown field",
    );
    assert_field(&api.post("/v1/jobs", json!({"mode": "full"})).await, "database", "missing field");
    assert_field(&api.post("/v1/jobs", json!({"database": "x".repeat(100_000)})).await, "body", "oversized");
    let raw = api
        .client
        .post(format!("{}/v1/jobs", api.base))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"database\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(raw.status().as_u16(), 400);
    assert_field(&api.get("/v1/jobs/12345").await, "id", "bad path id");
    assert_field(&api.get("/v1/runs?limit=0").await, "limit", "limit range");
    assert_field(&api.get("/v1/runs?limit=abc").await, "limit", "limit type");
    assert_field(&api.get("/v1/runs?status=bogus").await, "status", "status");
    assert_field(&api.get("/v1/runs?since=yesterday").await, "since", "since");
    assert_field(&api.get("/v1/runs?cursor=zzz").await, "cursor", "cursor");
    // Valid RFC 3339 / well-formed cursors that PostgreSQL cannot take: still the client's error.
    assert_field(&api.get("/v1/runs?since=0000-06-01T00:00:00Z").await, "since", "year 0");
    let far_cursor = format!("{}_{}", i64::MAX / 2, uuid::Uuid::new_v4().simple());
    assert_field(&api.get(&format!("/v1/runs?cursor={far_cursor}")).await, "cursor", "far cursor");
    assert_field(&api.get("/v1/runs?bogus=1").await, "bogus", "unknown parameter");
    assert_field(&api.get("/v1/stats?hours=0").await, "hours", "hours");
    assert_field(
        &api.patch(&format!("/v1/databases/{db}"), json!({"interval_secs": 5})).await,
        "interval_secs",
        "interval",
    );
    assert_field(
        &api.patch(
            &format!("/v1/databases/{db}"),
            json!({"mapping": {"properties": {"No such property": {"skip": true}}}}),
        )
        .await,
        "mapping",
        "mapping",
    );
    assert_field(
        &api.patch(&format!("/v1/databases/{db}"), json!({"enabled": "yes"})).await,
        "enabled",
        "enabled type",
    );

    // Registering over HTTP reads the database from Notion.
    let second = env.sim.state.read().databases[1].id;
    let (status, created) =
        api.post("/v1/databases", json!({"integration": "acme", "id": second.simple().to_string()})).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (created["id"].clone(), created["title"].clone()),
        (json!(second.to_string()), json!("Projects 2"))
    );
    // (No interval: the scheduler leaves it alone, so the run counts below stay exact.)
    assert_eq!(created["interval_secs"], Value::Null);
    assert_eq!(created["enabled"], json!(true));
    assert_field(
        &api.post("/v1/databases", json!({"integration": "nobody", "id": second})).await,
        "integration",
        "unknown integration",
    );
    assert_field(
        &api.post("/v1/databases", json!({"integration": "acme", "id": second, "interval_secs": 1})).await,
        "interval_secs",
        "interval",
    );
    assert_field(
        &api.post(
            "/v1/databases",
            json!({"integration": "acme", "id": second, "data_source": uuid::Uuid::new_v4()}),
        )
        .await,
        "data_source",
        "data source",
    );
    let (status, body) =
        api.post("/v1/databases", json!({"integration": "acme", "id": uuid::Uuid::new_v4()})).await;
    assert_eq!(status, 404, "a database Notion does not have: {body}");
    // Registering again refreshes the schema but keeps the schedule and the switch an operator
    // set (disabled, so the scheduler leaves it alone).
    let path = format!("/v1/databases/{second}");
    let (status, patched) = api.patch(&path, json!({"enabled": false, "interval_secs": 3600})).await;
    assert_eq!(status, 200, "{patched}");
    let (status, again) = api.post("/v1/databases", json!({"integration": "acme", "id": second})).await;
    assert!(status == 200 || status == 201, "{status} {again}");
    let (_, kept) = api.get(&path).await;
    assert_eq!(
        (kept["interval_secs"].clone(), kept["enabled"].clone()),
        (json!(3600), json!(false)),
        "{kept}"
    );
    let (_, changed) =
        api.post("/v1/databases", json!({"integration": "acme", "id": second, "interval_secs": 7200})).await;
    assert_eq!(changed["interval_secs"], json!(7200), "an interval given is applied: {changed}");
    let (_, listed) = api.get("/v1/databases").await;
    assert_eq!(listed.as_array().expect("list").len(), 2);

    // Unknown ids: 404.
    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/v1/jobs/{unknown}"),
        format!("/v1/jobs/{unknown}/events"),
        format!("/v1/databases/{unknown}"),
        "/v1/nothing".into(),
    ] {
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    assert_eq!(api.post("/v1/jobs", json!({"database": unknown})).await.0, 404);
    assert_eq!(api.patch(&format!("/v1/databases/{unknown}"), json!({"enabled": false})).await.0, 404);

    // Ids with or without dashes.
    let (status, database) = api.get(&format!("/v1/databases/{simple}")).await;
    assert_eq!(status, 200, "{database}");
    assert_eq!(database["id"], db.to_string());

    // A job posted over HTTP completes; its status and counters are those of sync_runs.
    let (status, accepted) =
        api.post("/v1/jobs", json!({"database": simple, "mode": "full", "priority": "high"})).await;
    assert_eq!(status, 202, "{accepted}");
    let job_id = accepted["job_id"].as_str().expect("job id").to_string();
    let run = api.wait_final(&job_id, Duration::from_secs(120)).await;
    let row = env.wait_run(job_id.parse().expect("uuid"), Duration::from_secs(5)).await.expect("row");
    assert_eq!(run["status"], row.status);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["reason"], "api");
    let c = &run["counters"];
    for (name, value) in [
        ("requests", row.requests),
        ("rate_limited", row.rate_limited),
        ("pages_seen", row.pages_seen),
        ("pages_created", row.pages_created),
        ("pages_updated", row.pages_updated),
        ("pages_unchanged", row.pages_unchanged),
        ("pages_deleted", row.pages_deleted),
        ("pages_invalid", row.pages_invalid),
    ] {
        assert_eq!(c[name], json!(value), "{name}: {run}");
    }
    assert_eq!(run["seq"], json!(row.change_seq));
    assert_eq!(row.pages_seen, 240);
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");

    // A second run, an incremental one, has an estimate from the first full run's count.
    let (_, second) = api.post("/v1/jobs", json!({"database": db, "mode": "incremental"})).await;
    let second_id = second["job_id"].as_str().expect("id").to_string();
    api.wait_final(&second_id, Duration::from_secs(60)).await;
    let (_, third) = api.post("/v1/jobs", json!({"database": db, "mode": "full"})).await;
    let third_id = third["job_id"].as_str().expect("id").to_string();
    let third_run = api.wait_final(&third_id, Duration::from_secs(120)).await;
    assert_eq!(third_run["progress"]["estimated_total"], json!(240), "{third_run}");

    // History: pages of one run each visit every run once, newest first.
    let total: i64 = env.scalar(&format!("SELECT count(*) FROM sync_runs WHERE database_id = '{db}'")).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/runs?limit=1&database={simple}&cursor={c}"),
            None => format!("/v1/runs?limit=1&database={simple}"),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for r in page["runs"].as_array().expect("runs") {
            seen.push(r["id"].as_str().expect("id").to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(seen.len() as i64 <= total, "pagination does not end");
    }
    assert_eq!(seen.len() as i64, total);
    assert_eq!(seen[0], third_id, "newest first");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no run twice");
    let (_, succeeded) = api.get(&format!("/v1/runs?status=succeeded&limit=500&database={db}")).await;
    assert_eq!(succeeded["runs"].as_array().expect("runs").len(), 3);

    // Statistics agree with the table.
    let (status, stats) = api.get("/v1/stats?hours=24").await;
    assert_eq!(status, 200, "{stats}");
    let all_runs: i64 = env.scalar("SELECT count(*) FROM sync_runs").await;
    assert_eq!(stats["overall"]["runs"], json!(all_runs));
    let pages: i64 = env.scalar("SELECT sum(pages_seen)::bigint FROM sync_runs").await;
    assert_eq!(stats["overall"]["pages"], json!(pages));
    assert_eq!(stats["databases"][0]["database_id"], db.to_string());
    assert_eq!(stats["databases"][0]["runs"], json!(total));
    assert_eq!(stats["databases"][0]["success_rate"], json!(1.0));
    assert!(stats["overall"]["p95_duration_secs"].as_f64().is_some(), "{stats}");

    // PATCH: disable, schedule, clear the schedule.
    let (status, patched) =
        api.patch(&format!("/v1/databases/{simple}"), json!({"enabled": false, "interval_secs": 600})).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!((patched["enabled"].clone(), patched["interval_secs"].clone()), (json!(false), json!(600)));
    let (_, patched) = api.patch(&format!("/v1/databases/{db}"), json!({"interval_secs": null})).await;
    assert_eq!((patched["enabled"].clone(), patched["interval_secs"].clone()), (json!(false), Value::Null));
    let enabled: bool = env.scalar(&format!("SELECT enabled FROM notion_databases WHERE id = '{db}'")).await;
    assert!(!enabled);
    // A cron schedule over the API: validated field by field, shown, and removed with null.
    let path = format!("/v1/databases/{db}");
    assert_field(&api.patch(&path, json!({"cron": "not cron"})).await, "cron", "cron");
    assert_field(&api.patch(&path, json!({"cron": "0 * * * *", "tz": "Mars/Base"})).await, "tz", "tz");
    assert_field(&api.patch(&path, json!({"tz": "UTC"})).await, "tz", "tz without cron");
    assert_field(
        &api.patch(&path, json!({"cron": "0 * * * *", "jitter_secs": 90_000})).await,
        "jitter_secs",
        "jitter",
    );
    let (status, cron) = api
        .patch(&path, json!({"cron": "0 3 * * *", "tz": "Europe/Paris", "jitter_secs": 60, "enabled": false}))
        .await;
    assert_eq!(status, 200, "{cron}");
    assert_eq!(
        (cron["cron"].clone(), cron["tz"].clone(), cron["jitter_secs"].clone(), cron["enabled"].clone()),
        (json!("0 3 * * *"), json!("Europe/Paris"), json!(60), json!(false)),
        "an `enabled` in the same patch wins: {cron}"
    );
    let (_, cleared) = api.patch(&path, json!({"cron": null})).await;
    assert_eq!(
        (cleared["cron"].clone(), cleared["jitter_secs"].clone()),
        (Value::Null, json!(0)),
        "{cleared}"
    );

    // The overview the status page reads.
    let (status, overview) = api.get("/v1/overview").await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["queue"]["consumers"].as_u64(), Some(1), "{overview}");
    for field in ["ready", "high_ready", "parked"] {
        assert!(overview["queue"][field].is_u64(), "{field}: {overview}");
    }
    assert_eq!(overview["integrations"][0]["slug"], "acme");

    // The CLI twins answer what the API answers.
    let shown = cli_json(&env, &["runs", "show", &job_id, "--json"]).await;
    assert_eq!(shown.len(), 1);
    let (_, by_api) = api.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(shown[0]["counters"], by_api["counters"]);
    assert_eq!(shown[0]["status"], by_api["status"]);
    let listed = cli_json(&env, &["runs", "list", "--database", &db.to_string(), "--json"]).await;
    assert_eq!(listed[0]["runs"].as_array().expect("runs").len() as i64, total);
    let cli_overview = cli_json(&env, &["overview", "--json"]).await;
    assert_eq!(cli_overview[0]["databases"], overview["databases"]);
    assert_eq!(cli_overview[0]["integrations"][0]["slug"], "acme");
    let text = cli_text(&env, &["overview"]).await;
    assert!(text.contains("Projects 1") && text.contains("acme:"), "{text}");
    // `runs watch --json` on a running job: one JSON object per line, the last one final.
    let (_, live) = api.post("/v1/jobs", json!({"database": db, "mode": "full"})).await;
    let live = live["job_id"].as_str().expect("id").to_string();
    let states = cli_json(&env, &["runs", "watch", &live, "--json", "--timeout-secs", "120"]).await;
    let last = states.last().expect("states");
    assert_eq!((last["id"].clone(), last["status"].clone()), (json!(live), json!("succeeded")), "{states:?}");
    assert!(states[..states.len() - 1].iter().all(|s| s["is_final"] == json!(false)));
    let seqs: Vec<i64> = states.iter().filter_map(|s| s["seq"].as_i64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "states in order: {seqs:?}");

    // No token reached the log.
    let log = env.log();
    for token in [TOKEN, FILE_TOKEN, "second-token"] {
        assert!(!log.contains(token), "a token leaked into the log");
    }
    env.cleanup().await;
}

/// Reads Server-Sent Events from `url` until `stop` says so: (event, id, data) triples.
struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl SseClient {
    async fn connect(url: &str, last_event_id: Option<&str>) -> SseClient {
        let mut req = reqwest::Client::new().get(url).bearer_auth(TOKEN);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let response = req.send().await.expect("connect");
        assert_eq!(response.status().as_u16(), 200);
        assert!(
            response.headers()["content-type"].to_str().unwrap_or_default().starts_with("text/event-stream"),
            "content type"
        );
        SseClient { response, buffer: String::new() }
    }

    /// The next event (`None` at the end of the stream); heartbeats (comments) are skipped.
    async fn next(&mut self) -> Option<(String, String, Value)> {
        loop {
            if let Some(cut) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..cut + 2).collect();
                let (mut kind, mut id, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if kind.is_empty() {
                    continue;
                }
                return Some((kind, id, serde_json::from_str(&data).expect("event data is JSON")));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("an event or heartbeat within 30 s")
                .expect("stream")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn sse_sends_progress_and_a_final_event_and_a_reconnect_with_last_event_id_misses_nothing() {
    // 5,000 pages at 12 requests a second: about 50 requests, four seconds and more.
    let mut env = TestEnv::start(SimConfig { pages: 5_000, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 12.0, 2, 0).await.expect("register");
    let api = Api::start(&mut env).await;
    let (status, accepted) = api.post("/v1/jobs", json!({"database": db, "mode": "full"})).await;
    assert_eq!(status, 202, "{accepted}");
    let job = accepted["job_id"].as_str().expect("id").to_string();
    let url = format!("{}/v1/jobs/{job}/events", api.base);
    // Both clients connect while the job is still queued (no worker yet).
    let mut whole = SseClient::connect(&url, None).await;
    let mut resumed = SseClient::connect(&url, None).await;
    env.spawn_worker(1).expect("worker");

    let watch_whole = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(event) = whole.next().await {
            events.push(event);
        }
        events
    });

    // The second client reads two progress events with pages, then goes away.
    let mut before = Vec::new();
    while before
        .iter()
        .filter(|(_, _, d): &&(String, String, Value)| d["progress"]["pages_seen"].as_i64() > Some(0))
        .count()
        < 2
    {
        let event = resumed.next().await.expect("event");
        assert_eq!(event.0, "progress", "the run ended before the client left: {:?}", event);
        before.push(event);
    }
    drop(resumed);
    let last_id = before.last().expect("event").1.clone();
    let last_pages = before.last().expect("event").2["progress"]["pages_seen"].as_i64().expect("pages");
    // While it is away, the run moves on.
    let run_id: uuid::Uuid = job.parse().expect("uuid");
    let deadline = Instant::now() + Duration::from_secs(60);
    let moved = loop {
        let row = env.wait_run_until(run_id, Duration::from_secs(5), |_| true).await.expect("row");
        if row.pages_seen > last_pages && row.change_seq > last_id.parse::<i64>().expect("numeric id") {
            break row;
        }
        assert!(Instant::now() < deadline, "the run did not move on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut resumed = SseClient::connect(&url, Some(&last_id)).await;
    let (kind, id, data) = resumed.next().await.expect("first event after the reconnect");
    assert!(kind == "progress" || kind == "final");
    assert!(id.parse::<i64>().expect("id") >= moved.change_seq, "the reconnect starts from the newest state");
    assert!(data["progress"]["pages_seen"].as_i64().expect("pages") >= moved.pages_seen);
    let mut after = vec![(kind, id, data)];
    while after.last().is_some_and(|e| e.0 != "final") {
        match resumed.next().await {
            Some(e) => after.push(e),
            None => break,
        }
    }

    let events = tokio::time::timeout(Duration::from_secs(120), watch_whole)
        .await
        .expect("stream ends")
        .expect("task");
    let row: sync_run::Model = env.wait_run(run_id, Duration::from_secs(5)).await.expect("row");
    for (name, stream) in [("whole", &events), ("resumed", &after)] {
        let (kind, id, last) = stream.last().expect("events");
        assert_eq!(kind, "final", "{name}: the stream ends with the final event");
        assert_eq!(stream.iter().filter(|e| e.0 == "final").count(), 1, "{name}");
        assert_eq!(last["status"], "succeeded");
        assert_eq!(id, &row.change_seq.to_string(), "{name}: the final event is the last stored change");
        assert_eq!(last["counters"]["pages_seen"], json!(row.pages_seen));
        assert_eq!(last["counters"]["requests"], json!(row.requests));
        assert_eq!(last["counters"]["pages_created"], json!(row.pages_created));
        // Ids never go back; pages never go back.
        let ids: Vec<i64> = stream.iter().map(|e| e.1.parse().expect("id")).collect();
        assert!(ids.windows(2).all(|w| w[0] <= w[1]), "{name}: ids {ids:?}");
        let pages: Vec<i64> =
            stream.iter().map(|e| e.2["progress"]["pages_seen"].as_i64().expect("pages")).collect();
        assert!(pages.windows(2).all(|w| w[0] <= w[1]), "{name}: pages {pages:?}");
    }
    let progress_with_pages = events
        .iter()
        .filter(|e| e.0 == "progress" && e.2["progress"]["pages_seen"].as_i64().unwrap_or(0) > 0)
        .count();
    assert!(progress_with_pages >= 3, "{progress_with_pages} progress events during the run");
    assert_eq!(row.pages_seen, 5_000);
    // Every event of both clients came from the notifications: the producer read the run once
    // per connection, never per event.
    env.cleanup().await;
}

#[tokio::test]
async fn the_committed_openapi_document_is_current_and_every_documented_route_is_served() {
    let generated = syncfleet_producer::api::openapi().to_pretty_json().expect("json");
    let committed_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed.trim() == generated.trim(),
        "docs/openapi.json is stale: run `cargo run -p syncfleet-producer -- openapi > docs/openapi.json`"
    );
    let doc: Value = serde_json::from_str(&generated).expect("document");
    assert_eq!(doc["openapi"], "3.1.0");
    // Every $ref resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in &all {
        let name = r.strip_prefix("#/components/schemas/").expect("local schema ref");
        assert!(doc["components"]["schemas"][name].is_object(), "dangling {r}");
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    // Every documented operation is served: with a token it answers one of its documented
    // statuses (a fresh id: 404; no body: 400), never the router's 404/405.
    let mut env = TestEnv::start(SimConfig { pages: 3, ..SimConfig::default() }).await.expect("env");
    let api = Api::start(&mut env).await;
    let id = uuid::Uuid::new_v4();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            let url = path.replace("{id}", &id.to_string());
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let body = if matches!(method.as_str(), "post" | "patch") { Some(json!({})) } else { None };
            let (status, resp) = api.call(m.clone(), &url, Some(TOKEN), body.clone()).await;
            let documented: Vec<String> =
                op["responses"].as_object().expect("responses").keys().cloned().collect();
            assert!(
                documented.contains(&status.to_string()),
                "{method} {path}: {status} is not documented ({documented:?}): {resp}"
            );
            assert_ne!(status, 405, "{method} {path}");
            let (status, _) = api.call(m, &url, None, body).await;
            assert_eq!(status, 401, "{method} {path} without a token");
        }
    }
    // And what is not documented is not served (apart from the page and the document).
    let (status, body) = api.get("/v1/secret-admin").await;
    assert_eq!(status, 404, "{body}");
    for path in syncfleet_producer::api::UNDOCUMENTED_PATHS {
        assert_eq!(api.call(reqwest::Method::GET, path, None, None).await.0, 200, "{path}");
    }
    env.cleanup().await;
}

/// `script/pyenv` (idempotent) makes `target/pyenv` with schemathesis and selenium.
fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new(root.join("script/pyenv")).status().expect("script/pyenv runs");
    assert!(status.success(), "script/pyenv failed");
    root.join("target/pyenv/bin/python")
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_outside_the_schema() {
    let python = python();
    let mut env = TestEnv::start(SimConfig { pages: 20, ..SimConfig::default() }).await.expect("env");
    env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let api = Api::start(&mut env).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(&python)
            .arg(root.join("tests/api/fuzz.py"))
            .args([&api.base, TOKEN])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("schemathesis finished within 10 minutes")
    .expect("schemathesis ran");
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("openapi.json is a valid OpenAPI 3.1.0 document"), "{text}");
    // It really exercised the API: every documented operation but the event stream.
    assert!(text.contains("Tested: 10"), "schemathesis did not test every operation:\n{text}");
    assert!(!env.log().contains(TOKEN), "the token leaked into the log");
    env.cleanup().await;
}

#[tokio::test]
async fn the_status_page_loads_with_a_token_shows_a_bar_advancing_and_renders_hostile_titles_as_text() {
    let python = python();
    let hostile = "<img src=x onerror=alert(1)>";
    let mut env =
        TestEnv::start(SimConfig { pages: 4_000, databases: 2, ..SimConfig::default() }).await.expect("env");
    env.sim.state.write().databases[1].title = hostile.to_string();
    let db = env.register("acme", 8.0, 2, 0).await.expect("register");
    env.register("acme", 8.0, 2, 1).await.expect("register hostile");
    let api = Api::start(&mut env).await;
    env.spawn_worker(1).expect("worker");
    let (status, _) = api.post("/v1/jobs", json!({"database": db, "mode": "full"})).await;
    assert_eq!(status, 202);
    let artefacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artefacts).expect("artefact dir");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(&python)
            .arg(root.join("tests/api/status_page.py"))
            .args([&api.base, TOKEN, hostile, artefacts.join("status-page.png").to_str().expect("path")])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser test finished within 4 minutes")
    .expect("the browser test ran");
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "status page test failed:\n{text}");
    assert!(artefacts.join("status-page.png").metadata().is_ok_and(|m| m.len() > 1000), "screenshot kept");
    env.cleanup().await;
}

/// Statements the producer's API role (`sf_api`) has run so far, by pg_stat_statements.
async fn api_statements(env: &TestEnv) -> i64 {
    env.scalar(
        "SELECT COALESCE(sum(s.calls), 0)::bigint FROM pg_stat_statements s \
         JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = 'sf_api'",
    )
    .await
}

#[tokio::test]
async fn two_hundred_sse_clients_on_ten_running_jobs_cost_the_database_per_job_not_per_client() {
    // A private cluster with pg_stat_statements, so every statement the producer runs (as its own
    // role) is counted exactly.
    let pg = PrivatePostgres::start_with(&["shared_preload_libraries=pg_stat_statements"]).await.expect("pg");
    let servers = Servers { pg_admin: Some(pg.admin_url()), ..Servers::default() };
    let sim = SimConfig { pages: 2_000, databases: 10, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start_on(sim, servers).await.expect("env");
    env.execute("CREATE EXTENSION pg_stat_statements; CREATE ROLE sf_api LOGIN SUPERUSER")
        .await
        .expect("role");
    let mut dbs = Vec::new();
    for i in 0..10 {
        dbs.push(env.register("acme", 15.0, 2, i).await.expect("register"));
    }
    let api_url = format!("postgres://sf_api@127.0.0.1:{}/{}", pg.port, env.name);
    // The scheduler ticks every second, so each window holds about as many ticks.
    let api = Api::start_with(
        &mut env,
        &[("SYNCFLEET_DATABASE__URL", &api_url), ("SYNCFLEET_SCHEDULER__TICK_SECS", "1")],
    )
    .await;
    // Ten jobs of one integration at once: no per-integration cap, all in the normal lane.
    env.settings.worker.max_jobs_per_integration = 0;
    env.spawn_worker(10).expect("worker");
    let mut jobs = Vec::new();
    for db in &dbs {
        let (status, accepted) =
            api.post("/v1/jobs", json!({"database": db, "mode": "full", "priority": "normal"})).await;
        assert_eq!(status, 202, "{accepted}");
        jobs.push(accepted["job_id"].as_str().expect("id").to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.scalar::<i64>("SELECT count(*) FROM sync_runs WHERE status = 'running'").await < 10 {
        assert!(Instant::now() < deadline, "the ten jobs did not all start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = Duration::from_secs(5);
    // No client: what the producer runs anyway (the scheduler's ticks).
    let start = api_statements(&env).await;
    tokio::time::sleep(window).await;
    let idle = api_statements(&env).await - start;

    // 200 clients, 20 a job, each reading its stream to the end.
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let before_connect = api_statements(&env).await;
    let mut clients = Vec::new();
    for i in 0..200 {
        let url = format!("{}/v1/jobs/{}/events", api.base, jobs[i % 10]);
        let mut client = SseClient::connect(&url, None).await;
        let received = received.clone();
        clients.push(tokio::spawn(async move {
            let mut last = None;
            while let Some(event) = client.next().await {
                received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let done = event.0 == "final";
                last = Some(event);
                if done {
                    break;
                }
            }
            last
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "not every client got its first event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_cost = api_statements(&env).await - before_connect;
    let (events_before, start) =
        (received.load(std::sync::atomic::Ordering::Relaxed), api_statements(&env).await);
    tokio::time::sleep(window).await;
    let watched = api_statements(&env).await - start;
    let events = received.load(std::sync::atomic::Ordering::Relaxed) - events_before;
    let running: i64 = env.scalar("SELECT count(*) FROM sync_runs WHERE status = 'running'").await;
    println!(
        "sse-fan-out: producer statements in {window:?}: {idle} with no client, {watched} with 200 clients \
         ({events} events delivered, {running} of 10 jobs still running); connecting 200 clients: {connect_cost} \
         statements ({:.1} a client)",
        connect_cost as f64 / 200.0
    );
    assert!(running >= 5, "the window must fall while the jobs run ({running} running)");
    assert!(events >= 400, "every client receives progress at least every 2 s ({events} events)");
    // Streaming costs nothing per client: the same statements as with no client at all.
    // (Slack: one scheduler tick more or less in a window.)
    assert!(watched <= idle + (idle / 2).max(6), "watching cost {watched} statements against {idle} idle");
    assert!(connect_cost <= 3 * 200, "connecting cost {connect_cost} statements");
    // 100 status pages polling at once: one overview computation serves them all (cached for
    // 2 s, computed by one request while the others wait for it).
    let overviews = || async {
        env.scalar::<i64>(
            "SELECT COALESCE(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE '%LEFT JOIN sync_runs r ON r.database_id = d.id%'",
        )
        .await
    };
    let before = overviews().await;
    let started = Instant::now();
    let answers = futures_util::future::join_all((0..100).map(|_| api.get("/v1/overview"))).await;
    let took = started.elapsed();
    let computed = overviews().await - before;
    assert!(
        answers.iter().all(|(status, body)| *status == 200 && body["databases"].is_array()),
        "{:?}",
        answers[0]
    );
    let bound = 2 + (took.as_secs_f64() / 2.0) as i64;
    println!("overview: 100 concurrent requests in {took:?}, {computed} computations");
    assert!(computed <= bound, "100 viewers cost {computed} overview computations in {took:?}");
    // Every client ends with the final state of its run.
    for (i, c) in clients.into_iter().enumerate() {
        let last =
            tokio::time::timeout(Duration::from_secs(180), c).await.expect("stream ends").expect("task");
        let (kind, id, data) = last.expect("events");
        let row =
            env.wait_run(jobs[i % 10].parse().expect("uuid"), Duration::from_secs(5)).await.expect("row");
        assert_eq!((kind.as_str(), id), ("final", row.change_seq.to_string()));
        assert_eq!(data["counters"]["pages_seen"], json!(row.pages_seen));
    }
    env.cleanup().await;
    drop(pg);
}

#[tokio::test]
async fn a_run_change_with_a_huge_hostile_error_message_is_written_and_announced() {
    use secrecy::ExposeSecret;
    use syncfleet_producer::api::model::RunRow;
    let env = TestEnv::start(SimConfig { pages: 1, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    let mut listener =
        sea_orm::sqlx::postgres::PgListener::connect(env.settings.database.url.expose_secret())
            .await
            .expect("listen connection");
    listener.listen("syncfleet_runs").await.expect("LISTEN");
    let job = syncfleet_shared::job::JobEnvelope::new(
        "urn:test",
        syncfleet_shared::job::SyncDatabaseJob {
            integration: "i".repeat(5_000),
            database_id: db,
            mode: syncfleet_shared::job::SyncMode::Full,
            priority: Default::default(),
            reason: Default::default(),
        },
    );
    syncfleet_shared::db::runs::insert_queued(&env.db, &job).await.expect("insert");
    // 15,000 characters of multi-byte text and control characters: far over NOTIFY's 8000 bytes
    // once escaped. The write must not fail because of the trigger.
    env.execute(&format!(
        "UPDATE sync_runs SET status = 'failed', error_kind = 'x', error_message = repeat(E'\\u00e9\\x01<', 5000) \
         WHERE id = '{}'",
        job.id
    ))
    .await
    .expect("a huge error message is written");
    let mut rows = Vec::new();
    while rows.len() < 2 {
        let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("notified")
            .expect("recv");
        rows.push(serde_json::from_str::<RunRow>(note.payload()).expect("the payload is a run"));
    }
    assert_eq!((rows[0].seq, rows[1].seq), (0, 1));
    assert_eq!(rows[1].status, "failed");
    assert!(rows[1].error_message.as_deref().is_none_or(|m| m.chars().count() <= 1000));
    let stored: i32 =
        env.scalar(&format!("SELECT length(error_message) FROM sync_runs WHERE id = '{}'", job.id)).await;
    assert_eq!(stored, 15_000, "the row keeps the whole message");
    let run = syncfleet_producer::api::model::run_view(&env.db, job.id).await.expect("read").expect("run");
    assert_eq!(run.error.expect("error").message.chars().count(), 15_000);
    env.cleanup().await;
}

#[tokio::test]
async fn an_sse_client_gets_the_stored_final_state_across_a_postgresql_restart() {
    let pg = PrivatePostgres::start().await.expect("pg");
    let servers = Servers { pg_admin: Some(pg.admin_url()), ..Servers::default() };
    let mut env =
        TestEnv::start_on(SimConfig { pages: 1_500, ..SimConfig::default() }, servers).await.expect("env");
    let db = env.register("acme", 10.0, 2, 0).await.expect("register");
    let api = Api::start(&mut env).await;
    env.spawn_worker(1).expect("worker");
    let (status, accepted) = api.post("/v1/jobs", json!({"database": db, "mode": "full"})).await;
    assert_eq!(status, 202, "{accepted}");
    let job = accepted["job_id"].as_str().expect("id").to_string();
    let mut client = SseClient::connect(&format!("{}/v1/jobs/{job}/events", api.base), None).await;
    loop {
        let (kind, _, data) = client.next().await.expect("event");
        assert_eq!(kind, "progress", "the run ended before the restart");
        if data["progress"]["pages_seen"].as_i64() > Some(0) {
            break;
        }
    }
    // PostgreSQL goes away mid-run (connections cut, like a crash) and comes back.
    pg.stop().await.expect("stop");
    pg.up().await.expect("start again");
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while events.last().is_none_or(|e: &(String, String, Value)| e.0 != "final") {
        assert!(Instant::now() < deadline, "no final event after the restart");
        events.push(client.next().await.expect("the stream stays open until the final event"));
    }
    let (_, id, last) = events.last().expect("final");
    let row = env.wait_run(job.parse().expect("uuid"), Duration::from_secs(5)).await.expect("row");
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert_eq!(last["status"], "succeeded");
    assert_eq!(id, &row.change_seq.to_string(), "the final event is the last stored change");
    assert_eq!(last["counters"]["pages_seen"], json!(row.pages_seen));
    assert_eq!(last["counters"]["requests"], json!(row.requests));
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
    drop(pg);
}

/// Undoes a [`PrivateRabbit::freeze`] even when the test fails half-way.
struct Thaw<'a>(&'a PrivateRabbit);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.freeze(false) {
            eprintln!("could not SIGCONT the private RabbitMQ: {e}");
        }
    }
}

#[tokio::test]
async fn a_publish_whose_confirm_never_comes_is_a_202_with_its_job_id_and_the_job_runs_when_the_broker_returns()
 {
    let rabbit = PrivateRabbit::start().await.expect("rabbit");
    let servers = Servers { amqp: Some(rabbit.url()), ..Servers::default() };
    let mut env =
        TestEnv::start_on(SimConfig { pages: 120, ..SimConfig::default() }, servers).await.expect("env");
    let db = env.register("acme", 30.0, 5, 0).await.expect("register");
    let api = Api::start_with(&mut env, &[("SYNCFLEET_AMQP__CONFIRM_TIMEOUT_SECS", "2")]).await;
    env.spawn_worker(1).expect("worker");
    let (status, first) = api.post("/v1/jobs", json!({"database": db, "mode": "full"})).await;
    assert_eq!((status, &first["confirmed"]), (202, &json!(true)), "{first}");
    let first = api.wait_final(first["job_id"].as_str().expect("id"), Duration::from_secs(120)).await;
    assert_eq!(first["status"], "succeeded", "{first}");

    // The broker is wedged: the publish goes into its socket, the confirm never comes.
    rabbit.freeze(true).expect("SIGSTOP rabbitmq");
    let thaw = Thaw(&rabbit);
    let started = Instant::now();
    let (status, accepted) = api.post("/v1/jobs", json!({"database": db, "mode": "full"})).await;
    let answered_in = started.elapsed();
    assert_eq!(status, 202, "an unconfirmed publish may run: the client needs its id, {accepted}");
    assert_eq!(accepted["confirmed"], json!(false), "{accepted}");
    assert!(answered_in < Duration::from_secs(15), "answered after {answered_in:?} with the broker wedged");
    let id = accepted["job_id"].as_str().expect("job id").to_string();
    let (status, run) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "queued", "{run}");
    assert_eq!(run["error"]["kind"], "publish_unconfirmed", "{run}");
    drop(thaw);

    // Once the broker runs again, the job runs exactly once: from the message that had left the
    // producer, or, if the broker lost it, from the leader's republish under the same id.
    let run = api.wait_final(&id, Duration::from_secs(180)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let runs: i64 = env.scalar("SELECT count(*) FROM sync_runs").await;
    assert_eq!(runs, 2, "no duplicate run was created");
    // And the API publishes normally again (a new connection).
    let (status, again) = api.post("/v1/jobs", json!({"database": db, "mode": "incremental"})).await;
    assert_eq!((status, &again["confirmed"]), (202, &json!(true)), "{again}");
    env.cleanup().await;
    drop(rabbit);
}

#[tokio::test]
async fn past_half_a_notify_queue_run_writes_still_commit_unannounced_and_watchers_still_get_the_final_state()
{
    use sea_orm::sqlx::{Connection, Executor};
    use secrecy::ExposeSecret;
    let mut env = TestEnv::start(SimConfig { pages: 1, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    let api = Api::start(&mut env).await;
    let url = env.settings.database.url.expose_secret().to_string();
    let job = |db| syncfleet_tests::harness::job("acme", db, syncfleet_shared::job::SyncMode::Full);
    let (watched, other) = (job(db), job(db));
    for j in [&watched, &other] {
        syncfleet_shared::db::runs::insert_queued(&env.db, j).await.expect("insert");
    }
    let mut client = SseClient::connect(&format!("{}/v1/jobs/{}/events", api.base, watched.id), None).await;
    let (kind, _, first) = client.next().await.expect("first event");
    assert_eq!((kind.as_str(), &first["status"]), ("progress", &json!("queued")));
    let mut listener = sea_orm::sqlx::postgres::PgListener::connect(&url).await.expect("listen connection");
    listener.listen("syncfleet_runs").await.expect("LISTEN");

    // A session where the queue reads 75% full. PostgreSQL 15's queue is 8 GB, too big to fill in
    // a test, so the builtin is shadowed for this one session (pg_catalog placed after `fake`).
    let mut full = sea_orm::sqlx::PgConnection::connect(&url).await.expect("connect");
    full.execute(
        "CREATE SCHEMA fake; \
         CREATE FUNCTION fake.pg_notification_queue_usage() RETURNS double precision LANGUAGE sql AS 'SELECT 0.75::float8'; \
         SET search_path = fake, pg_catalog, public",
    )
    .await
    .expect("shadow the queue usage");
    let finish = format!(
        "UPDATE sync_runs SET status = 'succeeded', started_at = now(), finished_at = now() WHERE id = '{}'",
        watched.id
    );
    full.execute(sea_orm::sqlx::AssertSqlSafe(finish))
        .await
        .expect("the run's write commits although the queue is past half full");
    full.close().await.expect("close");
    // A normal session's change is announced; it is the first notification, so the one above
    // was left out (notifications arrive in commit order).
    env.execute(&format!("UPDATE sync_runs SET status = 'failed' WHERE id = '{}'", other.id))
        .await
        .expect("update");
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("notified")
        .expect("recv");
    let announced: Value = serde_json::from_str(note.payload()).expect("payload");
    assert_eq!(announced["id"], json!(other.id), "the change past the threshold was not announced");

    // The watcher still ends with the stored final state: the hub re-reads watched runs.
    let deadline = Instant::now() + Duration::from_secs(40);
    let last = loop {
        assert!(Instant::now() < deadline, "no final event without a notification");
        let event = tokio::time::timeout(Duration::from_secs(30), client.next())
            .await
            .expect("an event")
            .expect("stream open");
        if event.0 == "final" {
            break event;
        }
    };
    assert_eq!(last.2["status"], "succeeded");
    env.cleanup().await;
}
