//! Live run progress, from one `LISTEN` per process to any number of watchers.
//!
//! A trigger on `sync_runs` (migration `m20261124_000005_control_plane`) sends
//! `NOTIFY syncfleet_runs` with the run's whole state and its change sequence on every change a
//! worker or publisher commits. The [`Hub`] holds one PostgreSQL connection that listens, and
//! keeps a `watch` channel per run that someone follows; SSE streams and `runs watch` read those
//! channels. The database's cost is one notification per run change, however many clients
//! watch: nothing polls per client.
//!
//! Notifications sent while the listening connection was down are lost, so after every
//! reconnect the hub reads the watched runs once (one query for all of them). The trigger also
//! leaves notifications out when PostgreSQL's notification queue is past half full (a stalled
//! listener must not make run updates fail), so the hub re-reads the watched runs every
//! [`SWEEP_EVERY`] as well.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{DatabaseConnection, DbBackend, FromQueryResult, Statement};
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::model::RunRow;

/// The notification channel the trigger sends on.
pub const CHANNEL: &str = "syncfleet_runs";

/// How often the watched runs are re-read even when notifications come.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

type Slot = watch::Sender<Option<Arc<RunRow>>>;

/// Fans run changes out to watchers. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    runs: Arc<Mutex<HashMap<Uuid, Slot>>>,
    db: DatabaseConnection,
    /// Notifications received, for the benchmark and the tests.
    received: Arc<std::sync::atomic::AtomicU64>,
}

impl Hub {
    /// Starts listening; the task ends when `stop` is cancelled. Fails when the first connection
    /// cannot be made (a wrong URL is a start-up error, not a silent stream of nothing).
    pub async fn start(
        database_url: &secrecy::SecretString,
        db: DatabaseConnection,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let listener = connect(database_url).await?;
        let hub = Self { runs: Arc::default(), db, received: Arc::default() };
        let task = hub.clone();
        let url = database_url.clone();
        tokio::spawn(async move { task.listen(listener, url, stop).await });
        Ok(hub)
    }

    async fn listen(self, mut listener: PgListener, url: secrecy::SecretString, stop: CancellationToken) {
        let mut delays = syncfleet_shared::retry::delays(Duration::from_millis(200), Duration::from_secs(10));
        // The backstop for notifications the trigger leaves out (a NOTIFY queue past half full)
        // or that never arrive: one read of every watched run per period, whatever the number
        // of watchers.
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                _ = sweep.tick() => {
                    self.refresh().await;
                    continue;
                }
                next = listener.try_recv() => next,
            };
            match next {
                Ok(Some(note)) => {
                    self.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match serde_json::from_str::<RunRow>(note.payload()) {
                        Ok(row) => self.publish(row),
                        Err(e) => tracing::warn!(error = %e, "An unreadable run notification was ignored."),
                    }
                    delays =
                        syncfleet_shared::retry::delays(Duration::from_millis(200), Duration::from_secs(10));
                }
                // The connection was lost. Listen again first, then read the watched runs: a
                // change committed in between is then either in what is read or notified
                // after it (read first, it could fall between the two and be missed).
                Ok(None) | Err(_) => {
                    if let Err(e) = next {
                        tracing::warn!(error = %scrub(&e, &url), "The run-progress listener failed.");
                    } else {
                        tracing::warn!("The run-progress LISTEN connection was lost; reconnecting.");
                    }
                    listener = loop {
                        match connect(&url).await {
                            Ok(fresh) => break fresh,
                            Err(e) => {
                                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                                    "Could not LISTEN again for run progress.");
                                tokio::select! {
                                    _ = stop.cancelled() => return,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                            }
                        }
                    };
                    self.refresh().await;
                }
            }
        }
    }

    /// Hands a run's new state to its watchers, never moving a run backwards (notifications of
    /// one run arrive in commit order, but a refresh may race with them).
    fn publish(&self, row: RunRow) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = runs.get(&row.id) {
            if slot.receiver_count() == 0 {
                runs.remove(&row.id);
                return;
            }
            slot.send_if_modified(|current| {
                if current.as_ref().is_some_and(|c| !row.supersedes(c)) {
                    return false;
                }
                *current = Some(Arc::new(row));
                true
            });
        }
    }

    /// Reads every watched run once (after a lost connection).
    async fn refresh(&self) {
        let ids: Vec<Uuid> = {
            let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            runs.keys().copied().collect()
        };
        if ids.is_empty() {
            return;
        }
        match RunRow::find_many(&self.db, &ids).await {
            Ok(rows) => rows.into_iter().for_each(|row| self.publish(row)),
            Err(e) => tracing::warn!(error = %e, "Could not re-read the watched runs."),
        }
    }

    /// Follows `run`: the receiver sees every newer state the hub learns of. Call before reading
    /// the run's current state, so nothing committed in between is missed.
    pub fn watch(&self, run: Uuid) -> watch::Receiver<Option<Arc<RunRow>>> {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.retain(|_, slot| slot.receiver_count() > 0);
        runs.entry(run).or_insert_with(|| watch::channel(None).0).subscribe()
    }

    /// Notifications received since start.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs followed right now.
    pub fn watched(&self) -> usize {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.values().filter(|s| s.receiver_count() > 0).count()
    }
}

/// A listening connection on [`CHANNEL`]; its error names no secret.
async fn connect(url: &secrecy::SecretString) -> anyhow::Result<PgListener> {
    let mut listener = PgListener::connect(url.expose_secret())
        .await
        .map_err(|e| anyhow::anyhow!("cannot LISTEN on PostgreSQL: {}", scrub(&e, url)))?;
    listener
        .listen(CHANNEL)
        .await
        .map_err(|e| anyhow::anyhow!("LISTEN {CHANNEL} failed: {}", scrub(&e, url)))?;
    Ok(listener)
}

fn scrub(e: &dyn std::fmt::Display, url: &secrecy::SecretString) -> String {
    syncfleet_shared::secret::scrub(&e.to_string(), url.expose_secret())
}

impl RunRow {
    /// Whether this state of a run replaces `current` for its watchers. A final state wins over
    /// any non-final one and is never replaced by one (PostgreSQL refuses to move a final run,
    /// so a non-final state after it is stale: a refresh racing a notification); otherwise the
    /// higher change sequence wins.
    pub fn supersedes(&self, current: &RunRow) -> bool {
        match (current.is_final(), self.is_final()) {
            (false, true) => true,
            (true, false) => false,
            _ => self.seq > current.seq,
        }
    }

    /// The runs with these ids (one query).
    pub async fn find_many(db: &DatabaseConnection, ids: &[Uuid]) -> Result<Vec<RunRow>, sea_orm::DbErr> {
        RunRow::find_by_statement(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("{} WHERE id = ANY($1::uuid[])", super::model::RUN_SELECT),
            [format!("{{{}}}", ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(",")).into()],
        ))
        .all(db)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str, seq: i64) -> RunRow {
        serde_json::from_value(serde_json::json!({
            "id": Uuid::nil(), "database_id": Uuid::nil(), "integration": "acme", "mode": "full",
            "reason": "api", "status": status, "attempt": 1, "enqueued_at": "2026-11-24T00:00:00Z",
            "started_at": null, "finished_at": null, "requests": 0, "rate_limited": 0, "pages_seen": 0,
            "pages_created": 0, "pages_updated": 0, "pages_unchanged": 0, "pages_deleted": 0,
            "pages_invalid": 0, "error_kind": null, "error_message": null, "seq": seq
        }))
        .expect("row")
    }

    #[test]
    fn a_final_state_is_never_replaced_by_a_non_final_one_and_otherwise_the_newer_wins() {
        assert!(row("running", 5).supersedes(&row("running", 4)));
        assert!(!row("running", 4).supersedes(&row("running", 4)));
        assert!(!row("running", 3).supersedes(&row("running", 4)));
        // A final state wins even with a lower sequence (a refresh raced the notification).
        assert!(row("succeeded", 3).supersedes(&row("running", 4)));
        // Nothing non-final follows a final state.
        assert!(!row("retrying", 9).supersedes(&row("failed", 4)));
        assert!(!row("running", 9).supersedes(&row("succeeded", 4)));
        assert!(row("failed", 5).supersedes(&row("failed", 4)));
    }
}
