//! Cron schedules under `serve`: two replicas, a kill -9 of the leader, failover within one
//! lease, one catch-up run for the occurrences missed meanwhile, and each occurrence enqueued
//! once (its job id derives from the occurrence); `database schedule` and `schedules list`.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::sys::signal::Signal;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use syncfleet_producer::schedule::occurrence_job_id;
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;

use crate::api::cli_text;
use crate::exactness::until;
use crate::{LONG, SHORT};

/// Every 5 s.
const CRON: &str = "*/5 * * * * *";
const PERIOD: i64 = 5;

/// The scheduled runs: (id, enqueued_at), oldest first.
async fn scheduled(env: &TestEnv) -> Vec<(uuid::Uuid, DateTime<Utc>)> {
    let rows = env
        .db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id, enqueued_at FROM sync_runs WHERE reason = 'schedule' ORDER BY enqueued_at",
        ))
        .await
        .expect("runs");
    rows.iter()
        .map(|r| (r.try_get("", "id").expect("id"), r.try_get("", "enqueued_at").expect("at")))
        .collect()
}

/// The occurrence a scheduled run's id stands for, if it is one (searched around its enqueue).
fn occurrence_of(db: uuid::Uuid, id: uuid::Uuid, enqueued: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let base = enqueued.timestamp() - enqueued.timestamp().rem_euclid(PERIOD);
    (-60..=1)
        .map(|k| DateTime::from_timestamp(base + k * PERIOD, 0).expect("time"))
        .find(|at| occurrence_job_id(db, *at) == id)
}

#[tokio::test]
async fn two_serve_replicas_enqueue_each_cron_occurrence_once_and_the_survivor_takes_over_within_a_lease() {
    let mut env = TestEnv::start(SimConfig { pages: 20, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    let set =
        cli_text(&env, &["database", "schedule", &db.to_string(), "--cron", CRON, "--tz", "Europe/Paris"])
            .await;
    assert!(set.contains("cron") && set.contains("Europe/Paris"), "{set}");
    let listed = cli_text(&env, &["schedules", "list", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let next: Vec<DateTime<Utc>> = serde_json::from_value(listed[0]["next_runs"].clone()).expect("next runs");
    assert_eq!(next.len(), 3);
    assert!(next.windows(2).all(|w| (w[1] - w[0]).num_seconds() == PERIOD), "{next:?}");
    env.spawn_worker(2).expect("worker");
    let scheduler = [
        ("SYNCFLEET_SCHEDULER__TICK_SECS", "1"),
        ("SYNCFLEET_SCHEDULER__DEFAULT_INTERVAL_SECS", "0"),
        ("SYNCFLEET_SCHEDULER__FULL_EVERY_SECS", "0"),
    ];
    // A first replica alone takes the lease; a second one waits behind it.
    let first = env.spawn_producer(&[], &scheduler).expect("serve A");
    until("A's first scheduled run", LONG, || async { !scheduled(&env).await.is_empty() }).await;
    env.spawn_producer(&[], &scheduler).expect("serve B");
    until("two more occurrences", LONG, || async { scheduled(&env).await.len() >= 3 }).await;
    env.signal_worker(first, Signal::SIGKILL).expect("kill -9 the leader");
    let killed: DateTime<Utc> = env.scalar("SELECT now()").await;
    until("the survivor's first run", LONG, || async { scheduled(&env).await.iter().any(|r| r.1 > killed) })
        .await;
    let took_over = scheduled(&env).await.into_iter().find(|r| r.1 > killed).expect("run").1;
    until("two more occurrences after the failover", LONG, || async {
        scheduled(&env).await.iter().filter(|r| r.1 > took_over).count() >= 2
    })
    .await;
    crate::exactness::settle(&env, LONG).await;

    let runs = scheduled(&env).await;
    let gap = (took_over - killed).to_std().unwrap_or_default();
    println!(
        "cron failover: leader killed, survivor's first run {gap:?} later; {} scheduled runs",
        runs.len()
    );
    // The lease is 15 s (three ticks, at least 15 s); the survivor acquires it on its next tick.
    assert!(gap <= Duration::from_secs(15 + 2 + 2), "failover took {gap:?}");
    // Every scheduled run is one occurrence, and no occurrence has two runs.
    let occurrences: Vec<DateTime<Utc>> = runs
        .iter()
        .map(|(id, at)| {
            occurrence_of(db, *id, *at).unwrap_or_else(|| panic!("run {id} is no occurrence's job"))
        })
        .collect();
    let distinct: BTreeSet<_> = occurrences.iter().collect();
    assert_eq!(distinct.len(), runs.len(), "an occurrence was enqueued twice: {occurrences:?}");
    // The occurrences missed during the failover (those up to the takeover): one catch-up run,
    // not one per occurrence.
    let catch_up: Vec<_> = occurrences
        .iter()
        .zip(&runs)
        .filter(|(o, r)| r.1 > killed && **o <= took_over)
        .map(|(o, _)| *o)
        .collect();
    assert_eq!(catch_up.len(), 1, "one catch-up run: {catch_up:?}");
    assert!(
        (took_over - catch_up[0]).num_seconds() < PERIOD,
        "the catch-up serves the latest missed occurrence"
    );
    // While a leader was up, each occurrence has its run: consecutive occurrences before the kill.
    let before: Vec<_> =
        occurrences.iter().zip(&runs).filter(|(_, r)| r.1 < killed).map(|(o, _)| *o).collect();
    assert!(
        before.windows(2).all(|w| (w[1] - w[0]).num_seconds() == PERIOD),
        "an occurrence was skipped while the leader was up: {before:?}"
    );
    let ids = runs.iter().map(|(id, _)| format!("'{id}'")).collect::<Vec<_>>().join(",");
    let statuses: Vec<String> = env
        .db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT DISTINCT status FROM sync_runs WHERE id IN ({ids})"),
        ))
        .await
        .expect("statuses")
        .iter()
        .map(|r| r.try_get("", "status").expect("status"))
        .collect();
    assert_eq!(statuses, vec!["succeeded".to_string()]);

    // `--off` stops it; the list shows no next runs.
    cli_text(&env, &["database", "schedule", &db.to_string(), "--off"]).await;
    let text = cli_text(&env, &["schedules", "list"]).await;
    assert!(text.contains("off (disabled)"), "{text}");
    let count = scheduled(&env).await.len();
    until("a tick past the next occurrence", SHORT, || async {
        env.scalar::<i64>(
            "SELECT (now() - interval '7 seconds' > (SELECT max(enqueued_at) FROM sync_runs))::int::bigint",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(scheduled(&env).await.len(), count, "no scheduled run once off");
    env.cleanup().await;
}
