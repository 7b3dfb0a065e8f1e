//! notion-sim follows docs/notion-api.md: pagination, filters, minute rounding, 429 with Retry-After,
//! auth, the version header, invalid cursors, and the version-specific shapes.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};
use syncfleet_tests::sim::{SimConfig, SimServer};

const TOKEN: &str = "secret_sim_token";

struct Sim {
    server: SimServer,
    http: reqwest::Client,
}

impl Sim {
    async fn start(pages: u64, rate: f64) -> Sim {
        let config = SimConfig { pages, rate, burst: 3, ..SimConfig::default() };
        let server =
            SimServer::start(config, "127.0.0.1:0".parse().expect("addr")).await.expect("sim starts");
        Sim { server, http: reqwest::Client::new() }
    }

    fn info(&self) -> (String, String) {
        let ws = self.server.state.read();
        (ws.databases[0].id.to_string(), ws.databases[0].data_source_id.to_string())
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        version: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let url = format!("{}{}", self.server.base_url(), path);
        let mut req = match method {
            "POST" => self.http.post(&url),
            _ => self.http.get(&url),
        }
        .bearer_auth(TOKEN);
        if let Some(v) = version {
            req = req.header("Notion-Version", v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    async fn query(&self, ds: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, b) =
            self.call("POST", &format!("/v1/data_sources/{ds}/query"), Some("2025-09-03"), Some(body)).await;
        (s, b)
    }

    /// Every page of a query, following cursors.
    async fn query_all(&self, ds: &str, mut body: Value) -> Vec<Value> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            let (status, page) = self.query(ds, body.clone()).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            out.extend(page["results"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) if page["has_more"] == true => body["start_cursor"] = json!(c),
                _ => return out,
            }
        }
        panic!("pagination did not end");
    }
}

#[tokio::test]
async fn pagination_returns_every_page_once_in_pages_of_at_most_100() {
    let sim = Sim::start(250, 0.0).await;
    let (_, ds) = sim.info();
    let (status, first) = sim.query(&ds, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["object"], "list");
    assert_eq!(first["type"], "page_or_data_source");
    assert_eq!(first["results"].as_array().map(Vec::len), Some(100), "default page_size is 100");
    assert_eq!(first["has_more"], true);
    let all = sim
        .query_all(
            &ds,
            json!({"page_size": 70, "sorts": [{"timestamp": "created_time", "direction": "ascending"}]}),
        )
        .await;
    let ids: HashSet<&str> = all.iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(all.len(), 250);
    assert_eq!(ids.len(), 250, "no page twice");
    let times: Vec<&str> = all.iter().filter_map(|p| p["created_time"].as_str()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "ascending by created_time");
    let (status, body) = sim.query(&ds, json!({"page_size": 101})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "validation_error");
    sim.server.stop().await;
}

#[tokio::test]
async fn timestamps_are_rounded_down_to_the_minute_and_filters_respect_it() {
    let sim = Sim::start(300, 0.0).await;
    let (db, ds) = sim.info();
    let all = sim.query_all(&ds, json!({})).await;
    for p in &all {
        for key in ["created_time", "last_edited_time"] {
            let t = p[key].as_str().expect("timestamp");
            assert!(t.ends_with(":00.000Z"), "{key} {t} is not minute-rounded");
        }
    }
    // An edit right now reads as the current minute, rounded down.
    let edited = sim.mutate(json!({"database_id": db, "edit": 1})).await;
    let id = edited["edited"][0].as_str().expect("an edited page");
    let (_, _, page) = sim.call("GET", &format!("/v1/pages/{id}"), Some("2025-09-03"), None).await;
    let now = chrono::Utc::now();
    let floor = now.format("%Y-%m-%dT%H:%M:00.000Z").to_string();
    let edited_at = page["last_edited_time"].as_str().expect("time");
    assert!(edited_at == floor || now.timestamp() % 60 < 2, "{edited_at} vs {floor}");
    // `on_or_after` a time 30 s into the edit's minute misses it (the bug class the overlap
    // exists for); `on_or_after` the minute itself finds it.
    let minute = chrono::DateTime::parse_from_rfc3339(edited_at).expect("rfc3339");
    let later = (minute + chrono::Duration::seconds(30)).to_rfc3339();
    let filter = |t: String| json!({"filter": {"timestamp": "last_edited_time", "last_edited_time": {"on_or_after": t}}});
    let hits = sim.query_all(&ds, filter(later)).await;
    assert!(hits.iter().all(|p| p["id"] != id), "strictly later than the rounded time is excluded");
    let hits = sim.query_all(&ds, filter(edited_at.to_string())).await;
    assert!(hits.iter().any(|p| p["id"] == id));
    // Every filter operator agrees with a direct computation over all pages.
    let pivot = all[150]["created_time"].as_str().expect("pivot").to_string();
    for (op, cmp) in [
        ("on_or_after", (|a: &str, b: &str| a >= b) as fn(&str, &str) -> bool),
        ("after", |a, b| a > b),
        ("before", |a, b| a < b),
        ("on_or_before", |a, b| a <= b),
        ("equals", |a, b| a == b),
    ] {
        let body = json!({"filter": {"timestamp": "created_time", "created_time": {op: pivot}}});
        let got = sim.query_all(&ds, body).await.len();
        let want = all.iter().filter(|p| cmp(p["created_time"].as_str().unwrap_or_default(), &pivot)).count();
        assert_eq!(got, want, "operator {op}");
    }
    sim.server.stop().await;
}

#[tokio::test]
async fn over_the_rate_limit_it_answers_429_with_an_integer_retry_after() {
    let sim = Sim::start(10, 3.0).await;
    let (_, ds) = sim.info();
    let mut limited = None;
    for _ in 0..10 {
        let (s, headers, body) = sim
            .call("POST", &format!("/v1/data_sources/{ds}/query"), Some("2025-09-03"), Some(json!({})))
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            limited = Some((headers, body));
            break;
        }
    }
    let (headers, body) = limited.expect("a burst of 10 exceeds 3/s with burst 3");
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["object"], "error");
    assert_eq!(body["status"], 429);
    let retry_after = headers.get("retry-after").and_then(|v| v.to_str().ok()).expect("Retry-After");
    let secs: u64 = retry_after.parse().expect("an integer number of seconds");
    assert!(secs >= 1);
    let stats: Value = reqwest::get(format!("{}/_sim/stats", sim.server.base_url()))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["rate_limited_total"], 1);
    assert_eq!(stats["per_token"]["t0"]["max_admitted_in_any_1s"], 3);
    sim.server.stop().await;
}

#[tokio::test]
async fn auth_and_the_version_header_are_required() {
    let sim = Sim::start(5, 0.0).await;
    let (db, _) = sim.info();
    let url = format!("{}/v1/databases/{db}", sim.server.base_url());
    let resp = sim
        .http
        .get(&url)
        .bearer_auth("wrong")
        .header("Notion-Version", "2025-09-03")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "unauthorized");
    let resp = sim.http.get(&url).header("Notion-Version", "2025-09-03").send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let (s, _, body) = sim.call("GET", &format!("/v1/databases/{db}"), None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "missing_version");
    let (s, _, body) = sim.call("GET", &format!("/v1/databases/{db}"), Some("1999-01-01"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "validation_error");
    let (s, _, body) = sim.call("GET", "/v1/databases/not-a-uuid", Some("2025-09-03"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let (s, _, body) =
        sim.call("GET", &format!("/v1/databases/{}", uuid::Uuid::new_v4()), Some("2025-09-03"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "object_not_found");
    sim.server.stop().await;
}

#[tokio::test]
async fn cursors_are_session_scoped_and_an_unknown_one_is_rejected() {
    let sim = Sim::start(150, 0.0).await;
    let (_, ds) = sim.info();
    let (_, page) = sim.query(&ds, json!({"page_size": 100})).await;
    let cursor = page["next_cursor"].as_str().expect("cursor").to_string();
    let (s, body) = sim.query(&ds, json!({"start_cursor": "00000000-0000-0000-0000-000000000000"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "validation_error");
    assert!(body["message"].as_str().unwrap_or_default().contains("start_cursor"));
    // The same cursor with a different filter is not a continuation of that session.
    let other = json!({"start_cursor": cursor, "filter": {"timestamp": "created_time", "created_time": {"after": "2020-01-01"}}});
    assert_eq!(sim.query(&ds, other).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(sim.query(&ds, json!({"start_cursor": cursor})).await.0, StatusCode::OK);
    sim.http
        .post(format!("{}/_sim/invalidate-cursors", sim.server.base_url()))
        .send()
        .await
        .expect("invalidate");
    assert_eq!(sim.query(&ds, json!({"start_cursor": cursor})).await.0, StatusCode::BAD_REQUEST);
    sim.server.stop().await;
}

#[tokio::test]
async fn each_api_version_gets_its_own_shapes() {
    let sim = Sim::start(20, 0.0).await;
    let (db, ds) = sim.info();
    let (_, _, new) = sim.call("GET", &format!("/v1/databases/{db}"), Some("2025-09-03"), None).await;
    assert_eq!(new["data_sources"][0]["id"], ds.as_str());
    assert!(new.get("properties").is_none());
    let (_, _, old) = sim.call("GET", &format!("/v1/databases/{db}"), Some("2022-06-28"), None).await;
    assert!(old["properties"]["Name"]["type"] == "title");
    let (s, _, rows) =
        sim.call("POST", &format!("/v1/databases/{db}/query"), Some("2022-06-28"), Some(json!({}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(rows["results"][0]["parent"]["type"], "database_id");
    let (s, _, _) =
        sim.call("POST", &format!("/v1/data_sources/{ds}/query"), Some("2022-06-28"), Some(json!({}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, _, schema) = sim.call("GET", &format!("/v1/data_sources/{ds}"), Some("2025-09-03"), None).await;
    let types: HashSet<&str> = schema["properties"]
        .as_object()
        .expect("props")
        .values()
        .filter_map(|p| p["type"].as_str())
        .collect();
    for t in [
        "title",
        "rich_text",
        "number",
        "select",
        "multi_select",
        "status",
        "date",
        "people",
        "relation",
        "checkbox",
        "url",
        "email",
        "phone_number",
        "formula",
        "rollup",
        "files",
        "created_time",
        "created_by",
        "last_edited_time",
        "last_edited_by",
        "unique_id",
        "verification",
        "button",
        "place",
    ] {
        assert!(types.contains(t), "schema lacks {t}");
    }
    assert!(schema["properties"].get("ü 名前 🚀").is_some());
    let (_, _, v2026) = sim
        .call(
            "POST",
            &format!("/v1/data_sources/{ds}/query"),
            Some("2026-03-11"),
            Some(json!({"page_size": 1})),
        )
        .await;
    let page = &v2026["results"][0];
    assert_eq!(page["is_archived"], false);
    assert_eq!(page["in_trash"], false);
    assert_eq!(page["parent"]["type"], "data_source_id");
    for (path, kind) in [
        ("/v1/users", "user"),
        (&format!("/v1/blocks/{}/children", page["id"].as_str().unwrap_or_default()), "block"),
    ] {
        let (s, _, list) = sim.call("GET", path, Some("2025-09-03"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(list["type"], kind);
    }
    let (s, _, found) = sim
        .call(
            "POST",
            "/v1/search",
            Some("2025-09-03"),
            Some(json!({"filter": {"property": "object", "value": "data_source"}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(found["results"][0]["object"], "data_source");
    sim.server.stop().await;
}

/// Every item of one page's property, paged through `GET /v1/pages/{id}/properties/{prop}`
/// 25 at a time (`prop` already percent-encoded for the path).
async fn property_items(sim: &Sim, page_id: &str, prop: &str, ty: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/pages/{page_id}/properties/{prop}?page_size=25");
        if let Some(c) = &cursor {
            path.push_str(&format!("&start_cursor={c}"));
        }
        let (s, _, list) = sim.call("GET", &path, Some("2025-09-03"), None).await;
        assert_eq!(s, StatusCode::OK, "{list}");
        assert_eq!(list["property_item"]["type"], ty);
        items.extend(list["results"].as_array().cloned().unwrap_or_default());
        match list["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    items
}

#[tokio::test]
async fn long_titles_rich_text_and_people_are_truncated_at_25_and_complete_via_the_property_endpoint() {
    let sim = Sim::start(600, 0.0).await;
    let (_, ds) = sim.info();
    let all = sim.query_all(&ds, json!({})).await;
    // (property name, id in the path, type, items it really has)
    for (name, prop, ty, total) in [
        ("Name", "title", "title", 30),
        ("Notes", "nt%253Bs", "rich_text", 40),
        ("Owner", "ow%255Bn", "people", 31),
    ] {
        let long: Vec<&Value> =
            all.iter().filter(|p| p["properties"][name][ty].as_array().map(Vec::len) == Some(25)).collect();
        assert_eq!(long.len(), 2, "two of 600 pages have a long {name} shown as its first 25 items");
        for page in long {
            let id = page["id"].as_str().expect("id");
            let items = property_items(&sim, id, prop, ty).await;
            assert_eq!(items.len(), total, "{name}");
            let shown = page["properties"][name][ty].as_array().expect("list");
            for (item, inline) in items.iter().zip(shown) {
                assert_eq!(&item[ty], inline, "the page object shows the first 25 items in order");
            }
        }
    }
    sim.server.stop().await;
}

#[tokio::test]
async fn relations_over_25_are_truncated_in_the_page_and_complete_via_the_property_endpoint() {
    let sim = Sim::start(600, 0.0).await;
    let (_, ds) = sim.info();
    let all = sim.query_all(&ds, json!({})).await;
    let page = all
        .iter()
        .find(|p| p["properties"]["Related"]["has_more"] == true)
        .expect("a page with > 25 relations");
    assert_eq!(page["properties"]["Related"]["relation"].as_array().map(Vec::len), Some(25));
    let id = page["id"].as_str().expect("id");
    let items = property_items(&sim, id, "rl%253Ft", "relation").await;
    assert_eq!(items.len(), 60);
    sim.server.stop().await;
}

#[tokio::test]
async fn injected_faults_and_trash_behave_like_notion() {
    let sim = Sim::start(30, 0.0).await;
    let (db, ds) = sim.info();
    let admin = |p: &str| format!("{}/_sim/{p}", sim.server.base_url());
    sim.http.post(admin("faults")).json(&json!({"status": 503, "count": 2})).send().await.expect("fault");
    assert_eq!(sim.query(&ds, json!({})).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sim.query(&ds, json!({})).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sim.query(&ds, json!({})).await.0, StatusCode::OK);
    let trashed: Value = sim
        .http
        .post(admin("mutate"))
        .json(&json!({"database_id": db, "trash": 3}))
        .send()
        .await
        .expect("m")
        .json()
        .await
        .expect("j");
    assert_eq!(trashed["trashed"].as_array().map(Vec::len), Some(3));
    assert_eq!(sim.query_all(&ds, json!({})).await.len(), 27, "trashed pages leave query results");
    let export: Value = reqwest::get(admin("export")).await.expect("export").json().await.expect("json");
    let pages = export["databases"][0]["pages"].as_array().expect("pages");
    assert_eq!(pages.len(), 30);
    assert_eq!(pages.iter().filter(|p| p["in_trash"] == true).count(), 3);
    sim.server.stop().await;
}

#[tokio::test]
async fn offset_cursors_drift_a_trashed_page_skips_a_live_one_and_an_edited_one_is_read_twice() {
    let sim = Sim::start(300, 0.0).await;
    let (_, ds) = sim.info();
    let admin = format!("{}/_sim", sim.server.base_url());
    let set = sim.http.post(format!("{admin}/config")).json(&json!({"offset_cursors": true})).send().await;
    assert_eq!(set.expect("config").status(), StatusCode::OK);
    let ascending =
        json!({"page_size": 100, "sorts": [{"timestamp": "created_time", "direction": "ascending"}]});
    let keyset = sim.query_all(&ds, ascending.clone()).await;
    let order: Vec<String> = keyset.iter().filter_map(|p| p["id"].as_str().map(String::from)).collect();
    // Trashing five pages behind the cursor shifts the rest: the next five live pages are skipped.
    let (_, first) = sim.query(&ds, ascending.clone()).await;
    let trashed: Vec<&str> = order[..5].iter().map(String::as_str).collect();
    let mutated = sim.http.post(format!("{admin}/mutate")).json(&json!({"trash_ids": trashed})).send().await;
    assert_eq!(mutated.expect("mutate").status(), StatusCode::OK);
    let mut next = ascending.clone();
    next["start_cursor"] = first["next_cursor"].clone();
    let (status, second) = sim.query(&ds, next).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let got: HashSet<&str> = first["results"]
        .as_array()
        .into_iter()
        .chain(second["results"].as_array())
        .flatten()
        .filter_map(|p| p["id"].as_str())
        .collect();
    let skipped: Vec<&String> = order[100..105].iter().filter(|id| !got.contains(id.as_str())).collect();
    assert_eq!(skipped.len(), 5, "five live pages slid behind the cursor");
    // Sorted by last edit, an edit moves a page already read to the end: it is read twice, and
    // the page that slid into its place is skipped.
    let by_edit =
        json!({"page_size": 50, "sorts": [{"timestamp": "last_edited_time", "direction": "ascending"}]});
    let (_, head) = sim.query(&ds, by_edit.clone()).await;
    let early = head["results"][0]["id"].as_str().expect("id").to_string();
    let mutated = sim.http.post(format!("{admin}/mutate")).json(&json!({"edit_ids": [early]})).send().await;
    assert_eq!(mutated.expect("mutate").status(), StatusCode::OK);
    let mut rest = by_edit.clone();
    rest["start_cursor"] = head["next_cursor"].clone();
    let tail = sim.query_all(&ds, rest).await;
    assert!(tail.iter().any(|p| p["id"] == early.as_str()), "the edited page is read again");
    assert_eq!(
        head["results"].as_array().map(Vec::len).unwrap_or(0) + tail.len(),
        295,
        "one read twice, one skipped"
    );
    sim.server.stop().await;
}

#[tokio::test]
async fn random_faults_resets_truncated_json_slow_answers_revoked_tokens_and_unshared_databases() {
    let sim = Sim::start(20, 0.0).await;
    let (db, ds) = sim.info();
    let admin = format!("{}/_sim", sim.server.base_url());
    let config = |body: Value| {
        let http = sim.http.clone();
        let url = format!("{admin}/config");
        async move { assert!(http.post(url).json(&body).send().await.expect("config").status().is_success()) }
    };
    config(json!({"error_rate": 1.0})).await;
    let (status, body) = sim.query(&ds, json!({})).await;
    assert!([500, 502, 503, 504].contains(&status.as_u16()), "{status}");
    assert_eq!(body["object"], "error");
    config(json!({"error_rate": 0.0, "reset_rate": 1.0})).await;
    let url = format!("{}/v1/data_sources/{ds}/query", sim.server.base_url());
    let answer = sim
        .http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("Notion-Version", "2025-09-03")
        .json(&json!({}))
        .send()
        .await;
    let reset = match answer {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(reset, "the connection breaks mid-answer");
    config(json!({"reset_rate": 0.0, "truncate_rate": 1.0})).await;
    let text = sim
        .http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("Notion-Version", "2025-09-03")
        .json(&json!({}))
        .send()
        .await
        .expect("answer")
        .text()
        .await
        .expect("body");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "cut-short JSON: {text}");
    config(json!({"truncate_rate": 0.0, "slow_rate": 1.0, "slow_ms": 400})).await;
    let started = std::time::Instant::now();
    assert_eq!(sim.query(&ds, json!({})).await.0, StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
    config(json!({"slow_rate": 0.0})).await;
    let unshare = sim.http.post(format!("{admin}/unshare")).json(&json!({"database_id": db})).send().await;
    assert!(unshare.expect("unshare").status().is_success());
    let (status, body) = sim.query(&ds, json!({})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("object_not_found")));
    let revoke = sim.http.post(format!("{admin}/revoke")).json(&json!({"token": TOKEN})).send().await;
    assert!(revoke.expect("revoke").status().is_success());
    let (status, _, body) = sim.call("GET", "/v1/users", Some("2025-09-03"), None).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    sim.server.stop().await;
}

impl Sim {
    /// Every child of `id` through `GET /v1/blocks/{id}/children`, following cursors; each
    /// child with a `children` array read the same way (child pages are not followed). Also
    /// counts the requests.
    async fn read_tree(&self, id: &str, page_size: usize, requests: &mut u64) -> Vec<Value> {
        let (results, made) = self.get_all(&format!("/v1/blocks/{id}/children"), "block", page_size).await;
        *requests += made;
        let mut out = Vec::new();
        for mut block in results {
            let children = if block["has_children"] == true && block["type"] != "child_page" {
                let child_id = block["id"].as_str().expect("id").to_string();
                Box::pin(self.read_tree(&child_id, page_size, requests)).await
            } else {
                Vec::new()
            };
            block["children"] = Value::Array(children);
            out.push(block);
        }
        out
    }

    /// `POST /_sim/mutate`, which must succeed; its answer.
    async fn mutate(&self, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/_sim/mutate", self.server.base_url()))
            .json(&body)
            .send()
            .await
            .expect("mutate");
        assert_eq!(response.status(), StatusCode::OK, "mutate {body}");
        response.json().await.expect("mutate answers JSON")
    }

    /// Every item of a GET list endpoint, `page_size` a request, following cursors; and the
    /// requests it took.
    async fn get_all(&self, path: &str, kind: &str, page_size: usize) -> (Vec<Value>, u64) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for requests in 1..=1000 {
            let mut url = format!("{path}{sep}page_size={page_size}");
            if let Some(c) = &cursor {
                url.push_str(&format!("&start_cursor={c}"));
            }
            let (status, _, page) = self.call("GET", &url, Some("2025-09-03"), None).await;
            assert_eq!(status, StatusCode::OK, "{url}: {page}");
            assert_eq!(page["object"], "list");
            assert_eq!(page["type"], kind);
            let results = page["results"].as_array().cloned().unwrap_or_default();
            assert!(results.len() <= page_size);
            out.extend(results);
            match page["next_cursor"].as_str() {
                Some(c) if page["has_more"] == true => cursor = Some(c.to_string()),
                _ => return (out, requests),
            }
        }
        panic!("{path}: pagination did not end");
    }

    async fn export_with_content(&self) -> Value {
        self.http
            .get(format!("{}/_sim/export?content=true", self.server.base_url()))
            .send()
            .await
            .expect("export")
            .json()
            .await
            .expect("export json")
    }
}

#[tokio::test]
async fn block_trees_read_through_the_children_endpoint_equal_the_export_and_a_content_edit_changes_them() {
    let sim = Sim::start(1100, 0.0).await;
    let export = sim.export_with_content().await;
    let pages = export["databases"][0]["pages"].as_array().expect("pages").clone();
    assert_eq!(pages.len(), 1100);
    // The showcase (0), a long page (13), a deep one (7), a very large one (501) and plain ones:
    // each read through the endpoint equals the export, in exactly the requests the tree needs.
    let floor = |seq: usize, page_size: usize| {
        use syncfleet_tests::sim::blocks;
        let ws = sim.server.state.read();
        let db = &ws.databases[0];
        blocks::requests_to_read(&blocks::tree(ws.seed, &ws.users, db, &db.pages[seq]), page_size)
    };
    for seq in [0usize, 1, 2, 7, 13, 501] {
        let id = pages[seq]["id"].as_str().expect("id");
        let mut requests = 0;
        let tree = sim.read_tree(id, 100, &mut requests).await;
        assert!(Value::Array(tree.clone()) == pages[seq]["blocks"], "page {seq} differs from the export");
        assert_eq!(requests, floor(seq, 100), "page {seq}");
        if seq == 13 {
            assert!(
                tree.len() > 100 && requests >= 2,
                "{} top-level blocks, {requests} requests",
                tree.len()
            );
        }
        // Smaller pages of results give the same tree.
        if seq == 7 || seq == 13 {
            let mut r = 0;
            assert!(sim.read_tree(id, 7, &mut r).await == tree, "page {seq} read 7 blocks at a time differs");
            assert_eq!(r, floor(seq, 7), "page {seq}, 7 a request");
        }
    }
    let depth = |tree: &Value| -> usize {
        fn walk(v: &Value) -> usize {
            v.as_array().map(|a| a.iter().map(|b| 1 + walk(&b["children"])).max().unwrap_or(0)).unwrap_or(0)
        }
        walk(tree)
    };
    assert!(depth(&pages[7]["blocks"]) >= 5, "nested at least four levels below the top");
    let showcase: HashSet<&str> = {
        fn kinds<'a>(v: &'a Value, out: &mut HashSet<&'a str>) {
            for b in v.as_array().into_iter().flatten() {
                out.extend(b["type"].as_str());
                kinds(&b["children"], out);
            }
        }
        let mut out = HashSet::new();
        kinds(&pages[0]["blocks"], &mut out);
        out
    };
    for ty in [
        "heading_1",
        "bulleted_list_item",
        "to_do",
        "toggle",
        "code",
        "quote",
        "callout",
        "table",
        "table_row",
        "equation",
        "child_page",
        "child_database",
        "unsupported",
    ] {
        assert!(showcase.contains(ty), "the showcase page has a {ty} block");
    }

    // Errors: an unknown block, a bad page size, a cursor from elsewhere.
    let first = pages[1]["id"].as_str().expect("id");
    let foreign = pages[2]["blocks"][0]["id"].as_str().expect("block id");
    let unknown_ordinal = syncfleet_tests::sim::blocks::block_id(0, 1, 999_999);
    let unknown_page = syncfleet_tests::sim::blocks::block_id(0, 50_000, 0);
    for (path, want) in [
        ("/v1/blocks/6f1f6c1e-0000-4000-8000-000000000000/children".to_string(), (404, "object_not_found")),
        (format!("/v1/blocks/{unknown_ordinal}/children"), (404, "object_not_found")),
        (format!("/v1/blocks/{unknown_page}/children"), (404, "object_not_found")),
        (format!("/v1/blocks/{first}/children?page_size=101"), (400, "validation_error")),
        (format!("/v1/blocks/{first}/children?start_cursor={foreign}"), (400, "validation_error")),
    ] {
        let (status, _, body) = sim.call("GET", &path, Some("2025-09-03"), None).await;
        assert_eq!((status.as_u16(), body["code"].as_str().unwrap_or_default()), want, "{path}: {body}");
    }

    // A content edit changes the page's text and last_edited_time, not its ids or properties.
    sim.mutate(json!({"content_edit_ids": [first]})).await;
    let after = sim.export_with_content().await["databases"][0]["pages"][1].clone();
    // Every block's id and text, depth first.
    fn walk(v: &Value, out: &mut Vec<(String, Vec<String>)>) {
        for b in v.as_array().into_iter().flatten() {
            let mut texts = Vec::new();
            let ty = b["type"].as_str().unwrap_or_default();
            for t in b[ty]["rich_text"].as_array().into_iter().flatten() {
                texts.extend(t["plain_text"].as_str().map(String::from));
            }
            out.push((b["id"].as_str().unwrap_or_default().to_string(), texts));
            walk(&b["children"], out);
        }
    }
    let (mut was_blocks, mut now_blocks) = (Vec::new(), Vec::new());
    walk(&pages[1]["blocks"], &mut was_blocks);
    walk(&after["blocks"], &mut now_blocks);
    let ids = |v: &[(String, Vec<String>)]| v.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&now_blocks), ids(&was_blocks), "the same blocks at every depth");
    let changed = was_blocks.iter().zip(&now_blocks).filter(|(a, b)| a.1 != b.1).count();
    assert!(changed > 0 && changed < was_blocks.len(), "the text of some blocks changed ({changed})");
    // The properties did not change, except the ones that show the edit itself (and a formula
    // computed from the edit time).
    let values = |v: &Value| -> Vec<(String, Value)> {
        let mut out: Vec<(String, Value)> = v
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, p)| {
                !matches!(p["type"].as_str(), Some("last_edited_time" | "last_edited_by" | "formula"))
            })
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    };
    assert!(values(&after["properties"]).len() > 5);
    let (was, now) = (values(&pages[1]["properties"]), values(&after["properties"]));
    let changed: Vec<_> =
        was.iter().zip(&now).filter(|(a, b)| a != b).map(|(a, b)| (a.1.clone(), b.1.clone())).collect();
    assert!(changed.is_empty(), "the other properties did not change: {changed:?}");
    assert!(
        after["last_edited_time"].as_str() > pages[1]["last_edited_time"].as_str(),
        "the edit time moved"
    );
    let mut requests = 0;
    assert!(
        Value::Array(sim.read_tree(first, 100, &mut requests).await) == after["blocks"],
        "the edit is served"
    );
    sim.server.stop().await;
}

#[tokio::test]
async fn users_are_listed_page_by_page_people_first_then_the_integration_bot() {
    let sim = Sim::start(10, 0.0).await;
    let (status, _, whole) = sim.call("GET", "/v1/users", Some("2025-09-03"), None).await;
    assert_eq!(status, StatusCode::OK);
    let whole = whole["results"].as_array().cloned().unwrap_or_default();
    let people = sim.server.state.read().users.len();
    assert_eq!(whole.len(), people + 1);
    assert!(whole[..people].iter().all(|u| u["type"] == "person" && u["person"]["email"].is_string()));
    assert_eq!(whole[people]["type"], "bot");
    let (read, requests) = sim.get_all("/v1/users", "user", 2).await;
    assert_eq!(read, whole);
    assert_eq!(requests as usize, whole.len().div_ceil(2));
    let (status, _, body) =
        sim.call("GET", "/v1/users?start_cursor=not-a-cursor", Some("2025-09-03"), None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("validation_error")),
        "{body}"
    );
    sim.server.stop().await;
}

#[tokio::test]
async fn comments_are_listed_oldest_first_page_by_page_and_an_added_one_appears_without_moving_the_page() {
    let sim = Sim::start(60, 0.0).await;
    let export_url = format!("{}/_sim/export?comments=true&content=true", sim.server.base_url());
    let export: Value = sim.http.get(&export_url).send().await.expect("export").json().await.expect("json");
    let pages = export["databases"][0]["pages"].as_array().expect("pages").clone();
    let mut with_comments = 0;
    for page in &pages {
        let id = page["id"].as_str().expect("id").to_string();
        let (listed, _) = sim.get_all(&format!("/v1/comments?block_id={id}"), "comment", 1).await;
        assert_eq!(Value::Array(listed.clone()), page["comments"], "page {id}");
        with_comments += usize::from(!listed.is_empty());
        for c in &listed {
            assert_eq!(c["object"], "comment");
            assert_eq!(c["parent"]["page_id"], id.as_str());
            assert!(c["discussion_id"].is_string() && c["created_by"]["id"].is_string());
        }
    }
    assert_eq!(with_comments, 12, "every fifth page, from the third");

    // Errors, and a block's (empty) discussion list.
    let block = pages[1]["blocks"][0]["id"].as_str().expect("block id");
    for (path, want) in [
        ("/v1/comments".to_string(), (400, "validation_error")),
        ("/v1/comments?block_id=nope".to_string(), (400, "validation_error")),
        ("/v1/comments?block_id=6f1f6c1e-0000-4000-8000-000000000000".to_string(), (404, "object_not_found")),
        (format!("/v1/comments?block_id={block}&start_cursor=nope"), (400, "validation_error")),
    ] {
        let (status, _, body) = sim.call("GET", &path, Some("2025-09-03"), None).await;
        assert_eq!((status.as_u16(), body["code"].as_str().unwrap_or_default()), want, "{path}: {body}");
    }
    let (status, _, body) =
        sim.call("GET", &format!("/v1/comments?block_id={block}"), Some("2025-09-03"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["results"], json!([]));

    // A comment added to a page without any: listed last, the page's edit time unchanged.
    let target = pages[0]["id"].as_str().expect("id").to_string();
    sim.mutate(json!({"comment_add_ids": [target]})).await;
    // … and a count picks pages at random: each gets one more.
    let response = sim.mutate(json!({"comment_add": 3})).await;
    let picked = response["commented"].as_array().cloned().unwrap_or_default();
    assert_eq!(picked.len(), 3, "{response}");
    let bogus = sim.http.get(format!("{}/_sim/export?comments=yes", sim.server.base_url())).send().await;
    assert_eq!(bogus.expect("export").status(), StatusCode::BAD_REQUEST);
    let (listed, _) = sim.get_all(&format!("/v1/comments?block_id={target}"), "comment", 1).await;
    assert_eq!(listed.len(), 1 + usize::from(picked.contains(&json!(target))), "{listed:?}");
    let after: Value = sim.http.get(&export_url).send().await.expect("export").json().await.expect("json");
    assert_eq!(after["databases"][0]["pages"][0]["comments"], Value::Array(listed));
    assert_eq!(after["databases"][0]["pages"][0]["last_edited_time"], pages[0]["last_edited_time"]);
    let after_pages = after["databases"][0]["pages"].as_array().expect("pages");
    for (was, now) in pages.iter().zip(after_pages) {
        let count = |p: &Value| p["comments"].as_array().map_or(0, Vec::len);
        let added = usize::from(was["id"] == target.as_str()) + usize::from(picked.contains(&was["id"]));
        assert_eq!(count(now), count(was) + added, "page {}", was["id"]);
    }
    sim.server.stop().await;
}
