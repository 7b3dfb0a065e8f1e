//! What can go wrong while running a job. [`crate::policy::decide`] turns it into what happens to
//! the delivery.

use syncfleet_shared::notion::{FailureClass, NotionError};

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
    /// The database lock's lease was lost (not renewable for a whole lease, or taken). Only a
    /// moved fence means another worker took over; otherwise the job is simply retried.
    #[error("the database lock's lease was lost")]
    LeaseLost { fence_moved: bool },
    /// A write carried a fence older than the database's: another worker holds the lock now.
    #[error("write rejected: fence {0} is stale")]
    FenceRejected(i64),
    #[error(transparent)]
    Lock(#[from] syncfleet_shared::lock::LockError),
    /// PostgreSQL restarted (or failed over) during the run: batches committed without waiting
    /// for the WAL may be gone with the old server, so the run resumes from its stored checkpoint.
    #[error("PostgreSQL restarted during the run; it resumes from its stored checkpoint")]
    ServerRestarted,
    /// The lock is held by an earlier attempt of this same job whose worker died; its lease
    /// expires soon.
    #[error("the database is locked by an earlier attempt of this job")]
    HeldByEarlierAttempt,
}

impl JobFailure {
    /// Whether another attempt could succeed.
    pub fn class(&self) -> FailureClass {
        match self {
            JobFailure::Notion(e) => e.class(),
            JobFailure::Config(_) => FailureClass::Permanent,
            JobFailure::LeaseLost { fence_moved: true } | JobFailure::FenceRejected(_) => {
                FailureClass::Permanent
            }
            JobFailure::Db(_)
            | JobFailure::ServerRestarted
            | JobFailure::Interrupted
            | JobFailure::LeaseLost { fence_moved: false }
            | JobFailure::Lock(_)
            | JobFailure::HeldByEarlierAttempt => FailureClass::Transient,
        }
    }

    /// A bounded label for `sync_runs.error_kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobFailure::Notion(e) => e.kind(),
            JobFailure::Db(_) => "database",
            JobFailure::ServerRestarted => "database_restarted",
            JobFailure::Config(_) => "configuration",
            JobFailure::Interrupted => "interrupted",
            JobFailure::LeaseLost { fence_moved: false } => "lease_lost",
            JobFailure::LeaseLost { fence_moved: true } => "superseded",
            JobFailure::FenceRejected(_) => "fence_rejected",
            JobFailure::Lock(_) => "lock_unavailable",
            JobFailure::HeldByEarlierAttempt => "held_by_earlier_attempt",
        }
    }
}
