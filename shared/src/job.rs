//! The sync job contract (v1): a CloudEvents 1.0 structured-mode JSON message.
//!
//! Any AMQP client in any language can enqueue a sync by publishing this body to the work exchange.
//! The JSON Schema in `shared/schema/` is generated from these types (see [`json_schema`]) and a test
//! keeps the committed copy current.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// CloudEvents `type` of a v1 sync job.
pub const JOB_TYPE: &str = "dev.syncfleet.sync_database.v1";
/// CloudEvents spec version this contract speaks.
pub const SPEC_VERSION: &str = "1.0";
/// AMQP `content_type` of a job message.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// AMQP header carrying the attempt number (1 for a first delivery).
pub const ATTEMPT_HEADER: &str = "x-syncfleet-attempt";
/// AMQP header carrying why a message was dead-lettered.
pub const DEAD_REASON_HEADER: &str = "x-syncfleet-dead-reason";
/// Largest body a worker will look at; anything bigger is dead-lettered unread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A sync job as it travels over AMQP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "syncfleet sync_database job v1",
    description = "CloudEvents 1.0 structured-mode event asking syncfleet to sync one Notion database."
)]
pub struct JobEnvelope {
    /// Always "1.0".
    pub specversion: String,
    /// Always "dev.syncfleet.sync_database.v1".
    #[serde(rename = "type")]
    pub event_type: String,
    /// Who asked, as a URI reference, e.g. "urn:syncfleet:scheduler".
    pub source: String,
    /// The job id: a UUID, also the AMQP message_id and the idempotency key.
    pub id: Uuid,
    /// When the job was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    /// "application/json" when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    pub data: SyncDatabaseJob,
}

/// What to sync and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncDatabaseJob {
    /// Slug of the integration that owns the database. Optional: omitted or empty, the worker
    /// uses the integration the database is registered with.
    #[serde(default)]
    #[schemars(length(max = 64), regex(pattern = r"^[A-Za-z0-9_-]*$"))]
    pub integration: String,
    /// Notion database id (UUID, with or without dashes).
    pub database_id: Uuid,
    pub mode: SyncMode,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub reason: Reason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Every page; afterwards pages not seen are marked deleted.
    Full,
    /// Pages edited since the watermark (minus the overlap).
    Incremental,
}

impl SyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Incremental => "incremental",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// AMQP message priority (0–9).
    pub fn amqp_priority(self) -> u8 {
        match self {
            Priority::Low => 1,
            Priority::Normal => 4,
            Priority::High => 8,
        }
    }
}

/// Why the job exists. A bounded set, so it can be a metric label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Schedule,
    #[default]
    Manual,
    Api,
    Reconcile,
    Rerun,
    Webhook,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Schedule => "schedule",
            Reason::Manual => "manual",
            Reason::Api => "api",
            Reason::Reconcile => "reconcile",
            Reason::Rerun => "rerun",
            Reason::Webhook => "webhook",
        }
    }
}

/// Why a message is not a valid job. The text goes into the dead-letter reason header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("unsupported specversion {0:?}, expected \"1.0\"")]
    SpecVersion(String),
    #[error("unknown event type {0:?}, expected \"{JOB_TYPE}\"")]
    UnknownType(String),
    #[error("invalid job: {0}")]
    Invalid(String),
}

impl JobError {
    /// A short, bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            JobError::TooLarge => "too_large",
            JobError::NotJson(_) => "not_json",
            JobError::SpecVersion(_) => "spec_version",
            JobError::UnknownType(_) => "unknown_type",
            JobError::Invalid(_) => "invalid",
        }
    }
}

impl JobEnvelope {
    /// A new job from `source` with a fresh id and the current time.
    pub fn new(source: &str, data: SyncDatabaseJob) -> Self {
        Self {
            specversion: SPEC_VERSION.into(),
            event_type: JOB_TYPE.into(),
            source: source.into(),
            id: Uuid::new_v4(),
            time: Some(Utc::now()),
            datacontenttype: Some("application/json".into()),
            data,
        }
    }

    /// Parses and validates a message body. Never panics, whatever the bytes.
    pub fn parse(body: &[u8]) -> Result<Self, JobError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(JobError::TooLarge);
        }
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| JobError::NotJson(truncate(&e.to_string())))?;
        let object =
            value.as_object().ok_or_else(|| JobError::Invalid("body is not a JSON object".into()))?;
        match object.get("specversion").and_then(|v| v.as_str()) {
            Some(SPEC_VERSION) => {}
            Some(other) => return Err(JobError::SpecVersion(truncate(other))),
            None => return Err(JobError::Invalid("missing field `specversion`".into())),
        }
        match object.get("type").and_then(|v| v.as_str()) {
            Some(JOB_TYPE) => {}
            Some(other) => return Err(JobError::UnknownType(truncate(other))),
            None => return Err(JobError::Invalid("missing field `type`".into())),
        }
        let envelope: JobEnvelope =
            serde_json::from_value(value).map_err(|e| JobError::Invalid(truncate(&e.to_string())))?;
        envelope.validate()?;
        Ok(envelope)
    }

    fn validate(&self) -> Result<(), JobError> {
        if self.source.is_empty() {
            return Err(JobError::Invalid("`source` must not be empty".into()));
        }
        let slug = &self.data.integration;
        if slug.len() > 64 || !slug.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(JobError::Invalid("`data.integration` must be at most 64 of [A-Za-z0-9_-]".into()));
        }
        if let Some(ct) = &self.datacontenttype
            && ct != "application/json"
        {
            return Err(JobError::Invalid(format!("unsupported datacontenttype {}", truncate(ct))));
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data structs to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Keeps attacker-controlled text in errors short.
fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A UUID in any form the worker accepts: 32 hex digits, or hyphenated (optionally in braces or
/// as a `urn:uuid:`).
pub const UUID_PATTERN: &str = "^(?:[0-9A-Fa-f]{32}|(?:urn:uuid:)?[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|\\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\\})$";

fn uuid_schema(description: &str) -> serde_json::Value {
    serde_json::json!({"type": "string", "pattern": UUID_PATTERN, "description": description})
}

/// The JSON Schema of [`JobEnvelope`], as published in `shared/schema/`.
pub fn json_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(JobEnvelope)).unwrap_or_default();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("$id".into(), "https://syncfleet.dev/schema/sync_database.v1.json".into());
        if let Some(props) = obj.get_mut("properties").and_then(|p| p.as_object_mut()) {
            props.insert("specversion".into(), serde_json::json!({"const": SPEC_VERSION}));
            props.insert("type".into(), serde_json::json!({"const": JOB_TYPE}));
            props.insert(
                "id".into(),
                uuid_schema("The job id, also the AMQP message_id and the idempotency key."),
            );
        }
        // The worker reads ids with `Uuid::parse_str`: dashes are optional, as in Notion's URLs.
        if let Some(props) = obj
            .get_mut("$defs")
            .and_then(|d| d.get_mut("SyncDatabaseJob"))
            .and_then(|j| j.get_mut("properties"))
            .and_then(|p| p.as_object_mut())
        {
            props.insert("database_id".into(), uuid_schema("Notion database id, with or without dashes."));
        }
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> serde_json::Value {
        serde_json::json!({
            "specversion": "1.0", "type": JOB_TYPE, "source": "urn:test", "id": Uuid::new_v4(),
            "time": "2026-11-22T14:00:00Z", "datacontenttype": "application/json",
            "data": {"integration": "acme", "database_id": Uuid::new_v4(), "mode": "incremental",
                     "priority": "normal", "reason": "schedule"}
        })
    }

    #[test]
    fn a_valid_job_round_trips() {
        let body = serde_json::to_vec(&valid()).expect("json");
        let job = JobEnvelope::parse(&body).expect("valid");
        assert_eq!(job.data.mode, SyncMode::Incremental);
        assert_eq!(JobEnvelope::parse(&job.to_json()).expect("round trip"), job);
    }

    #[test]
    fn bad_messages_get_a_clear_error_not_a_panic() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "not_json"),
            (b"[]".to_vec(), "invalid"),
            (vec![0xff, 0xfe, 0x00], "not_json"),
            (vec![b' '; MAX_BODY_BYTES + 1], "too_large"),
        ];
        for (body, kind) in cases {
            assert_eq!(JobEnvelope::parse(&body).expect_err("rejected").kind(), kind);
        }
        let mut v = valid();
        v["type"] = "com.example.other".into();
        assert_eq!(JobEnvelope::parse(v.to_string().as_bytes()).expect_err("type").kind(), "unknown_type");
        let mut v = valid();
        v["data"]["mode"] = 7.into();
        assert_eq!(JobEnvelope::parse(v.to_string().as_bytes()).expect_err("mode").kind(), "invalid");
        let mut v = valid();
        v["data"]["integration"] = "a b;DROP".into();
        assert_eq!(JobEnvelope::parse(v.to_string().as_bytes()).expect_err("slug").kind(), "invalid");
        let mut v = valid();
        v["data"].as_object_mut().expect("object").remove("database_id");
        assert_eq!(JobEnvelope::parse(v.to_string().as_bytes()).expect_err("missing").kind(), "invalid");
    }

    #[test]
    fn ids_without_dashes_and_jobs_without_an_integration_are_accepted() {
        let mut v = valid();
        let db = Uuid::new_v4();
        v["id"] = Uuid::new_v4().simple().to_string().into();
        v["data"]["database_id"] = db.simple().to_string().into();
        v["data"].as_object_mut().expect("object").remove("integration");
        let job = JobEnvelope::parse(v.to_string().as_bytes()).expect("valid");
        assert_eq!((job.data.database_id, job.data.integration.as_str()), (db, ""));
        for form in [
            db.simple().to_string(),
            db.hyphenated().to_string(),
            db.braced().to_string(),
            db.urn().to_string(),
        ] {
            assert_eq!(Uuid::parse_str(&form).ok(), Some(db), "{form}");
        }
    }

    #[test]
    fn the_published_schema_is_current() {
        let committed = include_str!("../schema/sync_database.v1.schema.json");
        let committed: serde_json::Value = serde_json::from_str(committed).expect("committed schema is JSON");
        assert_eq!(
            committed,
            json_schema(),
            "run `syncfleet-producer schema > shared/schema/sync_database.v1.schema.json`"
        );
    }
}
