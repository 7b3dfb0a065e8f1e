//! The last stage of the job path (consume → run → sync → write): each response's pages are
//! upserted in one transaction together with the run's counters and checkpoint, after checking
//! the fence; the final transaction marks deletions (full runs), moves the watermark and records
//! success.

use std::collections::{HashSet, VecDeque};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use syncfleet_shared::db::entities::sync_run::status;
use syncfleet_shared::db::fence;
use syncfleet_shared::db::pages;
use syncfleet_shared::db::runs::{self, RunDelta, StatusChange};
use syncfleet_shared::job::SyncMode;
use syncfleet_shared::notion::{Endpoint, NotionError, NotionSession};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use uuid::Uuid;

use crate::chains::Progress;
use crate::error::JobFailure;
use crate::sync::{Batch, SyncRun, SyncSummary};
use crate::transform::{self, Outcome, Scanned};

/// Batches written concurrently by one run (they still commit in order). An upsert of 100 rows
/// takes about 50 ms of wall time for about 12 ms of server CPU on the benchmark machine, so
/// four in flight keep PostgreSQL busy: `unthrottled` went from ≈ 3,600 pages/s with two to
/// ≈ 5,700 with four (six gave no more). Each is one pooled connection while it runs.
const WRITERS: usize = 4;

impl SyncRun {
    /// Commits each batch with its counters and checkpoint. Up to [`WRITERS`] batches are written
    /// at once (PostgreSQL parses and stores them on separate backends), but they commit strictly
    /// in order, so a checkpoint never gets ahead of a batch before it. Batches that share a page
    /// are never in flight together (their row locks could otherwise wait on each other).
    pub(crate) async fn write_batches(
        &self,
        mut rx: mpsc::Receiver<Batch>,
        progress: Option<&std::sync::Mutex<Progress>>,
    ) -> Result<SyncSummary, JobFailure> {
        let mut summary = SyncSummary::default();
        let (committed_tx, committed_rx) = watch::channel(0u64);
        let mut in_flight = FuturesOrdered::new();
        let mut in_flight_pages: VecDeque<(u64, HashSet<Uuid>)> = VecDeque::new();
        let mut next_seq = 0u64;
        let mut input_open = true;
        loop {
            let may_start = input_open && in_flight.len() < WRITERS;
            tokio::select! {
                batch = rx.recv(), if may_start => {
                    let Some(batch) = batch else { input_open = false; continue };
                    // Rows and invalid pages alike: a full run stamps invalid pages' rows too,
                    // and two open transactions locking one row would wait on each other.
                    let ids: HashSet<Uuid> = batch
                        .rows
                        .iter()
                        .map(|r| r.page_id)
                        .chain(batch.invalid.iter().filter_map(|bad| bad.page_id.as_deref()?.parse().ok()))
                        .collect();
                    if in_flight_pages.iter().any(|(_, other)| !other.is_disjoint(&ids)) {
                        // Drain until the overlapping batch has committed.
                        while let Some(result) = in_flight.next().await {
                            let delta: RunDelta = result?;
                            summary += delta;
                            in_flight_pages.pop_front();
                        }
                    }
                    next_seq += 1;
                    in_flight_pages.push_back((next_seq, ids));
                    in_flight.push_back(self.write_one(next_seq, batch, committed_rx.clone(), &committed_tx, progress));
                }
                Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                    let delta: RunDelta = result?;
                    summary += delta;
                    in_flight_pages.pop_front();
                }
                else => break,
            }
        }
        Ok(summary)
    }

    /// Rejects the transaction when another worker has taken the database's lock since, or when
    /// PostgreSQL restarted since the attempt began (earlier batches may be lost with it).
    async fn check_fence<C: ConnectionTrait>(&self, txn: &C) -> Result<(), JobFailure> {
        let holder = fence::check_holder(txn, self.database.id, self.fence).await?;
        // The fence first: a newer holder drops this attempt's marker, and its run is the newer
        // holder's to finish, not a restart to retry.
        if !holder.current {
            self.metrics.fence_rejected_writes.inc();
            tracing::warn!(fence = self.fence, "Write rejected: a newer lock holder owns this database.");
            return Err(JobFailure::FenceRejected(self.fence));
        }
        if holder.server_started != self.server_started || !holder.marked {
            tracing::warn!(
                attempt_began_on = %self.server_started,
                server_now = %holder.server_started,
                marker_kept = holder.marked,
                "PostgreSQL restarted or recovered from a crash during the run; resuming from the stored checkpoint."
            );
            return Err(JobFailure::ServerRestarted);
        }
        Ok(())
    }

    /// Writes one batch; commits only after batch `seq - 1` has committed.
    async fn write_one(
        &self,
        seq: u64,
        batch: Batch,
        committed: watch::Receiver<u64>,
        committed_tx: &watch::Sender<u64>,
        progress: Option<&std::sync::Mutex<Progress>>,
    ) -> Result<RunDelta, JobFailure> {
        for bad in &batch.invalid {
            tracing::warn!(page_id = bad.page_id.as_deref().unwrap_or("?"), reason = %bad.reason, "A page failed validation; it is recorded in sync_page_errors.");
        }
        let span = tracing::info_span!(
            "db.upsert",
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = "upsert",
            db.collection.name = "notion_pages",
            db.operation.batch.size = batch.rows.len(),
        );
        self.write_one_in(seq, batch, committed, committed_tx, progress).instrument(span).await
    }

    async fn write_one_in(
        &self,
        seq: u64,
        batch: Batch,
        mut committed: watch::Receiver<u64>,
        committed_tx: &watch::Sender<u64>,
        progress: Option<&std::sync::Mutex<Progress>>,
    ) -> Result<RunDelta, JobFailure> {
        let write_started = std::time::Instant::now();
        let seen_full_at = (self.mode == SyncMode::Full).then_some(self.started_at);
        let txn = self.db.begin().await?;
        // Intermediate batches need not wait for the WAL flush: the batch and its checkpoint
        // commit together, so a server crash only rewinds the checkpoint — and `check_fence`
        // refuses every later write of this attempt once the server has restarted, so the run
        // resumes from that rewound checkpoint instead of writing past lost batches. The final
        // transaction commits synchronously (flushing all of these) before the job is acked.
        txn.execute_unprepared("SET LOCAL synchronous_commit = off").await?;
        self.check_fence(&txn).await?;
        let rows = batch.rows.len();
        let upsert_started = std::time::Instant::now();
        let counts =
            pages::upsert_batch(&txn, self.database.id, self.run_id, self.fence, seen_full_at, batch.rows)
                .await?;
        let upsert_ms = upsert_started.elapsed().as_millis() as u64;
        if let Some(seen) = seen_full_at {
            // Pages that failed validation were still seen: they exist in Notion.
            let ids = batch.invalid.iter().filter_map(|bad| bad.page_id.as_deref()?.parse().ok()).collect();
            pages::stamp_seen(&txn, self.database.id, seen, ids).await?;
        }
        let errors: Vec<pages::PageError> = batch
            .invalid
            .iter()
            .map(|bad| pages::PageError {
                page_id: bad.page_id.clone(),
                reason: bad.reason.clone(),
                page: bad.page.clone(),
            })
            .collect();
        pages::record_errors(&txn, self.database.id, self.run_id, errors).await?;
        let wait_started = std::time::Instant::now();
        if committed.wait_for(|done| *done + 1 >= seq).await.is_err() {
            return Err(JobFailure::Interrupted);
        }
        let wait_ms = wait_started.elapsed().as_millis() as u64;
        let (requests, rate_limited) = self.session.stats().take();
        let delta = RunDelta {
            requests: requests as i64,
            rate_limited: rate_limited as i64,
            seen: (rows + batch.invalid.len()) as i64,
            created: counts.created,
            updated: counts.updated,
            unchanged: counts.unchanged,
            invalid: batch.invalid.len() as i64,
            ..RunDelta::default()
        };
        // A split run stores every range's committed progress; batches commit in order, so the
        // progress advanced here includes everything committed before.
        let checkpoint = match progress {
            Some(p) => {
                let reached = batch.checkpoint.as_ref().map(|c| c.sort_time);
                p.lock().map(|mut p| p.advance(batch.range, reached, batch.range_done, batch.started)).ok()
            }
            None => batch.checkpoint,
        };
        runs::record_progress(&txn, self.run_id, &delta, checkpoint.as_ref()).await?;
        txn.commit().await?;
        committed_tx.send_replace(seq);
        self.metrics.pages_changed(delta.created, delta.updated, delta.unchanged, 0, delta.invalid);
        tracing::debug!(
            rows,
            upsert_ms,
            wait_ms,
            write_ms = write_started.elapsed().as_millis() as u64,
            "Batch committed."
        );
        Ok(delta)
    }

    /// Marks deletions (full runs), moves the watermark and records success, in one transaction.
    pub(crate) async fn finish(
        &self,
        run_started: DateTime<Utc>,
        summary: &mut SyncSummary,
    ) -> Result<(), JobFailure> {
        let confirmed = match self.mode {
            SyncMode::Full => {
                let unseen = pages::unseen(&self.db, self.database.id, self.started_at).await?;
                self.confirm_deletions(unseen).await?
            }
            SyncMode::Incremental => Confirmed::default(),
        };
        let txn = self.db.begin().await?;
        self.check_fence(&txn).await?;
        // Candidates Notion still shows as live were skipped by the walk: written, and seen.
        let refuted = confirmed.live.len() as i64;
        let seen = Some(self.started_at);
        let counts =
            pages::upsert_batch(&txn, self.database.id, self.run_id, self.fence, seen, confirmed.live)
                .await?;
        let deleted =
            pages::mark_deleted(&txn, self.database.id, self.started_at, confirmed.deleted).await? as i64;
        let (requests, rate_limited) = self.session.stats().take();
        let delta = RunDelta {
            requests: requests as i64,
            rate_limited: rate_limited as i64,
            deleted,
            created: counts.created,
            updated: counts.updated,
            unchanged: counts.unchanged,
            deletion_checks: confirmed.checks as i64,
            deletions_refuted: refuted,
            ..RunDelta::default()
        };
        runs::record_progress(&txn, self.run_id, &delta, None).await?;
        // Everything edited before the run started has been read; edits after it carry a
        // (minute-rounded) time at or after it, which the next run's overlap covers.
        let overlap = chrono::Duration::from_std(self.overlap).unwrap_or_default();
        let watermark = run_started - overlap;
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_databases SET watermark = GREATEST(COALESCE(watermark, '-infinity'::timestamptz), $2), \
                 last_success_at = now(), updated_at = now() WHERE id = $1",
            [self.database.id.into(), watermark.into()],
        ))
        .await?;
        let final_status = if summary.invalid > 0 { status::PARTIAL } else { status::SUCCEEDED };
        if !runs::set_status_held(&txn, self.run_id, self.fence, StatusChange::new(final_status)).await? {
            // Another holder started this run since (the fence check above passed, so the row
            // moved under a fence we cannot see as newer): leave everything to it.
            return Err(JobFailure::FenceRejected(self.fence));
        }
        txn.commit().await?;
        self.metrics.pages_changed(0, 0, 0, deleted, 0);
        *summary += delta;
        Ok(())
    }
}
/// What Notion said about a full run's deletion candidates.
#[derive(Default)]
pub(crate) struct Confirmed {
    /// In the trash, or gone (404): marked deleted.
    deleted: Vec<Uuid>,
    /// Still live (a drifting cursor skipped them): written like any page the run read.
    live: Vec<pages::PageRow>,
    /// Neither deleted nor written (live but invalid, or undecidable now): stamped as seen so
    /// they are not candidates again.
    kept: Vec<Uuid>,
    /// Requests made.
    checks: usize,
}

impl SyncRun {
    /// Confirms each deletion candidate with `GET /v1/pages/{id}` under the budget before it is
    /// marked deleted: a query walk is not a snapshot (a page trashed or created mid-walk shifts
    /// an offset-like cursor), so "not seen" alone never deletes a page. At most
    /// `max_deletion_checks` per run; candidates beyond it stay as they are until a later full
    /// run confirms them (never deleted unconfirmed).
    async fn confirm_deletions(&self, candidates: Vec<Uuid>) -> Result<Confirmed, JobFailure> {
        let mut out = Confirmed::default();
        if !self.confirm_deletions {
            out.deleted = candidates;
            return Ok(out);
        }
        let total = candidates.len();
        let mut not_found = 0usize;
        for id in candidates.into_iter().take(self.max_deletion_checks) {
            if self.lease_lost.is_cancelled() {
                return Err(JobFailure::LeaseLost { fence_moved: false });
            }
            if self.shutdown.is_cancelled() {
                return Err(JobFailure::Interrupted);
            }
            out.checks += 1;
            let path = format!("/v1/pages/{id}");
            // Kept as text: the page is read exactly as a query result is (same stored text).
            let raw = match self
                .session
                .request::<(), Box<serde_json::value::RawValue>>(Endpoint::RetrievePage, &path, None)
                .await
            {
                Ok(response) => response.body,
                Err(NotionError::Api { status: 404, .. }) => {
                    not_found += 1;
                    out.deleted.push(id);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // A page moved to another database is gone from this one.
            let value: serde_json::Value = serde_json::from_str(raw.get()).unwrap_or_default();
            if !self.is_our_parent(&value) {
                out.deleted.push(id);
                continue;
            }
            let text = raw.get();
            let mut read = match transform::read_page(text, None, &self.mapping, &self.schema) {
                Scanned::Page(read) if read.id == id => read,
                // An answer that is not this page proves nothing: it stays, and is not asked again.
                _ => {
                    out.kept.push(id);
                    continue;
                }
            };
            if read.gone {
                out.deleted.push(id);
                continue;
            }
            if let Outcome::Truncated(truncated) = &read.outcome {
                match self.complete_values(id, text, truncated).await {
                    Ok(completed) => {
                        read.outcome = transform::complete(text, &completed, &self.mapping, &self.schema)
                    }
                    // Trashed between the two requests: decided by the next full run.
                    Err(JobFailure::Notion(NotionError::Api { status: 404, .. })) => {
                        out.kept.push(id);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            match read.outcome {
                Outcome::Row(row) => out.live.push(row),
                // Live but invalid: kept (and stamped as seen), not deleted.
                Outcome::Invalid(bad) => {
                    tracing::warn!(page_id = %id, reason = %bad.reason, "A page the walk skipped is live but invalid; it stays.");
                    out.kept.push(id);
                }
                // Completed above; never left truncated.
                Outcome::Truncated(_) => out.kept.push(id),
            }
        }
        // 404s can also mean the integration lost access to the whole database since the walk:
        // then nothing is deleted, and the run fails permanently (database not shared).
        if not_found > 0 {
            let path = format!("/v1/data_sources/{}", self.database.data_source_id);
            self.session.request::<(), serde_json::Value>(Endpoint::RetrieveDataSource, &path, None).await?;
        }
        if total > self.max_deletion_checks {
            tracing::warn!(
                candidates = total,
                checked = self.max_deletion_checks,
                "More deletion candidates than one run confirms; the rest wait for the next full run."
            );
        }
        if !out.live.is_empty() {
            tracing::warn!(
                live = out.live.len(),
                "Pages the query walk skipped are live in Notion; they stay live."
            );
        }
        Ok(out)
    }

    /// Whether a page object's parent is this database's data source (or the database itself,
    /// as older API versions say). A page without a readable parent counts as ours.
    fn is_our_parent(&self, page: &serde_json::Value) -> bool {
        let parent = &page["parent"];
        let ids = [
            parent["data_source_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()),
            parent["database_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()),
        ];
        if ids.iter().all(Option::is_none) {
            return true;
        }
        ids.iter().flatten().any(|id| *id == self.database.data_source_id || *id == self.database.id)
    }
}

/// Records the requests a failed attempt made since its last committed batch, so the run's
/// counters still include them.
pub async fn record_unsaved_requests(db: &DatabaseConnection, run_id: Uuid, session: &NotionSession) {
    let (requests, rate_limited) = session.stats().take();
    let delta =
        RunDelta { requests: requests as i64, rate_limited: rate_limited as i64, ..RunDelta::default() };
    if let Err(e) = runs::record_progress(db, run_id, &delta, None).await {
        tracing::warn!(error = %e, "Could not record the failed attempt's request counts.");
    }
}
