//! Every Prometheus metric of syncfleet: the one place that spells a metric name or a label.
//!
//! Both binaries build a [`Metrics`] for their [`Role`]; it registers the families that binary
//! exports (the producer does not process jobs, the worker does not schedule them) in its own
//! registry, together with the process collector and `syncfleet_build_info`. Conventions: prefix
//! `syncfleet_`, base units (seconds), `_total` counters, no ids as labels — the integration slug
//! is the only high-ish cardinality label, the database slug appears only on the freshness
//! gauge, and every bounded label set is zero-initialised at start so dashboards and alerts see
//! zeros instead of gaps.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::notion::Endpoint;

/// Which binary the metrics belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Producer,
    Worker,
}

/// `syncfleet_jobs_processed_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Retried,
    DeadLettered,
    Skipped,
    Rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::Retried,
        Outcome::DeadLettered,
        Outcome::Skipped,
        Outcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Skipped => "skipped",
            Outcome::Rejected => "rejected",
        }
    }
}

/// `status_class` of a Notion request: `2xx`, `4xx`, `429`, `5xx`, or `error` (no HTTP answer).
pub const STATUS_CLASSES: [&str; 5] = ["2xx", "4xx", "429", "5xx", "error"];

/// `syncfleet_notifications_total{outcome}`.
pub const NOTIFICATION_OUTCOMES: [&str; 4] = ["sent", "deduplicated", "rate_limited", "failed"];

/// `syncfleet_webhook_events_total{outcome}`.
pub const WEBHOOK_OUTCOMES: [&str; 8] = [
    "verification_token_stored",
    "enqueued",
    "coalesced",
    "follow_up_requested",
    "disabled",
    "duplicate",
    "ignored",
    "bad_signature",
];

/// `syncfleet_pages_total{change}`.
pub const CHANGES: [&str; 5] = ["created", "updated", "unchanged", "deleted", "invalid"];

/// `syncfleet_jobs_published_total{reason}` (the job contract's reasons).
pub const REASONS: [&str; 6] = ["schedule", "manual", "api", "reconcile", "rerun", "webhook"];

const JOB_DURATION_BUCKETS: &[f64] =
    &[0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0];
const QUEUE_WAIT_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];
const REQUEST_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const BUDGET_WAIT_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The metric families. Cheap to share (`Arc<Metrics>`); every handle is itself shareable.
pub struct Metrics {
    registry: Registry,
    role: Role,
    pub jobs_published: IntCounterVec,
    pub jobs_processed: IntCounterVec,
    pub job_duration: Histogram,
    pub job_queue_wait: Histogram,
    pub jobs_in_flight: IntGauge,
    pub worker_concurrency: IntGauge,
    pub notion_requests: IntCounterVec,
    pub notion_request_duration: HistogramVec,
    pub notion_rate_limited: IntCounterVec,
    pub rate_budget_wait: Histogram,
    pub rate_budget_configured: GaugeVec,
    pub rate_budget_effective: GaugeVec,
    pub pages: IntCounterVec,
    pub lock_contended: IntCounter,
    pub jobs_parked: IntCounter,
    pub lease_lost: IntCounter,
    pub fence_rejected_writes: IntCounter,
    pub job_panics: IntCounter,
    pub notifications: IntCounterVec,
    pub status_write_failures: IntCounter,
    pub runs_reaped: IntCounter,
    pub amqp_reconnects: IntCounter,
    pub circuit_open: IntGaugeVec,
    pub database_last_success: GaugeVec,
    pub database_interval: GaugeVec,
    pub scheduler_last_tick: Gauge,
    /// `pg_notification_queue_usage()`: a listener that stops reading (a frozen producer) fills
    /// PostgreSQL's NOTIFY queue, and a full queue fails the workers' commits.
    pub notify_queue_usage: Gauge,
    /// Server-Sent Event streams open on this producer.
    pub sse_clients: IntGauge,
    pub webhook_events: IntCounterVec,
    build_info: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("role", &self.role).finish_non_exhaustive()
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    built(name, IntCounterVec::new(Opts::new(name, help), labels))
}

fn counter(name: &str, help: &str) -> IntCounter {
    built(name, IntCounter::new(name, help))
}

fn gauge(name: &str, help: &str) -> Gauge {
    built(name, Gauge::new(name, help))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    built(name, GaugeVec::new(Opts::new(name, help), labels))
}

fn int_gauge(name: &str, help: &str) -> IntGauge {
    built(name, IntGauge::new(name, help))
}

fn int_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    built(name, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    built(name, Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())))
}

fn histogram_vec(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    built(name, HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels))
}

/// The names and label sets above are constants, so construction cannot fail at run time; a
/// typo would fail every test at once. Kept as one function so no call site needs `expect`.
#[allow(clippy::panic)]
fn built<T>(name: &str, result: Result<T, prometheus::Error>) -> T {
    result.unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"))
}

impl Metrics {
    /// Builds and registers the families `role` exports, with their label sets at zero.
    pub fn new(role: Role) -> Arc<Self> {
        let m = Self {
            registry: Registry::new(),
            role,
            jobs_published: counter_vec(
                "syncfleet_jobs_published_total",
                "Sync jobs published to RabbitMQ and confirmed by the broker, by reason.",
                &["reason"],
            ),
            jobs_processed: counter_vec(
                "syncfleet_jobs_processed_total",
                "Job deliveries settled by workers, by outcome.",
                &["outcome"],
            ),
            job_duration: histogram(
                "syncfleet_job_duration_seconds",
                "Time from taking a delivery to settling it.",
                JOB_DURATION_BUCKETS,
            ),
            job_queue_wait: histogram(
                "syncfleet_job_queue_wait_seconds",
                "Time a job spent in RabbitMQ between publishing and delivery.",
                QUEUE_WAIT_BUCKETS,
            ),
            jobs_in_flight: int_gauge("syncfleet_jobs_in_flight", "Jobs this worker is running now."),
            worker_concurrency: int_gauge(
                "syncfleet_worker_concurrency",
                "Jobs this worker may run at once (both lanes' AMQP prefetch: normal plus high priority).",
            ),
            notion_requests: counter_vec(
                "syncfleet_notion_requests_total",
                "Requests sent to Notion, by integration, endpoint template and status class.",
                &["integration", "endpoint", "status_class"],
            ),
            notion_request_duration: histogram_vec(
                "syncfleet_notion_request_duration_seconds",
                "Notion request latency (sending to the last byte of the answer), by endpoint template.",
                REQUEST_BUCKETS,
                &["endpoint"],
            ),
            notion_rate_limited: counter_vec(
                "syncfleet_notion_rate_limited_total",
                "Notion answers 429 or 529, by integration.",
                &["integration"],
            ),
            rate_budget_wait: histogram(
                "syncfleet_rate_budget_wait_seconds",
                "Time a request waited on the integration's shared rate budget.",
                BUDGET_WAIT_BUCKETS,
            ),
            rate_budget_configured: gauge_vec(
                "syncfleet_rate_budget_configured_per_second",
                "The integration's configured Notion request rate.",
                &["integration"],
            ),
            rate_budget_effective: gauge_vec(
                "syncfleet_rate_budget_effective_per_second",
                "The integration's effective request rate after slow start on unexplained 429s.",
                &["integration"],
            ),
            pages: counter_vec(
                "syncfleet_pages_total",
                "Pages processed by sync runs, by change type.",
                &["change"],
            ),
            lock_contended: counter(
                "syncfleet_lock_contended_total",
                "Jobs that found their database's lock held and were coalesced into a rerun.",
            ),
            jobs_parked: counter(
                "syncfleet_jobs_parked_total",
                "Deliveries parked because their integration had its fleet-wide share of running jobs (worker.max_jobs_per_integration).",
            ),
            lease_lost: counter(
                "syncfleet_lease_lost_total",
                "Database locks whose lease ran out under a running job.",
            ),
            fence_rejected_writes: counter(
                "syncfleet_fence_rejected_writes_total",
                "Write transactions rejected because a newer lock holder advanced the fence.",
            ),
            job_panics: counter(
                "syncfleet_job_panics_total",
                "Jobs whose task panicked; the delivery was returned (once) or dead-lettered.",
            ),
            notifications: counter_vec(
                "syncfleet_notifications_total",
                "Failure notifications, by outcome: sent, deduplicated, rate_limited, failed.",
                &["outcome"],
            ),
            status_write_failures: counter(
                "syncfleet_run_status_write_failures_total",
                "Run status writes that failed; the delivery was returned to the queue instead of acked.",
            ),
            runs_reaped: counter(
                "syncfleet_runs_reaped_total",
                "Runs moved to abandoned by the reaper because their holder was gone.",
            ),
            amqp_reconnects: counter(
                "syncfleet_amqp_reconnects_total",
                "Times the producer reopened its RabbitMQ connection after a failure.",
            ),
            circuit_open: int_gauge_vec(
                "syncfleet_circuit_open",
                "1 while the integration's fleet-wide circuit breaker is open (as this process last saw it).",
                &["integration"],
            ),
            database_last_success: gauge_vec(
                "syncfleet_database_last_success_timestamp_seconds",
                "Unix time of the database's last successful sync (database = its slug).",
                &["integration", "database"],
            ),
            database_interval: gauge_vec(
                "syncfleet_database_sync_interval_seconds",
                "How often the database is meant to sync: its incremental interval, else the full reconciliation period.",
                &["integration", "database"],
            ),
            scheduler_last_tick: gauge(
                "syncfleet_scheduler_last_tick_timestamp_seconds",
                "Unix time of the scheduler's last completed pass.",
            ),
            notify_queue_usage: gauge(
                "syncfleet_pg_notify_queue_usage_ratio",
                "Share of PostgreSQL's NOTIFY queue in use (pg_notification_queue_usage()); run progress flows through it.",
            ),
            sse_clients: int_gauge(
                "syncfleet_api_sse_clients",
                "Server-Sent Event streams of run progress open on this producer.",
            ),
            webhook_events: counter_vec(
                "syncfleet_webhook_events_total",
                "Notion webhook deliveries, by outcome: enqueued, coalesced, follow_up_requested, disabled, duplicate, ignored, bad_signature, verification_token_stored.",
                &["outcome"],
            ),
            build_info: int_gauge_vec(
                "syncfleet_build_info",
                "Always 1; the labels name the running build.",
                &["version", "revision"],
            ),
        };
        m.register_all();
        Arc::new(m)
    }

    fn register_all(&self) {
        let common: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.notion_requests.clone()),
            Box::new(self.notion_request_duration.clone()),
            Box::new(self.notion_rate_limited.clone()),
            Box::new(self.rate_budget_wait.clone()),
            Box::new(self.rate_budget_configured.clone()),
            Box::new(self.rate_budget_effective.clone()),
            Box::new(self.circuit_open.clone()),
            Box::new(self.build_info.clone()),
        ];
        let specific: Vec<Box<dyn prometheus::core::Collector>> = match self.role {
            Role::Producer => vec![
                Box::new(self.jobs_published.clone()),
                Box::new(self.database_last_success.clone()),
                Box::new(self.database_interval.clone()),
                Box::new(self.scheduler_last_tick.clone()),
                Box::new(self.notify_queue_usage.clone()),
                Box::new(self.sse_clients.clone()),
                Box::new(self.webhook_events.clone()),
                Box::new(self.notifications.clone()),
                Box::new(self.runs_reaped.clone()),
                Box::new(self.amqp_reconnects.clone()),
            ],
            Role::Worker => vec![
                Box::new(self.jobs_processed.clone()),
                Box::new(self.job_duration.clone()),
                Box::new(self.job_queue_wait.clone()),
                Box::new(self.jobs_in_flight.clone()),
                Box::new(self.worker_concurrency.clone()),
                Box::new(self.pages.clone()),
                Box::new(self.lock_contended.clone()),
                Box::new(self.jobs_parked.clone()),
                Box::new(self.lease_lost.clone()),
                Box::new(self.fence_rejected_writes.clone()),
                Box::new(self.job_panics.clone()),
                Box::new(self.notifications.clone()),
                Box::new(self.status_write_failures.clone()),
            ],
        };
        for collector in common.into_iter().chain(specific) {
            if let Err(e) = self.registry.register(collector) {
                tracing::error!(error = %e, "A metric could not be registered.");
            }
        }
        #[cfg(target_os = "linux")]
        if let Err(e) =
            self.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
        {
            tracing::warn!(error = %e, "Process metrics are unavailable.");
        }
        self.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), build_revision()]).set(1);
        for outcome in NOTIFICATION_OUTCOMES {
            self.notifications.with_label_values(&[outcome]).inc_by(0);
        }
        if self.role == Role::Producer {
            for outcome in WEBHOOK_OUTCOMES {
                self.webhook_events.with_label_values(&[outcome]);
            }
        }
        for outcome in Outcome::ALL {
            self.jobs_processed.with_label_values(&[outcome.as_str()]);
        }
        for change in CHANGES {
            self.pages.with_label_values(&[change]);
        }
        for reason in REASONS {
            self.jobs_published.with_label_values(&[reason]);
        }
        for endpoint in Endpoint::ALL {
            self.notion_request_duration.with_label_values(&[endpoint.template()]);
        }
    }

    /// Zero-initialises an integration's label sets and records its configured rate. Called at
    /// start for every registered integration and again whenever a job names one.
    pub fn observe_integration(&self, integration: &str, configured_rate: f64) {
        for endpoint in Endpoint::ALL {
            for class in STATUS_CLASSES {
                self.notion_requests.with_label_values(&[integration, endpoint.template(), class]);
            }
        }
        self.notion_rate_limited.with_label_values(&[integration]);
        self.circuit_open.with_label_values(&[integration]);
        self.rate_budget_configured.with_label_values(&[integration]).set(configured_rate);
        let effective = self.rate_budget_effective.with_label_values(&[integration]);
        if effective.get() == 0.0 {
            effective.set(configured_rate);
        }
    }

    /// One Notion request's answer.
    pub fn notion_request(&self, integration: &str, endpoint: Endpoint, status: Option<u16>, took: Duration) {
        let class = match status {
            None => "error",
            Some(429) | Some(529) => "429",
            Some(s) if (200..300).contains(&s) => "2xx",
            Some(s) if (500..600).contains(&s) => "5xx",
            Some(_) => "4xx",
        };
        self.notion_requests.with_label_values(&[integration, endpoint.template(), class]).inc();
        self.notion_request_duration.with_label_values(&[endpoint.template()]).observe(took.as_secs_f64());
        if class == "429" {
            self.notion_rate_limited.with_label_values(&[integration]).inc();
        }
    }

    /// `syncfleet_webhook_events_total{outcome}`.
    pub fn webhook_event(&self, outcome: &str) {
        self.webhook_events.with_label_values(&[outcome]).inc();
    }

    /// `syncfleet_notifications_total{outcome}`.
    pub fn notification(&self, outcome: &str) {
        self.notifications.with_label_values(&[outcome]).inc();
    }

    pub fn job_processed(&self, outcome: Outcome) {
        self.jobs_processed.with_label_values(&[outcome.as_str()]).inc();
    }

    pub fn job_published(&self, reason: &str) {
        self.jobs_published.with_label_values(&[reason]).inc();
    }

    /// Page counters of one committed batch (or of a run's deletions).
    pub fn pages_changed(&self, created: i64, updated: i64, unchanged: i64, deleted: i64, invalid: i64) {
        for (change, n) in CHANGES.iter().zip([created, updated, unchanged, deleted, invalid]) {
            if n > 0 {
                self.pages.with_label_values(&[change]).inc_by(n as u64);
            }
        }
    }

    /// The Prometheus text exposition of every registered family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "Metrics could not be encoded.");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The git revision baked in at build time (`SYNCFLEET_REVISION`), or `unknown`.
pub fn build_revision() -> &'static str {
    option_env!("SYNCFLEET_REVISION").unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_initialised_label_sets_are_exported_before_anything_happens() {
        let m = Metrics::new(Role::Worker);
        m.observe_integration("acme", 3.0);
        let text = m.render();
        assert!(text.contains("syncfleet_jobs_processed_total{outcome=\"dead_lettered\"} 0"), "{text}");
        assert!(text.contains("syncfleet_pages_total{change=\"invalid\"} 0"));
        assert!(text.contains("syncfleet_notion_rate_limited_total{integration=\"acme\"} 0"));
        assert!(text.contains("syncfleet_rate_budget_effective_per_second{integration=\"acme\"} 3"));
        assert!(text.contains("syncfleet_build_info{"));
        assert!(!text.contains("syncfleet_jobs_published_total"), "the worker does not publish");
    }

    #[test]
    fn status_classes_are_bounded() {
        let m = Metrics::new(Role::Producer);
        m.observe_integration("acme", 3.0);
        m.notion_request("acme", Endpoint::Search, Some(429), Duration::from_millis(5));
        m.notion_request("acme", Endpoint::Search, None, Duration::from_millis(5));
        let text = m.render();
        assert!(text.contains(
            "syncfleet_notion_requests_total{endpoint=\"/v1/search\",integration=\"acme\",status_class=\"429\"} 1"
        ));
        assert!(text.contains("syncfleet_notion_rate_limited_total{integration=\"acme\"} 1"));
        assert!(text.contains("status_class=\"error\"} 1"));
    }
}
