//! Cron schedules: a per-database cron expression (5 fields, or 6 with seconds; `@hourly` and the
//! like) evaluated in an IANA time zone, with a jitter that spreads databases sharing an
//! expression. Parsing and evaluation are croner's.
//!
//! Misfires: after downtime (or while a run of the database was still active), every occurrence
//! missed within `scheduler.misfire_grace_secs` is served by **one** catch-up run; occurrences
//! older than that are dropped. Each occurrence's job has an id derived from the database and the
//! occurrence ([`occurrence_job_id`]), so a second leader, or a leader that died between
//! publishing and recording the occurrence, publishes the same job again and the worker runs it
//! once.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use uuid::Uuid;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    tz: chrono_tz::Tz,
    jitter: Duration,
}

/// Why a schedule was refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub reason: String,
}

/// Longest jitter accepted (a day).
pub const MAX_JITTER_SECS: u32 = 86_400;
/// At most this many upcoming runs are listed.
const MAX_UPCOMING: usize = 1_000;

impl CronSchedule {
    /// A new schedule: as [`parse`](Self::parse), and refused when it never fires again.
    pub fn parse_new(expression: &str, tz: Option<&str>, jitter_secs: u32) -> Result<Self, ScheduleError> {
        let schedule = Self::parse(expression, tz, jitter_secs)?;
        if schedule.next_run(Uuid::nil(), Utc::now()).is_none() {
            return Err(ScheduleError { field: "cron", reason: format!("{expression:?} never fires") });
        }
        Ok(schedule)
    }

    /// A stored or new schedule (one that fired its last occurrence is still a schedule).
    pub fn parse(expression: &str, tz: Option<&str>, jitter_secs: u32) -> Result<Self, ScheduleError> {
        if expression.len() > 200 || expression.contains('\0') {
            return Err(ScheduleError {
                field: "cron",
                reason: "is longer than 200 characters or has a NUL".into(),
            });
        }
        let cron = Cron::from_str(expression).map_err(|e| ScheduleError {
            field: "cron",
            reason: format!("{expression:?} is not a cron expression: {e}"),
        })?;
        let tz = match tz {
            None | Some("") => chrono_tz::UTC,
            Some(name) => chrono_tz::Tz::from_str(name).map_err(|_| ScheduleError {
                field: "tz",
                reason: format!("{name:?} is not an IANA time zone (e.g. Europe/Paris)"),
            })?,
        };
        if jitter_secs > MAX_JITTER_SECS {
            return Err(ScheduleError {
                field: "jitter_secs",
                reason: format!("must be at most {MAX_JITTER_SECS}"),
            });
        }
        Ok(Self { cron, tz, jitter: Duration::from_secs(u64::from(jitter_secs)) })
    }

    /// This database's fixed delay within the jitter (the same on every producer).
    pub fn offset(&self, database: Uuid) -> Duration {
        if self.jitter.is_zero() {
            return Duration::ZERO;
        }
        let spread = self.jitter.as_secs() + 1;
        let hash = u64::from_le_bytes(database.as_bytes()[..8].try_into().unwrap_or_default());
        Duration::from_secs(hash % spread)
    }

    /// The latest occurrence that is due at `now` and later than `after` and than `now - grace`
    /// (the misfire grace), if any. Occurrences are nominal times; one is due once its jitter
    /// offset has passed too.
    pub fn latest_due(
        &self,
        database: Uuid,
        after: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        grace: Duration,
    ) -> Option<DateTime<Utc>> {
        let offset = chrono::Duration::from_std(self.offset(database)).ok()?;
        let grace = chrono::Duration::from_std(grace).ok()?;
        let due_by = now.checked_sub_signed(offset)?;
        let earliest = due_by.checked_sub_signed(grace).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let floor = after.map_or(earliest, |a| a.max(earliest));
        // The latest occurrence at or before `due_by`, searched backwards (one step).
        let latest = self.cron.find_previous_occurrence(&due_by.with_timezone(&self.tz), true).ok()?;
        let latest = latest.with_timezone(&Utc);
        (latest > floor).then_some(latest)
    }

    /// When the next run after `now` is due (its occurrence plus the database's offset).
    pub fn next_run(&self, database: Uuid, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let offset = chrono::Duration::from_std(self.offset(database)).ok()?;
        let from = now.checked_sub_signed(offset)?.with_timezone(&self.tz);
        let next = self.cron.find_next_occurrence(&from, false).ok()?;
        next.with_timezone(&Utc).checked_add_signed(offset)
    }

    /// The next `n` run times after `now`.
    pub fn upcoming(&self, database: Uuid, now: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut at = now;
        while out.len() < n.min(MAX_UPCOMING) {
            match self.next_run(database, at) {
                Some(next) => {
                    out.push(next);
                    at = next;
                }
                None => break,
            }
        }
        out
    }
}

/// Why a schedule could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Invalid(#[from] ScheduleError),
    #[error("PostgreSQL: {0}")]
    Db(#[from] sea_orm::DbErr),
}

/// Gives `database` a cron schedule (validated as a new one) and enables it; returns false when
/// no such database is registered. The latest occurrence already due counts as served, so the
/// schedule starts with the next one (or with one whose jitter delay is still running).
pub async fn store<C: sea_orm::ConnectionTrait>(
    db: &C,
    database: Uuid,
    expression: &str,
    tz: Option<&str>,
    jitter_secs: u32,
) -> Result<bool, StoreError> {
    let schedule = CronSchedule::parse_new(expression, tz, jitter_secs)?;
    let now = Utc::now();
    let served = schedule.latest_due(database, None, now, Duration::from_secs(366 * 86_400)).unwrap_or(now);
    let changed = db
        .execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "UPDATE notion_databases SET schedule_cron = $2, schedule_tz = $3, schedule_jitter_secs = $4, \
                 schedule_fired_at = $5, enabled = true, updated_at = now() WHERE id = $1",
            [
                database.into(),
                expression.trim().to_string().into(),
                tz.filter(|t| !t.is_empty()).unwrap_or("UTC").to_string().into(),
                (jitter_secs.min(MAX_JITTER_SECS) as i32).into(),
                served.into(),
            ],
        ))
        .await?;
    Ok(changed.rows_affected() == 1)
}

/// Removes `database`'s cron schedule (its interval applies again).
pub async fn clear<C: sea_orm::ConnectionTrait>(db: &C, database: Uuid) -> Result<(), sea_orm::DbErr> {
    db.execute_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "UPDATE notion_databases SET schedule_cron = NULL, schedule_tz = NULL, schedule_jitter_secs = 0, \
             updated_at = now() WHERE id = $1",
        [database.into()],
    ))
    .await
    .map(|_| ())
}

/// The job id of `database`'s run for the occurrence `at`: the same on every producer, so a
/// duplicate publish of one occurrence is one run.
pub fn occurrence_job_id(database: Uuid, at: DateTime<Utc>) -> Uuid {
    Uuid::new_v5(&database, format!("syncfleet-schedule:{}", at.timestamp_millis()).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
    }

    #[test]
    fn bad_expressions_zones_and_jitters_name_their_field() {
        assert_eq!(CronSchedule::parse("not cron", None, 0).unwrap_err().field, "cron");
        assert_eq!(CronSchedule::parse_new("0 0 30 2 *", None, 0).unwrap_err().field, "cron");
        assert_eq!(CronSchedule::parse("0 * * * *", Some("Mars/Olympus"), 0).unwrap_err().field, "tz");
        assert_eq!(
            CronSchedule::parse("0 * * * *", None, MAX_JITTER_SECS + 1).unwrap_err().field,
            "jitter_secs"
        );
        assert_eq!(CronSchedule::parse(&"*".repeat(300), None, 0).unwrap_err().field, "cron");
        assert!(CronSchedule::parse("*/5 * * * * *", Some("Europe/Paris"), 10).is_ok());
        assert!(CronSchedule::parse("@hourly", None, 0).is_ok());
    }

    #[test]
    fn after_downtime_one_catch_up_within_the_grace_and_nothing_older() {
        let s = CronSchedule::parse("0 * * * *", None, 0).expect("hourly");
        let db = Uuid::nil();
        let grace = Duration::from_secs(2 * 3600);
        // Last fired at 08:00; down until 11:30: 09, 10 and 11 were missed → one run, for 11:00.
        let now = at("2026-11-24T11:30:00Z");
        assert_eq!(
            s.latest_due(db, Some(at("2026-11-24T08:00:00Z")), now, grace),
            Some(at("2026-11-24T11:00:00Z"))
        );
        // Once 11:00 is recorded, nothing until 12:00.
        assert_eq!(s.latest_due(db, Some(at("2026-11-24T11:00:00Z")), now, grace), None);
        assert_eq!(
            s.latest_due(db, Some(at("2026-11-24T11:00:00Z")), at("2026-11-24T12:00:00Z"), grace),
            Some(at("2026-11-24T12:00:00Z"))
        );
        // Down for longer than the grace since the last occurrence: that occurrence is dropped.
        let short = Duration::from_secs(600);
        assert_eq!(s.latest_due(db, Some(at("2026-11-24T08:00:00Z")), now, short), None);
        assert_eq!(s.next_run(db, now), Some(at("2026-11-24T12:00:00Z")));
    }

    #[test]
    fn time_zones_and_jitter_shift_the_runs() {
        // 09:00 in Paris is 08:00 UTC in November (CET).
        let s = CronSchedule::parse("0 9 * * *", Some("Europe/Paris"), 0).expect("daily");
        assert_eq!(s.next_run(Uuid::nil(), at("2026-11-24T00:00:00Z")), Some(at("2026-11-24T08:00:00Z")));
        let j = CronSchedule::parse("0 * * * *", None, 600).expect("jittered");
        let db = Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
        let offset = j.offset(db);
        assert!(offset <= Duration::from_secs(600));
        assert_eq!(offset, j.offset(db), "the same on every evaluation");
        // The 10:00 occurrence runs at 10:00 plus the offset.
        let next = j.next_run(db, at("2026-11-24T10:00:00Z")).expect("next");
        assert_eq!(next, at("2026-11-24T10:00:00Z") + chrono::Duration::from_std(offset).expect("offset"));
        // Not due before its offset has passed.
        let before = next - chrono::Duration::seconds(1);
        let fired = Some(at("2026-11-24T09:00:00Z"));
        assert_eq!(j.latest_due(db, fired, before, Duration::from_secs(3600)), None);
        assert_eq!(
            j.latest_due(db, fired, next, Duration::from_secs(3600)),
            Some(at("2026-11-24T10:00:00Z"))
        );
    }

    #[test]
    fn occurrence_ids_are_stable_and_distinct() {
        let db = Uuid::new_v4();
        let t = at("2026-11-24T11:00:00Z");
        assert_eq!(occurrence_job_id(db, t), occurrence_job_id(db, t));
        assert_ne!(occurrence_job_id(db, t), occurrence_job_id(db, t + chrono::Duration::seconds(1)));
        assert_ne!(occurrence_job_id(db, t), occurrence_job_id(Uuid::new_v4(), t));
    }
}
