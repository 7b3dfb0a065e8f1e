//! Reading one full sync as several chains at once.
//!
//! A cursor chain is serial: with Notion answering in 400 ms, one chain makes at most 2.5
//! requests a second and cannot use a 3/s budget. A database known to hold more than
//! [`SPLIT_ABOVE`] pages (from its previous sync) is therefore read as up to `sync.max_chains`
//! disjoint `created_time` ranges `[lo, hi)`, cut at the quantiles of the stored pages' creation
//! times and read concurrently under the same budget. A database seen for the first time is
//! read as one chain (its size is unknown).
//!
//! Each range's progress is part of the run's checkpoint, so a resumed split run continues
//! every range where it stopped; the checkpoint's `sort_time` is the least progress of the
//! unfinished ranges, which is also a safe place for a single chain to resume from.

use chrono::{DateTime, DurationRound, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use syncfleet_shared::db::runs::{Checkpoint, RangeState};
use uuid::Uuid;

/// Databases with more live pages than this are split.
pub const SPLIT_ABOVE: i64 = 20_000;
/// One chain per this many pages, up to `sync.max_chains` (4 by default).
pub const PAGES_PER_CHAIN: i64 = 10_000;

/// One range to read: index into the run's ranges, its bounds, and where to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub range: usize,
    pub lo: Option<DateTime<Utc>>,
    pub hi: Option<DateTime<Utc>>,
    pub from: Option<DateTime<Utc>>,
}

impl Chain {
    /// The whole database (or a resumed single chain from `from`).
    pub fn whole(from: Option<DateTime<Utc>>) -> Self {
        Self { range: 0, lo: None, hi: None, from }
    }
}

/// Ranges from boundary times (minute-rounded, sorted, deduplicated): `[None, b1), …, [bn, None)`.
pub fn ranges(mut bounds: Vec<DateTime<Utc>>) -> Vec<RangeState> {
    bounds = bounds.into_iter().filter_map(|b| b.duration_trunc(chrono::Duration::minutes(1)).ok()).collect();
    bounds.sort();
    bounds.dedup();
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut lo = None;
    for b in bounds {
        out.push(RangeState { lo, hi: Some(b), from: None, done: false });
        lo = Some(b);
    }
    out.push(RangeState { lo, hi: None, from: None, done: false });
    out
}

/// The ranges of a fresh full run of `database_id`: one unless the database is large.
pub async fn plan<C: ConnectionTrait>(
    db: &C,
    database_id: Uuid,
    max_chains: usize,
) -> Result<Vec<RangeState>, DbErr> {
    if max_chains < 2 {
        return Ok(ranges(Vec::new()));
    }
    let count: i64 = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM notion_pages WHERE database_id = $1 AND deleted_at IS NULL",
            [database_id.into()],
        ))
        .await?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or_default();
    if count <= SPLIT_ABOVE {
        return Ok(ranges(Vec::new()));
    }
    let chains = ((count / PAGES_PER_CHAIN) as usize).clamp(2, max_chains);
    let fractions: Vec<f64> = (1..chains).map(|k| k as f64 / chains as f64).collect();
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT unnest(percentile_disc($2::float8[]) WITHIN GROUP (ORDER BY created_time)) AS b \
             FROM notion_pages WHERE database_id = $1 AND deleted_at IS NULL",
            [database_id.into(), fractions.into()],
        ))
        .await?;
    let bounds = rows.iter().filter_map(|r| r.try_get::<DateTime<Utc>>("", "b").ok()).collect();
    Ok(ranges(bounds))
}

/// The chains still to read of `ranges`.
pub fn pending(ranges: &[RangeState]) -> Vec<Chain> {
    ranges
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.done)
        .map(|(range, r)| Chain { range, lo: r.lo, hi: r.hi, from: r.from.or(r.lo) })
        .collect()
}

/// The committed progress of a split run, as the checkpoint to store with each batch.
#[derive(Debug, Clone)]
pub struct Progress {
    ranges: Vec<RangeState>,
}

impl Progress {
    pub fn new(ranges: Vec<RangeState>) -> Self {
        Self { ranges }
    }

    /// Records that `range` committed up to `reached` (and whether it is finished); returns the
    /// run's checkpoint.
    pub fn advance(
        &mut self,
        range: usize,
        reached: Option<DateTime<Utc>>,
        done: bool,
        run_started: DateTime<Utc>,
    ) -> Checkpoint {
        if let Some(r) = self.ranges.get_mut(range) {
            if reached.is_some() {
                r.from = reached;
            }
            r.done |= done;
        }
        let least = self
            .ranges
            .iter()
            .filter(|r| !r.done)
            .map(|r| r.from.or(r.lo).unwrap_or(DateTime::<Utc>::UNIX_EPOCH))
            .min()
            .unwrap_or(run_started);
        Checkpoint { sort_time: least, page_id: Uuid::nil(), run_started, ranges: self.ranges.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(m: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::minutes(m)
    }

    #[test]
    fn boundaries_make_disjoint_complete_ranges() {
        let r = ranges(vec![t(20), t(10), t(10) + chrono::Duration::seconds(30), t(30)]);
        assert_eq!(r.len(), 4, "t(10) twice after rounding: {r:?}");
        assert_eq!((r[0].lo, r[0].hi), (None, Some(t(10))));
        assert_eq!((r[1].lo, r[1].hi), (Some(t(10)), Some(t(20))));
        assert_eq!((r[3].lo, r[3].hi), (Some(t(30)), None));
        assert_eq!(ranges(Vec::new()).len(), 1);
    }

    #[test]
    fn the_checkpoint_is_the_least_progress_of_unfinished_ranges() {
        let mut p = Progress::new(ranges(vec![t(100), t(200)]));
        let started = t(1000);
        let cp = p.advance(1, Some(t(150)), false, started);
        assert_eq!(cp.sort_time, DateTime::<Utc>::UNIX_EPOCH, "range 0 has not started");
        let cp = p.advance(0, Some(t(50)), false, started);
        assert_eq!(cp.sort_time, t(50));
        let cp = p.advance(0, Some(t(99)), true, started);
        assert_eq!(cp.sort_time, t(150));
        let pending = pending(&cp.ranges);
        assert_eq!(pending.len(), 2);
        assert_eq!((pending[0].range, pending[0].from), (1, Some(t(150))));
        assert_eq!((pending[1].range, pending[1].from), (2, Some(t(200))));
    }
}
