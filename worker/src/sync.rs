//! The third stage of the job path (consume → run → sync → write): the page loop of one sync
//! run, reading Notion; `write` commits what it reads.
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
use sea_orm::DatabaseConnection;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::VecDeque;
use syncfleet_shared::db::entities::notion_database;
use syncfleet_shared::db::pages::PageRow;
use syncfleet_shared::db::runs::{Checkpoint, RunDelta};
use syncfleet_shared::job::SyncMode;
use syncfleet_shared::mapping::Mapping;
use syncfleet_shared::metrics::Metrics;
use syncfleet_shared::notion::types::{ListResponse, QueryRequest, Timestamp};
use syncfleet_shared::notion::{Endpoint, NotionError, NotionSession};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::chains::{self, Chain, Progress};
use crate::error::JobFailure;
use crate::transform::{self, InvalidPage, Outcome};
use crate::write::record_unsaved_requests;

/// Notion cursors expire; a chain restarts its query from its last position when one is
/// rejected, up to this many times within [`CURSOR_RESTART_WINDOW`]. More than that is a
/// transient failure: the job goes to a retry tier and resumes from its checkpoint, so a long
/// sync meeting many expiries over hours is never dead-lettered for it.
const MAX_CURSOR_RESTARTS: usize = 5;
const CURSOR_RESTART_WINDOW: Duration = Duration::from_secs(600);

/// Everything one run needs.
pub struct SyncRun {
    pub db: DatabaseConnection,
    pub session: NotionSession,
    pub database: notion_database::Model,
    pub run_id: Uuid,
    pub mode: SyncMode,
    pub checkpoint: Option<Checkpoint>,
    /// When the run first started, on PostgreSQL's clock: a full run stamps the pages it sees
    /// with it, and only rows written before it can be deletion candidates.
    pub started_at: DateTime<Utc>,
    /// `pg_postmaster_start_time()` when the attempt began (see [`runs::Started`]).
    pub server_started: DateTime<Utc>,
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
    /// Confirm each deletion candidate with Notion before marking it deleted, at most this many
    /// per run (`sync.confirm_deletions`, `sync.max_deletion_checks`).
    pub confirm_deletions: bool,
    pub max_deletion_checks: usize,
}

/// Totals of a finished run: the sum of its batches' counter increments.
pub type SyncSummary = RunDelta;

/// One response, parsed, on its way to the writer.
pub(crate) struct Batch {
    pub(crate) rows: Vec<PageRow>,
    pub(crate) invalid: Vec<InvalidPage>,
    pub(crate) checkpoint: Option<Checkpoint>,
    /// Which `created_time` range (chain) it came from, and whether that range is now read.
    pub(crate) range: usize,
    pub(crate) range_done: bool,
    /// Notion's clock at the start of the run.
    pub(crate) started: DateTime<Utc>,
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
            // A resumed split run whose ranges were all done reads nothing: its start is the
            // checkpoint's, never "now" (which would move the watermark past edits made
            // during the run).
            (Ok(starts), Ok(summary)) => {
                let resumed = self.checkpoint.as_ref().map(|c| c.run_started);
                let started = starts.into_iter().min().or(resumed).unwrap_or_else(Utc::now);
                (started, summary)
            }
            (Err(e), _) | (_, Err(e)) => {
                record_unsaved_requests(&self.db, self.run_id, &self.session).await;
                return Err(e);
            }
        };
        if let Err(e) = self.finish(run_started, &mut summary).await {
            record_unsaved_requests(&self.db, self.run_id, &self.session).await;
            return Err(e);
        }
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
        let mut restarts: VecDeque<std::time::Instant> = VecDeque::new();
        loop {
            if self.lease_lost.is_cancelled() {
                return Err(JobFailure::LeaseLost { fence_moved: false });
            }
            if self.shutdown.is_cancelled() {
                return Err(JobFailure::Interrupted);
            }
            let mut request = QueryRequest::ascending_between(field, query_from, chain.hi, self.page_size);
            request.start_cursor = cursor.clone();
            let fetch_started = std::time::Instant::now();
            let response = match self
                .session
                .request::<_, ListResponse<Box<RawValue>>>(Endpoint::QueryDataSource, &path, Some(&request))
                .await
            {
                Ok(r) => r,
                Err(NotionError::InvalidCursor) if within_restart_budget(&mut restarts) => {
                    tracing::warn!(
                        restarts = restarts.len(),
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
            let (mut reads, mut invalid) =
                transform::parse_results(&list.results, &self.mapping, &self.schema);
            for (index, read) in &mut reads {
                if let Outcome::Truncated(truncated) = &read.outcome {
                    let text = list.results[*index].get();
                    let completed = self.complete_values(read.id, text, truncated).await?;
                    read.outcome = transform::complete(text, &completed, &self.mapping, &self.schema);
                }
            }
            let last = reads.iter().map(|(_, r)| (r.time(field), r.id)).max();
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
            let mut rows: Vec<PageRow> = Vec::with_capacity(reads.len());
            for (_, read) in reads {
                match read.outcome {
                    Outcome::Row(row) => rows.push(row),
                    Outcome::Invalid(bad) => invalid.push(bad),
                    // Completed above.
                    Outcome::Truncated(_) => {}
                }
            }
            drop(list.results);
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
    pub(crate) async fn complete_values(
        &self,
        page_id: Uuid,
        page: &str,
        truncated: &[(String, String)],
    ) -> Result<transform::Completed, JobFailure> {
        let mut completed = Vec::with_capacity(truncated.len());
        for (property_id, ty) in truncated {
            let mut items = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!(
                    "/v1/pages/{}/properties/{}?page_size=100",
                    page_id,
                    encode_path_segment(property_id)
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
            completed.extend(
                transform::completed_value(page, property_id, ty, items).map(|v| (property_id.clone(), v)),
            );
        }
        Ok(completed)
    }
}

/// Records a cursor restart if fewer than [`MAX_CURSOR_RESTARTS`] happened in the last
/// [`CURSOR_RESTART_WINDOW`].
fn within_restart_budget(restarts: &mut VecDeque<std::time::Instant>) -> bool {
    let now = std::time::Instant::now();
    while restarts.front().is_some_and(|t| now.duration_since(*t) > CURSOR_RESTART_WINDOW) {
        restarts.pop_front();
    }
    if restarts.len() >= MAX_CURSOR_RESTARTS {
        return false;
    }
    restarts.push_back(now);
    true
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
