//! The failure policy: one pure function from what went wrong to what happens to the delivery.
//!
//! `(failure, attempt, retry tiers) → Decision`. The circuit breaker's state travels inside the
//! failure (`CircuitOpen(remaining)`), so the function needs nothing else. Only the consumer
//! turns a [`Disposition`] into AMQP calls, and only after the run's status is recorded.

use std::time::Duration;

use syncfleet_shared::config::RetryTier;
use syncfleet_shared::db::entities::sync_run::status;
use syncfleet_shared::metrics::Outcome;
use syncfleet_shared::notion::{FailureClass, NotionError};

use crate::error::JobFailure;

/// What the consumer does with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done: succeeded, already done, or coalesced into another run.
    Ack,
    /// Give the message back to the queue after `after` (shutdown mid-job: at once, and another
    /// worker resumes from the checkpoint; bookkeeping that failed: after a backoff).
    Requeue { after: Duration },
    /// Its integration has its fleet-wide share of running jobs: publish it unchanged to the park
    /// queue (it comes back to its work queue after the park delay), then ack. Not an attempt.
    Park,
    /// Publish to `tier` with attempt + 1 (the message comes back after `delay`), then ack.
    Retry { tier: RetryTier, delay: Duration, reason: String },
    /// Publish to the dead-letter queue with this reason, then ack.
    DeadLetter { reason: String },
}

/// A disposition, the outcome it stands for in `syncfleet_jobs_processed_total` (`None`: a job
/// handed back at shutdown, neither success nor failure), and the run status to record first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub disposition: Disposition,
    pub outcome: Option<Outcome>,
    /// `None` when nothing is to be recorded (the status is already written, or there is no run).
    pub status: Option<&'static str>,
}

impl Decision {
    pub fn new(disposition: Disposition, outcome: Option<Outcome>, status: Option<&'static str>) -> Self {
        Self { disposition, outcome, status }
    }

    /// A run that finished and recorded its own final status.
    pub fn succeeded() -> Self {
        Self::new(Disposition::Ack, Some(Outcome::Succeeded), None)
    }

    /// A message that is not a job we can run (invalid, unknown database): dead-lettered, no run.
    pub fn rejected(reason: String) -> Self {
        Self::new(Disposition::DeadLetter { reason }, Some(Outcome::Rejected), None)
    }
}

/// Decides what happens after `failure` on `attempt` (1-based), given the retry tiers.
pub fn decide(failure: &JobFailure, attempt: u32, tiers: &[RetryTier]) -> Decision {
    let reason = format!("{}: {failure}", failure.kind());
    match failure {
        JobFailure::Interrupted => {
            Decision::new(Disposition::Requeue { after: Duration::ZERO }, None, Some(status::QUEUED))
        }
        // Another worker holds the database now; it serves this job's request (recorded as a
        // rerun before deciding), so this delivery is done.
        JobFailure::FenceRejected(_) | JobFailure::LeaseLost { fence_moved: true } => {
            Decision::new(Disposition::Ack, Some(Outcome::Skipped), Some(status::SKIPPED))
        }
        _ => match failure.class() {
            FailureClass::Permanent => {
                Decision::new(Disposition::DeadLetter { reason }, Some(Outcome::Failed), Some(status::FAILED))
            }
            FailureClass::Transient | FailureClass::Rate => retry(failure, attempt, tiers, reason),
        },
    }
}

/// The next retry tier, or a dead letter once every tier is used. While the integration's
/// circuit is open, a tier that brings the job back before it half-opens would only fail again:
/// the first later tier long enough is taken instead.
fn retry(failure: &JobFailure, attempt: u32, tiers: &[RetryTier], reason: String) -> Decision {
    let index = attempt.saturating_sub(1) as usize;
    let Some(next) = tiers.get(index) else {
        return Decision::new(
            Disposition::DeadLetter {
                reason: format!("retries exhausted after attempt {attempt}: {reason}"),
            },
            Some(Outcome::Failed),
            Some(status::FAILED),
        );
    };
    let tier = match circuit_open_for(failure) {
        Some(open) => tiers[index..]
            .iter()
            .find(|t| Duration::from_millis(t.delay_ms) >= open)
            .or_else(|| tiers.last())
            .unwrap_or(next),
        None => next,
    };
    Decision::new(
        Disposition::Retry { tier: tier.clone(), delay: Duration::from_millis(tier.delay_ms), reason },
        Some(Outcome::Retried),
        Some(status::RETRYING),
    )
}

fn circuit_open_for(failure: &JobFailure) -> Option<Duration> {
    match failure {
        JobFailure::Notion(NotionError::CircuitOpen(remaining)) => Some(*remaining),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncfleet_shared::lock::LockError;

    fn tiers() -> Vec<RetryTier> {
        [("30s", 30_000), ("2m", 120_000), ("8m", 480_000)]
            .into_iter()
            .map(|(name, delay_ms)| RetryTier { name: name.into(), delay_ms })
            .collect()
    }

    fn api(status: u16) -> JobFailure {
        JobFailure::Notion(NotionError::Api {
            endpoint: "/v1/data_sources/{data_source_id}/query",
            status,
            code: "x".into(),
            message: "m".into(),
        })
    }

    fn db() -> JobFailure {
        JobFailure::Db(sea_orm::DbErr::Custom("connection refused".into()))
    }

    /// Every failure kind, with what it must lead to while tiers remain.
    fn table() -> Vec<(&'static str, JobFailure, &'static str)> {
        vec![
            ("401", api(401), "dead"),
            ("403", api(403), "dead"),
            ("404", api(404), "dead"),
            ("400", api(400), "dead"),
            ("409", api(409), "retry"),
            ("500", api(500), "retry"),
            ("502", api(502), "retry"),
            ("503", api(503), "retry"),
            ("504", api(504), "retry"),
            ("invalid cursor", JobFailure::Notion(NotionError::InvalidCursor), "retry"),
            (
                "transport",
                JobFailure::Notion(NotionError::Transport {
                    base_url: "http://n".into(),
                    endpoint: "e",
                    message: "reset".into(),
                }),
                "retry",
            ),
            (
                "decode",
                JobFailure::Notion(NotionError::Decode { endpoint: "e", message: "eof".into() }),
                "retry",
            ),
            (
                "429 over the wait limit",
                JobFailure::Notion(NotionError::RateWaitExceeded(Duration::from_secs(900))),
                "retry",
            ),
            ("circuit open", JobFailure::Notion(NotionError::CircuitOpen(Duration::from_secs(60))), "retry"),
            ("postgres", db(), "retry"),
            ("postgres restarted mid-run", JobFailure::ServerRestarted, "retry"),
            ("redis lock", JobFailure::Lock(LockError("refused".into())), "retry"),
            ("held by an earlier attempt", JobFailure::HeldByEarlierAttempt, "retry"),
            ("lease lost, fence unchanged", JobFailure::LeaseLost { fence_moved: false }, "retry"),
            ("lease lost, fence moved", JobFailure::LeaseLost { fence_moved: true }, "skip"),
            ("fence rejected", JobFailure::FenceRejected(7), "skip"),
            ("configuration", JobFailure::Config("no key".into()), "dead"),
            ("shutdown", JobFailure::Interrupted, "requeue"),
        ]
    }

    fn shape(d: &Decision) -> &'static str {
        match d.disposition {
            Disposition::Ack => "skip",
            Disposition::Requeue { .. } => "requeue",
            Disposition::Park => "park",
            Disposition::Retry { .. } => "retry",
            Disposition::DeadLetter { .. } => "dead",
        }
    }

    #[test]
    fn every_failure_kind_times_every_attempt() {
        let tiers = tiers();
        for (name, failure, expected) in table() {
            for attempt in 1..=5u32 {
                let d = decide(&failure, attempt, &tiers);
                let exhausted = attempt as usize > tiers.len();
                let want = if expected == "retry" && exhausted { "dead" } else { expected };
                assert_eq!(shape(&d), want, "{name} on attempt {attempt}: {d:?}");
                let (status, outcome) = match want {
                    "dead" => (Some(status::FAILED), Some(Outcome::Failed)),
                    "retry" => (Some(status::RETRYING), Some(Outcome::Retried)),
                    "skip" => (Some(status::SKIPPED), Some(Outcome::Skipped)),
                    _ => (Some(status::QUEUED), None),
                };
                assert_eq!((d.status, d.outcome), (status, outcome), "{name} on attempt {attempt}");
                if let Disposition::Retry { tier, delay, reason } = &d.disposition {
                    assert_eq!(*delay, Duration::from_millis(tier.delay_ms));
                    assert!(reason.starts_with(failure.kind()), "{reason}");
                    if !matches!(failure, JobFailure::Notion(NotionError::CircuitOpen(_))) {
                        assert_eq!(tier, &tiers[attempt as usize - 1], "{name}: tier follows the attempt");
                    }
                }
                if let Disposition::DeadLetter { reason } = &d.disposition
                    && exhausted
                    && expected == "retry"
                {
                    assert!(reason.contains("retries exhausted"), "{reason}");
                }
            }
        }
    }

    #[test]
    fn an_open_circuit_skips_tiers_that_would_return_too_soon() {
        let tiers = tiers();
        let open = JobFailure::Notion(NotionError::CircuitOpen(Duration::from_secs(90)));
        match decide(&open, 1, &tiers).disposition {
            Disposition::Retry { tier, .. } => assert_eq!(tier.name, "2m"),
            other => panic!("{other:?}"),
        }
        let long = JobFailure::Notion(NotionError::CircuitOpen(Duration::from_secs(3600)));
        match decide(&long, 2, &tiers).disposition {
            Disposition::Retry { tier, .. } => assert_eq!(tier.name, "8m"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_tiers_means_transient_failures_dead_letter_at_once() {
        assert!(matches!(decide(&db(), 1, &[]).disposition, Disposition::DeadLetter { .. }));
    }
}
