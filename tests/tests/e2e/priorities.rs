//! Priorities and fairness on a busy fleet: a manual job goes ahead of a backlog of scheduled
//! ones (the high-priority queue and its own worker slots), and one integration's thousand
//! queued jobs do not starve another's single job (the fleet-wide per-integration share, with
//! parking). Both print the queue waits they measure (`priorities:` lines, for BENCHMARKS.md).

use nix::sys::signal::Signal;
use sea_orm::ConnectionTrait;
use secrecy::SecretString;
use syncfleet_shared::job::{Priority, Reason, SyncDatabaseJob, SyncMode};
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;
use uuid::Uuid;

use crate::api::cli_text;
use crate::exactness::until;
use crate::{LONG, SHORT};

fn job(integration: &str, database_id: Uuid, priority: Priority, reason: Reason) -> SyncDatabaseJob {
    SyncDatabaseJob {
        integration: integration.into(),
        database_id,
        mode: SyncMode::Incremental,
        priority,
        reason,
    }
}

fn id_list(ids: &[Uuid]) -> String {
    ids.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",")
}

/// When a run left the queue: its (last) start, or, for one coalesced into a running sync of
/// its database (`skipped`, never started), when that was decided.
const LEFT_QUEUE: &str = "COALESCE(started_at, finished_at)";

/// Milliseconds run `id` waited between its publish and leaving the queue.
async fn queue_wait_ms(env: &TestEnv, id: Uuid) -> f64 {
    env.scalar(&format!(
        "SELECT (EXTRACT(EPOCH FROM {LEFT_QUEUE} - enqueued_at) * 1000)::float8 FROM sync_runs WHERE id = '{id}'"
    ))
    .await
}

/// Registers integration `slug` with its own simulator token, and the simulator's databases
/// `indexes` under it.
async fn register_with_token(
    env: &TestEnv,
    slug: &str,
    token: &str,
    indexes: std::ops::Range<usize>,
) -> Vec<Uuid> {
    syncfleet_producer::commands::integration::save(
        &env.settings,
        slug,
        None,
        Some(1000.0),
        Some(100),
        &SecretString::from(token.to_string()),
    )
    .await
    .expect("integration");
    let mut ids = Vec::new();
    for i in indexes {
        let id = env.sim.state.read().databases[i].id;
        syncfleet_producer::commands::database::add(&env.settings, slug, id, None, None, false)
            .await
            .expect("database");
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn a_manual_job_goes_ahead_of_a_backlog_of_500_scheduled_jobs() {
    let mut env = TestEnv::start(SimConfig {
        databases: 21,
        pages: 40,
        rate: 0.0,
        latency_ms: 40,
        ..SimConfig::default()
    })
    .await
    .expect("env");
    let token = env.token.clone();
    let ids = register_with_token(&env, "acme", &token, 0..21).await;
    // The backlog covers 20 databases; the manual job is for the 21st, so it is never coalesced.
    let (manual_db, ids) = (ids[20], &ids[..20]);
    // With the default share (4): the backlog's two running jobs leave room for the manual one.
    env.spawn_worker(2).expect("worker");

    let backlog = env
        .publish_all((0..500).map(|i| job("acme", ids[i % ids.len()], Priority::Normal, Reason::Schedule)))
        .await
        .expect("backlog");
    let backlog_ids = id_list(&backlog);
    let finished =
        format!("SELECT count(*) FROM sync_runs WHERE id IN ({backlog_ids}) AND finished_at IS NOT NULL");
    // Every slot of the normal lane is busy with the backlog before the manual job comes.
    until("the backlog to flow", LONG, || async { env.scalar::<i64>(&finished).await >= 10 }).await;

    // `enqueue` is what a person runs; its default priority is high.
    let out = cli_text(&env, &["enqueue", "--database", &manual_db.to_string(), "--json"]).await;
    let manual: Uuid = serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("job id");
    let run = env.wait_run(manual, LONG).await.expect("the manual run");
    assert_eq!(run.status, "succeeded", "{}", env.log_tail());
    let untouched: i64 = env
        .scalar(&format!("SELECT count(*) FROM sync_runs WHERE id IN ({backlog_ids}) AND status = 'queued'"))
        .await;
    let done: i64 = env.scalar(&finished).await;
    let wait = queue_wait_ms(&env, manual).await;
    let job_ms: f64 = env
        .scalar(&format!(
            "SELECT (percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - started_at)) * 1000)::float8 \
             FROM sync_runs WHERE id IN ({backlog_ids}) AND status = 'succeeded'"
        ))
        .await;
    println!(
        "priorities: manual job queue wait {wait:.0} ms behind a backlog of 500 scheduled jobs \
         (backlog job median {job_ms:.0} ms, {done} finished, {untouched} not yet started; 1 worker, 2 normal + 1 high slot)"
    );
    // Without the high queue it would wait for the whole backlog ahead of it.
    assert!(untouched >= 300, "the manual job ran only after {} of 500 backlog jobs", 500 - untouched);
    // At most one job's duration per slot (here it takes a slot of its own: no wait at all).
    assert!(wait < job_ms.max(1000.0) * 2.0, "queue wait {wait:.0} ms against a job of {job_ms:.0} ms");

    // A manual job for a database the backlog is syncing right now is coalesced into that run;
    // the rerun its holder then publishes keeps the high priority, so the request is served
    // right after the run in progress, not when the backlog next reaches that database (20
    // jobs further on).
    // Slower answers make each backlog run last long enough for the manual job to meet it: a
    // run that starts after the change makes at least two requests of 1.5 s each. (A run that
    // started before it may be one answer from its end, and finish before the job arrives.)
    env.sim_admin("config", serde_json::json!({"latency_ms": 1500})).await.expect("slower");
    let slowed_at: f64 = env.scalar("SELECT extract(epoch FROM clock_timestamp())::float8").await;
    let syncing = format!(
        "SELECT database_id FROM sync_runs WHERE id IN ({backlog_ids}) AND status = 'running' \
         AND started_at > to_timestamp({slowed_at}) ORDER BY started_at DESC LIMIT 1"
    );
    let target = std::cell::Cell::new(None::<Uuid>);
    until("a backlog run to be running", LONG, || async {
        let row = env
            .db
            .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, syncing.clone()))
            .await
            .expect("query");
        target.set(row.map(|r| r.try_get::<Uuid>("", "database_id").expect("uuid")));
        target.get().is_some()
    })
    .await;
    let target = target.get().expect("a database being synced");
    let out = cli_text(&env, &["enqueue", "--database", &target.to_string(), "--json"]).await;
    let coalesced: Uuid = serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("job id");
    // Served by the first run of the database that starts after the request and succeeds.
    let served_at = format!(
        "SELECT min(r.started_at) FROM sync_runs r, sync_runs m WHERE m.id = '{coalesced}' \
         AND r.database_id = '{target}' AND r.status = 'succeeded' AND r.started_at >= m.enqueued_at"
    );
    let served = format!("SELECT count(*) FROM ({served_at}) s WHERE s.min IS NOT NULL");
    until("the coalesced manual request to be served", LONG, || async {
        env.scalar::<i64>(&served).await == 1
    })
    .await;
    let how: String = env.scalar(&format!("SELECT status FROM sync_runs WHERE id = '{coalesced}'")).await;
    let ahead: i64 = env
        .scalar(&format!(
            "SELECT count(*) FROM sync_runs r, sync_runs m WHERE m.id = '{coalesced}' AND r.id IN ({backlog_ids}) \
             AND r.started_at > m.enqueued_at AND r.started_at < ({served_at})"
        ))
        .await;
    println!(
        "priorities: a manual job for a database being synced was {how}; {ahead} backlog runs started before its request was served"
    );
    assert_eq!(how, "skipped", "the manual job was meant to meet a running sync of its database");
    assert!(ahead <= 10, "{ahead} backlog runs started before the coalesced manual request was served");
    env.cleanup().await;
}

#[tokio::test]
async fn one_integrations_thousand_jobs_do_not_starve_anothers_single_job() {
    let mut env = TestEnv::start(SimConfig {
        databases: 21,
        pages: 20,
        rate: 0.0,
        latency_ms: 30,
        tokens: vec!["secret_sim_busy".into(), "secret_sim_quiet".into()],
        ..SimConfig::default()
    })
    .await
    .expect("env");
    let busy = register_with_token(&env, "busy", "secret_sim_busy", 0..20).await;
    let quiet = register_with_token(&env, "quiet", "secret_sim_quiet", 20..21).await[0];
    const CAP: i64 = 2;
    env.settings.worker.max_jobs_per_integration = CAP as u16;
    env.settings.amqp.park_delay_ms = 1000;
    // 4 slots in the normal lane, so the cap leaves room for others.
    env.spawn_worker(2).expect("worker 1");
    env.spawn_worker(2).expect("worker 2");

    let backlog = env
        .publish_all((0..1000).map(|i| job("busy", busy[i % busy.len()], Priority::Normal, Reason::Schedule)))
        .await
        .expect("backlog");
    // The quiet integration's one job, in the same (normal) queue, behind all of them.
    let lone = env.publish_all([job("quiet", quiet, Priority::Normal, Reason::Api)]).await.expect("lone")[0];
    let running_busy = "SELECT count(*) FROM sync_runs WHERE integration = 'busy' AND status = 'running'";
    let most_running = std::cell::Cell::new(0);
    until("the quiet integration's job", LONG, || async {
        most_running.set(most_running.get().max(env.scalar::<i64>(running_busy).await));
        env.scalar::<i64>(&format!(
            "SELECT count(*) FROM sync_runs WHERE id = '{lone}' AND finished_at IS NOT NULL"
        ))
        .await
            == 1
    })
    .await;
    let run = env.wait_run(lone, SHORT).await.expect("the lone run");
    assert_eq!(run.status, "succeeded", "{}", env.log_tail());
    let open_busy: i64 = env
        .scalar(&format!(
            "SELECT count(*) FROM sync_runs WHERE id IN ({}) AND finished_at IS NULL",
            id_list(&backlog)
        ))
        .await;
    let wait = queue_wait_ms(&env, lone).await;
    println!(
        "priorities: the quiet integration's single job waited {wait:.0} ms behind 1,000 jobs of another \
         ({open_busy} of them still open; cap {CAP} per integration, 2 workers x 2 slots, park 1 s)"
    );
    assert!(open_busy >= 500, "the lone job finished only after {} of the 1,000", 1000 - open_busy);
    let most_running = most_running.get();
    assert!(most_running <= CAP, "{most_running} runs of one integration at once over a cap of {CAP}");

    // A high-priority job of the busy integration, which is at its cap: from the moment it is
    // marked waiting, no normal job of the integration starts before it.
    let high =
        env.publish_all([job("busy", busy[3], Priority::High, Reason::Manual)]).await.expect("high")[0];
    let pool = syncfleet_shared::redis_pool::connect(&env.settings.redis).await.expect("redis");
    let waiting = format!("{}:share:{{busy}}:waiting", env.settings.redis.key_prefix);
    let left = format!("SELECT count(*) FROM sync_runs WHERE id = '{high}' AND {LEFT_QUEUE} IS NOT NULL");
    let marked_at = std::cell::Cell::new(None::<f64>);
    // Polled every few milliseconds, in Redis only, so a mark that lasts a moment is seen.
    let deadline = std::time::Instant::now() + LONG;
    let mut conn = pool.get().await.expect("redis connection");
    for poll in 0u64.. {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&waiting)
            .arg(high.to_string())
            .query_async(&mut conn)
            .await
            .expect("zscore");
        if score.is_some() {
            let now: f64 = env.scalar("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::float8").await;
            marked_at.set(Some(now));
            break;
        }
        if poll % 20 == 0 && env.scalar::<i64>(&left).await == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for the high job to wait or start");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let run = env.wait_run(high, LONG).await.expect("the high run");
    assert!(matches!(run.status.as_str(), "succeeded" | "skipped"), "{}: {}", run.status, env.log_tail());
    let high_wait = queue_wait_ms(&env, high).await;
    match marked_at.get() {
        Some(marked_ms) => {
            // Normal jobs admitted just before the mark may record their start just after it:
            // at most the cap's worth.
            let overtaken: i64 = env
                .scalar(&format!(
                    "SELECT count(*) FROM sync_runs r, sync_runs h WHERE h.id = '{high}' AND r.id IN ({}) \
                     AND r.started_at > to_timestamp({marked_ms} / 1000.0) \
                     AND r.started_at < COALESCE(h.started_at, h.finished_at)",
                    id_list(&backlog),
                ))
                .await;
            println!(
                "priorities: a high-priority job of the capped integration waited {high_wait:.0} ms; \
                 {overtaken} of its normal jobs started after it was marked waiting"
            );
            assert!(
                overtaken <= CAP,
                "{overtaken} normal jobs of the integration started ahead of its waiting high job"
            );
        }
        None => println!("priorities: the high-priority job found a free share at once ({high_wait:.0} ms)"),
    }

    // The high lane is fair too: a hundred high jobs of the busy integration (each worker has
    // one high slot; only one of them waits in place, the others park) do not hold the quiet
    // integration's high job back.
    let busy_high = env
        .publish_all((0..100).map(|i| job("busy", busy[i % busy.len()], Priority::High, Reason::Api)))
        .await
        .expect("busy high jobs");
    let quiet_high =
        env.publish_all([job("quiet", quiet, Priority::High, Reason::Manual)]).await.expect("quiet high")[0];
    let run = env.wait_run(quiet_high, LONG).await.expect("the quiet high run");
    assert_eq!(run.status, "succeeded", "{}", env.log_tail());
    // Counted by starts, not by time: jobs coalesced into a running sync of their database
    // finish without starting.
    let started_before: i64 = env
        .scalar(&format!(
            "SELECT count(*) FROM sync_runs r, sync_runs q WHERE q.id = '{quiet_high}' AND r.id IN ({}) \
             AND r.started_at < q.started_at",
            id_list(&busy_high)
        ))
        .await;
    let quiet_wait = queue_wait_ms(&env, quiet_high).await;
    println!(
        "priorities: the quiet integration's high job waited {quiet_wait:.0} ms behind 100 high jobs of the busy one \
         ({started_before} of them started before it)"
    );
    assert!(started_before <= 50, "the quiet high job started only after {started_before} of the 100");

    // kill -9 the whole fleet mid-backlog: the shares the dead workers held expire with their
    // lease, and a new worker carries on with the backlog.
    for pid in env.child_pids() {
        env.signal_worker(pid, Signal::SIGKILL).expect("kill -9");
    }
    for pid in env.child_pids() {
        env.wait_worker_exit(pid, SHORT).await.expect("exited");
    }
    let finished = format!(
        "SELECT count(*) FROM sync_runs WHERE id IN ({}) AND finished_at IS NOT NULL",
        id_list(&backlog)
    );
    let before: i64 = env.scalar(&finished).await;
    env.spawn_worker(2).expect("a new worker");
    until("the backlog to go on after the kill", LONG, || async {
        env.scalar::<i64>(&finished).await >= before + 10
    })
    .await;
    env.cleanup().await;
}
