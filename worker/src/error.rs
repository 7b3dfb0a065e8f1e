//! What can go wrong while running a job, and what the consumer does about it.
//!
//! Every error reduces to one [`Disposition`]; only the consumer turns that into AMQP calls,
//! and it acks only after the outcome is committed to PostgreSQL.

use syncfleet_shared::metrics::Outcome;
use syncfleet_shared::notion::{FailureClass, NotionError};

/// What the consumer does with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done (succeeded, already done, or recorded as failed and dead-lettered by us).
    Ack,
    /// Give the message back to the queue now (shutdown mid-job): another worker resumes it.
    Requeue,
    /// Publish to the next retry tier with attempt + 1, then ack.
    Retry { reason: String },
    /// Publish to the dead-letter queue with this reason, then ack.
    DeadLetter { reason: String },
}

/// A disposition plus the outcome it stands for in `syncfleet_jobs_processed_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub disposition: Disposition,
    pub outcome: Outcome,
}

impl Verdict {
    pub fn new(disposition: Disposition, outcome: Outcome) -> Self {
        Self { disposition, outcome }
    }
}

/// The usual reading: acked = succeeded, retry tier = retried, dead letter = dead-lettered.
impl From<Disposition> for Verdict {
    fn from(disposition: Disposition) -> Self {
        let outcome = match &disposition {
            Disposition::Ack => Outcome::Succeeded,
            Disposition::Requeue | Disposition::Retry { .. } => Outcome::Retried,
            Disposition::DeadLetter { .. } => Outcome::DeadLettered,
        };
        Self { disposition, outcome }
    }
}

/// A job that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum JobFailure {
    #[error(transparent)]
    Notion(#[from] NotionError),
    #[error("PostgreSQL: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// Bad configuration of the integration or database (missing token, wrong key…).
    #[error("{0}")]
    Config(String),
    /// The worker is shutting down; progress up to the last batch is committed.
    #[error("interrupted by shutdown")]
    Interrupted,
    /// The database lock's lease was lost (taken over, or not renewable).
    #[error("the database lock's lease was lost")]
    LeaseLost,
    /// A write carried a fence older than the database's: another worker holds the lock now.
    #[error("write rejected: fence {0} is stale")]
    FenceRejected(i64),
    #[error(transparent)]
    Lock(#[from] syncfleet_shared::lock::LockError),
}

impl JobFailure {
    /// Whether another attempt could succeed.
    pub fn class(&self) -> FailureClass {
        match self {
            JobFailure::Notion(e) => e.class(),
            JobFailure::Db(_) => FailureClass::Transient,
            JobFailure::Config(_) => FailureClass::Permanent,
            JobFailure::Interrupted => FailureClass::Transient,
            JobFailure::LeaseLost | JobFailure::FenceRejected(_) => FailureClass::Permanent,
            JobFailure::Lock(_) => FailureClass::Transient,
        }
    }

    /// A bounded label for `sync_runs.error_kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobFailure::Notion(e) => e.kind(),
            JobFailure::Db(_) => "database",
            JobFailure::Config(_) => "configuration",
            JobFailure::Interrupted => "interrupted",
            JobFailure::LeaseLost => "lease_lost",
            JobFailure::FenceRejected(_) => "fence_rejected",
            JobFailure::Lock(_) => "lock_unavailable",
        }
    }
}
