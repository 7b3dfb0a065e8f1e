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
//! reconnect the hub reads the watched runs once (one query for all of them).

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
        let mut listener = PgListener::connect(database_url.expose_secret())
            .await
            .map_err(|e| anyhow::anyhow!("cannot LISTEN on PostgreSQL: {}", scrub(&e, database_url)))?;
        listener
            .listen(CHANNEL)
            .await
            .map_err(|e| anyhow::anyhow!("LISTEN {CHANNEL} failed: {}", scrub(&e, database_url)))?;
        let hub = Self { runs: Arc::default(), db, received: Arc::default() };
        let task = hub.clone();
        let url = database_url.clone();
        tokio::spawn(async move { task.listen(listener, url, stop).await });
        Ok(hub)
    }

    async fn listen(self, mut listener: PgListener, url: secrecy::SecretString, stop: CancellationToken) {
        let mut delays = syncfleet_shared::retry::delays(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
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
                // The connection was lost; the next call reconnects. What was sent meanwhile is
                // read from the table.
                Ok(None) => {
                    tracing::warn!("The run-progress LISTEN connection was lost; reconnecting.");
                    self.refresh().await;
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %scrub(&e, &url), retry_in_ms = delay.as_millis() as u64,
                        "The run-progress listener failed.");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
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
                if current.as_ref().is_some_and(|c| c.seq >= row.seq) {
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

fn scrub(e: &dyn std::fmt::Display, url: &secrecy::SecretString) -> String {
    syncfleet_shared::secret::scrub(&e.to_string(), url.expose_secret())
}

impl RunRow {
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
