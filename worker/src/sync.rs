//! The page loop of one sync run.
//!
//! A reader pages through `POST /v1/data_sources/{id}/query` (100 rows a request) while a writer
//! upserts the previous response in its own transaction, together with the run's counters and
//! checkpoint. The channel between them holds one response, so memory stays flat however large
//! the database, and Notion's latency overlaps PostgreSQL's.
//!
//! Resuming never uses a stored Notion cursor (they are session-scoped): a resumed run, or one
//! whose cursor Notion rejects, restarts its query at the checkpoint's timestamp (inclusive, and
//! minus the overlap for incremental runs). Upserts by page id make the re-read rows harmless.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use serde_json::Value;
use std::collections::{HashSet, VecDeque};
use syncfleet_shared::db::entities::{notion_database, sync_run::status};
use syncfleet_shared::db::fence;
use syncfleet_shared::db::pages::{self, PageRow};
use syncfleet_shared::db::runs::{self, Checkpoint, RunDelta};
use syncfleet_shared::job::SyncMode;
use syncfleet_shared::mapping::Mapping;
use syncfleet_shared::metrics::Metrics;
use syncfleet_shared::notion::types::{ListResponse, QueryRequest, Timestamp};
use syncfleet_shared::notion::{Endpoint, NotionError, NotionSession};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::chains::{self, Chain, Progress};
use crate::error::JobFailure;
use crate::transform::{self, InvalidPage};

/// Batches written concurrently by one run (they still commit in order).
const WRITERS: usize = 2;

/// How many times one run restarts its query after Notion rejects a cursor.
const MAX_CURSOR_RESTARTS: u32 = 5;

/// Everything one run needs.
pub struct SyncRun {
    pub db: DatabaseConnection,
    pub session: NotionSession,
    pub database: notion_database::Model,
    pub run_id: Uuid,
    pub mode: SyncMode,
    pub checkpoint: Option<Checkpoint>,
    pub page_size: u8,
    /// Most concurrent `created_time` ranges of one full run.
    pub max_chains: u8,
    pub overlap: Duration,
    pub fence: i64,
    pub shutdown: CancellationToken,
    /// Cancelled when the database lock's lease is lost.
    pub lease_lost: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// The data source's schema, as just read from Notion.
    pub schema: Value,
    /// The operator's rules, keyed by property id.
    pub mapping: Mapping,
}

/// Totals of a finished run: the sum of its batches' counter increments.
pub type SyncSummary = RunDelta;

/// One response, parsed, on its way to the writer.
struct Batch {
    rows: Vec<PageRow>,
    invalid: Vec<InvalidPage>,
    checkpoint: Option<Checkpoint>,
    /// Which `created_time` range (chain) it came from, and whether that range is now read.
    range: usize,
    range_done: bool,
    /// Notion's clock at the start of the run.
    started: DateTime<Utc>,
}

impl SyncRun {
    fn sort_field(&self) -> Timestamp {
        match self.mode {
            SyncMode::Full => Timestamp::CreatedTime,
            SyncMode::Incremental => Timestamp::LastEditedTime,
        }
    }

    /// Where the query starts: the checkpoint when resuming, else the watermark minus the overlap
    /// (incremental) or the beginning (full).
    fn start_from(&self) -> Option<DateTime<Utc>> {
        let overlap = chrono::Duration::from_std(self.overlap).unwrap_or_default();
        match (&self.checkpoint, self.mode) {
            (Some(cp), SyncMode::Full) => Some(cp.sort_time),
            (Some(cp), SyncMode::Incremental) => Some(cp.sort_time - overlap),
            (None, SyncMode::Full) => None,
            (None, SyncMode::Incremental) => self.database.watermark.map(|w| w - overlap),
        }
    }

    /// The chains to read: several disjoint `created_time` ranges for a large full run (or a
    /// resumed split one), else one chain from [`start_from`](Self::start_from).
    async fn chains(&self) -> Result<(Vec<Chain>, Option<Progress>), JobFailure> {
        match (&self.checkpoint, self.mode) {
            (Some(cp), SyncMode::Full) if !cp.ranges.is_empty() => {
                Ok((chains::pending(&cp.ranges), Some(Progress::new(cp.ranges.clone()))))
            }
            (None, SyncMode::Full) => {
                let ranges = chains::plan(&self.db, self.database.id, usize::from(self.max_chains)).await?;
                if ranges.len() < 2 {
                    return Ok((vec![Chain::whole(None)], None));
                }
                tracing::info!(
                    chains = ranges.len(),
                    "Reading the database as concurrent created_time ranges."
                );
                Ok((chains::pending(&ranges), Some(Progress::new(ranges))))
            }
            _ => Ok((vec![Chain::whole(self.start_from())], None)),
        }
    }

    pub async fn run(self) -> Result<SyncSummary, JobFailure> {
        let (chains, progress) = self.chains().await?;
        let (tx, rx) = mpsc::channel::<Batch>(chains.len().max(1));
        let readers = futures_util::future::try_join_all(
            chains.into_iter().map(|chain| self.read_chain(tx.clone(), chain)),
        );
        drop(tx);
        let progress = progress.map(std::sync::Mutex::new);
        let writer = self.write_batches(rx, progress.as_ref());
        let (run_started, mut summary) = match tokio::join!(readers, writer) {
            (Ok(starts), Ok(summary)) => (starts.into_iter().min().unwrap_or_else(Utc::now), summary),
            (Err(e), _) | (_, Err(e)) => {
                record_unsaved_requests(&self.db, self.run_id, &self.session).await;
                return Err(e);
            }
        };
        self.finish(run_started, &mut summary).await?;
        Ok(summary)
    }

    /// Pages through one chain's query and hands each response to the writer. Returns Notion's
    /// clock at the start of the run, from which the new watermark is derived.
    async fn read_chain(&self, tx: mpsc::Sender<Batch>, chain: Chain) -> Result<DateTime<Utc>, JobFailure> {
        let field = self.sort_field();
        let path = format!("/v1/data_sources/{}/query", self.database.data_source_id);
        // `query_from` is the filter of the current query session; `resume_from` is where a new
        // session would start (it moves with every response, the session's filter cannot).
        let mut query_from = chain.from;
        let mut resume_from = query_from;
        let mut run_started = self.checkpoint.as_ref().map(|c| c.run_started);
        let mut cursor: Option<String> = None;
        let mut restarts = 0u32;
        loop {
            if self.lease_lost.is_cancelled() {
                return Err(JobFailure::LeaseLost);
            }
            if self.shutdown.is_cancelled() {
                return Err(JobFailure::Interrupted);
            }
            let mut request = QueryRequest::ascending_between(field, query_from, chain.hi, self.page_size);
            request.start_cursor = cursor.clone();
            let fetch_started = std::time::Instant::now();
            let response = match self
                .session
                .request::<_, ListResponse>(Endpoint::QueryDataSource, &path, Some(&request))
                .await
            {
                Ok(r) => r,
                Err(NotionError::InvalidCursor) if restarts < MAX_CURSOR_RESTARTS => {
                    restarts += 1;
                    tracing::warn!(
                        restarts,
                        "Notion rejected the cursor; restarting the query from the last position."
                    );
                    cursor = None;
                    query_from = resume_from;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let started = *run_started.get_or_insert_with(|| response.server_time.unwrap_or_else(Utc::now));
            let list = response.body;
            let (mut pages, mut invalid) = transform::parse_results(list.results);
            for page in &mut pages {
                self.complete_values(page).await?;
            }
            let last = pages.iter().max_by_key(|p| (field.of(p), p.id)).map(|p| (field.of(p), p.id));
            let checkpoint = last.map(|(sort_time, page_id)| Checkpoint {
                sort_time,
                page_id,
                run_started: started,
                ranges: Vec::new(),
            });
            if let Some((sort_time, _)) = last {
                // A restarted query resumes here; it is inclusive, so nothing is skipped.
                resume_from = Some(match self.mode {
                    SyncMode::Full => sort_time,
                    SyncMode::Incremental => {
                        sort_time - chrono::Duration::from_std(self.overlap).unwrap_or_default()
                    }
                });
            }
            let mut rows: Vec<PageRow> = Vec::with_capacity(pages.len());
            for page in pages {
                match transform::to_row(page, &self.mapping, &self.schema) {
                    Ok(row) => rows.push(row),
                    Err(bad) => invalid.push(bad),
                }
            }
            tracing::debug!(
                rows = rows.len(),
                fetch_ms = fetch_started.elapsed().as_millis() as u64,
                "Response read."
            );
            let next = list.next_cursor.filter(|_| list.has_more);
            let range_done = next.is_none();
            let batch = Batch { rows, invalid, checkpoint, range: chain.range, range_done, started };
            if tx.send(batch).await.is_err() {
                // The writer failed; its error is the one reported.
                return Ok(started);
            }
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(started),
            }
        }
    }

    /// Completes the values a page object truncated (relations, people and rich text over 25
    /// items) from `GET /v1/pages/{id}/properties/{property_id}`, page by page, under the budget.
    async fn complete_values(
        &self,
        page: &mut syncfleet_shared::notion::types::Page,
    ) -> Result<(), JobFailure> {
        for (property_id, ty) in transform::truncated_properties(page) {
            let mut items = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!(
                    "/v1/pages/{}/properties/{}?page_size=100",
                    page.id,
                    encode_path_segment(&property_id)
                );
                if let Some(c) = &cursor {
                    path.push_str("&start_cursor=");
                    path.push_str(&encode_path_segment(c));
                }
                let response =
                    self.session.request::<(), ListResponse>(Endpoint::PageProperty, &path, None).await?;
                items.extend(response.body.results);
                match (response.body.has_more, response.body.next_cursor) {
                    (true, Some(next)) => cursor = Some(next),
                    _ => break,
                }
            }
            transform::complete_property(page, &property_id, &ty, items);
        }
        Ok(())
    }

    /// Commits each batch with its counters and checkpoint. Up to [`WRITERS`] batches are written
    /// at once (PostgreSQL parses and stores them on separate backends), but they commit strictly
    /// in order, so a checkpoint never gets ahead of a batch before it. Batches that share a page
    /// are never in flight together (their row locks could otherwise wait on each other).
    async fn write_batches(
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
                    let ids: HashSet<Uuid> = batch.rows.iter().map(|r| r.page_id).collect();
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

    /// Rejects the transaction when another worker has taken the database's lock since.
    async fn check_fence<C: ConnectionTrait>(&self, txn: &C) -> Result<(), JobFailure> {
        if fence::is_current(txn, self.database.id, self.fence).await? {
            return Ok(());
        }
        self.metrics.fence_rejected_writes.inc();
        tracing::warn!(fence = self.fence, "Write rejected: a newer lock holder owns this database.");
        Err(JobFailure::FenceRejected(self.fence))
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
        let stamp_seen = self.mode == SyncMode::Full;
        let txn = self.db.begin().await?;
        // Intermediate batches need not wait for the WAL flush: the batch and its checkpoint
        // commit together, so a server crash only rewinds the checkpoint. The final
        // transaction commits synchronously (flushing all of these) before the job is acked.
        txn.execute_unprepared("SET LOCAL synchronous_commit = off").await?;
        self.check_fence(&txn).await?;
        let rows = batch.rows.len();
        let counts =
            pages::upsert_batch(&txn, self.database.id, self.run_id, self.fence, stamp_seen, batch.rows)
                .await?;
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
        if committed.wait_for(|done| *done + 1 >= seq).await.is_err() {
            return Err(JobFailure::Interrupted);
        }
        let (requests, rate_limited) = self.session.stats().take();
        let delta = RunDelta {
            requests: requests as i64,
            rate_limited: rate_limited as i64,
            seen: (rows + batch.invalid.len()) as i64,
            created: counts.created,
            updated: counts.updated,
            unchanged: counts.unchanged,
            deleted: 0,
            invalid: batch.invalid.len() as i64,
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
        tracing::debug!(rows, write_ms = write_started.elapsed().as_millis() as u64, "Batch committed.");
        Ok(delta)
    }

    /// Marks deletions (full runs), moves the watermark and records success, in one transaction.
    async fn finish(&self, run_started: DateTime<Utc>, summary: &mut SyncSummary) -> Result<(), JobFailure> {
        let txn = self.db.begin().await?;
        self.check_fence(&txn).await?;
        let deleted = match self.mode {
            SyncMode::Full => pages::mark_unseen_deleted(&txn, self.database.id, self.run_id).await? as i64,
            SyncMode::Incremental => 0,
        };
        let (requests, rate_limited) = self.session.stats().take();
        let delta = RunDelta {
            requests: requests as i64,
            rate_limited: rate_limited as i64,
            deleted,
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
        runs::set_status(&txn, self.run_id, final_status, None).await?;
        txn.commit().await?;
        self.metrics.pages_changed(0, 0, 0, deleted, 0);
        *summary += delta;
        Ok(())
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

/// Percent-encodes a path segment (property ids are usually encoded already; `%` is kept).
fn encode_path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
