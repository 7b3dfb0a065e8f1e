//! Schema migrations (sea-orm-migration). `syncfleet-producer migrate` applies them; re-running
//! changes nothing because applied versions are recorded in `seaql_migrations`.
//!
//! The DDL is plain PostgreSQL so that column types (`jsonb`, `timestamptz`, `bytea`) and
//! constraints are exactly what operators will query.

use sea_orm_migration::prelude::*;

/// A migration that runs plain SQL: a module `$name` holding its `Migration`.
macro_rules! sql_migration {
    ($(#[$doc:meta])* $name:ident, up: $up:expr, down: $down:expr $(,)?) => {
        $(#[$doc])*
        mod $name {
            use sea_orm_migration::prelude::*;

            pub struct Migration;

            impl MigrationName for Migration {
                fn name(&self) -> &str {
                    stringify!($name)
                }
            }

            #[async_trait::async_trait]
            impl MigrationTrait for Migration {
                async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
                    manager.get_connection().execute_unprepared($up).await.map(|_| ())
                }

                async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
                    manager.get_connection().execute_unprepared($down).await.map(|_| ())
                }
            }
        }
    };
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_init::Migration),
            Box::new(m20261122_000002_sync_semantics::Migration),
            Box::new(m20261124_000003_exactness::Migration),
            Box::new(m20261124_000004_confirmations::Migration),
            Box::new(m20261124_000005_control_plane::Migration),
            Box::new(m20261124_000006_attempt_markers::Migration),
            Box::new(m20261124_000007_notion_webhooks::Migration),
            Box::new(m20261124_000008_cron_schedules::Migration),
            Box::new(m20261124_000009_rerun_priority::Migration),
        ]
    }
}

mod m20261122_000001_init {
    use sea_orm_migration::prelude::*;

    pub struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m20261122_000001_init"
        }
    }

    const UP: &str = r#"
CREATE TABLE integrations (
    slug             text PRIMARY KEY CHECK (slug ~ '^[A-Za-z0-9_-]{1,64}$'),
    workspace        text,
    token_encrypted  bytea NOT NULL,
    rate_per_second  double precision NOT NULL CHECK (rate_per_second > 0),
    burst            integer NOT NULL CHECK (burst >= 1),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notion_databases (
    id                     uuid PRIMARY KEY,
    integration            text NOT NULL REFERENCES integrations (slug) ON DELETE CASCADE,
    data_source_id         uuid NOT NULL,
    title                  text NOT NULL DEFAULT '',
    slug                   text NOT NULL UNIQUE,
    schema                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    schema_hash            text NOT NULL DEFAULT '',
    sync_interval_secs     integer CHECK (sync_interval_secs IS NULL OR sync_interval_secs > 0),
    watermark              timestamptz,
    fence                  bigint NOT NULL DEFAULT 0,
    last_success_at        timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notion_pages (
    database_id       uuid NOT NULL REFERENCES notion_databases (id) ON DELETE CASCADE,
    page_id           uuid NOT NULL,
    properties        jsonb NOT NULL,
    url               text,
    created_time      timestamptz NOT NULL,
    last_edited_time  timestamptz NOT NULL,
    created_by        uuid,
    last_edited_by    uuid,
    archived          boolean NOT NULL DEFAULT false,
    in_trash          boolean NOT NULL DEFAULT false,
    deleted_at        timestamptz,
    content_hash      text NOT NULL,
    last_seen_run     uuid,
    written_fence     bigint NOT NULL DEFAULT 0,
    synced_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (database_id, page_id)
);
CREATE INDEX notion_pages_last_edited ON notion_pages (database_id, last_edited_time);

CREATE TABLE sync_runs (
    id               uuid PRIMARY KEY,
    database_id      uuid NOT NULL REFERENCES notion_databases (id) ON DELETE CASCADE,
    integration      text NOT NULL,
    mode             text NOT NULL CHECK (mode IN ('full', 'incremental')),
    reason           text NOT NULL,
    status           text NOT NULL CHECK (status IN ('queued', 'running', 'retrying', 'succeeded', 'partial', 'failed', 'skipped')),
    attempt          integer NOT NULL DEFAULT 0,
    worker           text,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    requests         bigint NOT NULL DEFAULT 0,
    rate_limited     bigint NOT NULL DEFAULT 0,
    pages_seen       bigint NOT NULL DEFAULT 0,
    pages_created    bigint NOT NULL DEFAULT 0,
    pages_updated    bigint NOT NULL DEFAULT 0,
    pages_unchanged  bigint NOT NULL DEFAULT 0,
    pages_deleted    bigint NOT NULL DEFAULT 0,
    pages_invalid    bigint NOT NULL DEFAULT 0,
    checkpoint       jsonb,
    error_kind       text,
    error_message    text
);
CREATE INDEX sync_runs_database ON sync_runs (database_id, enqueued_at DESC);
"#;

    const LZ4: &str = r#"
DO $$
BEGIN
    ALTER TABLE notion_pages ALTER COLUMN properties SET COMPRESSION lz4;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'lz4 compression unavailable; notion_pages.properties keeps the default';
END $$;
"#;

    const DOWN: &str = "DROP TABLE sync_runs; DROP TABLE notion_pages; DROP TABLE notion_databases; DROP TABLE integrations;";

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            let db = manager.get_connection();
            db.execute_unprepared(UP).await?;
            // lz4 compresses page properties several times faster than the default pglz; use it
            // when the server was built with it (PostgreSQL ≥ 14 with lz4), else keep pglz.
            db.execute_unprepared(LZ4).await.map(|_| ())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager.get_connection().execute_unprepared(DOWN).await.map(|_| ())
        }
    }
}

sql_migration! {
    /// Page history, invalid pages, per-database property mappings, and the `notion` schema that
    /// holds one typed view per database with the helper functions the views use.
    m20261122_000002_sync_semantics,
    up: r#"
CREATE TABLE notion_page_versions (
    id                bigserial PRIMARY KEY,
    database_id       uuid NOT NULL REFERENCES notion_databases (id) ON DELETE CASCADE,
    page_id           uuid NOT NULL,
    properties        jsonb NOT NULL,
    content_hash      text NOT NULL,
    last_edited_time  timestamptz NOT NULL,
    archived          boolean NOT NULL,
    in_trash          boolean NOT NULL,
    deleted_at        timestamptz,
    replaced_at       timestamptz NOT NULL DEFAULT now(),
    replaced_by_run   uuid
);
CREATE INDEX notion_page_versions_page ON notion_page_versions (database_id, page_id, replaced_at DESC);

CREATE TABLE sync_page_errors (
    id           bigserial PRIMARY KEY,
    run_id       uuid NOT NULL,
    database_id  uuid NOT NULL REFERENCES notion_databases (id) ON DELETE CASCADE,
    page_id      text,
    reason       text NOT NULL,
    page         jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sync_page_errors_database ON sync_page_errors (database_id, created_at DESC);
CREATE INDEX sync_page_errors_run ON sync_page_errors (run_id);

ALTER TABLE notion_databases
    ADD COLUMN mapping jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN view_hash text NOT NULL DEFAULT '';

CREATE SCHEMA IF NOT EXISTS notion;

-- Concatenated plain text of a rich-text array.
CREATE FUNCTION notion.plain_text(arr jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT string_agg(e->>'plain_text', '' ORDER BY n)
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(arr) = 'array' THEN arr ELSE '[]'::jsonb END)
         WITH ORDINALITY AS t(e, n)
$$;

-- One field of every element of an array (names of options, ids of users or pages).
CREATE FUNCTION notion.field_array(arr jsonb, field text) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT COALESCE(array_agg(e->>field ORDER BY n), '{}')
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(arr) = 'array' THEN arr ELSE '[]'::jsonb END)
         WITH ORDINALITY AS t(e, n)
$$;

-- A Notion date or date-time; a bare date is midnight UTC (never the session's time zone).
CREATE FUNCTION notion.ts(value text) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN value IS NULL OR value = '' THEN NULL
        WHEN length(value) = 10 THEN (value || 'T00:00:00+00:00')::timestamptz
        ELSE value::timestamptz
    END
$$;
"#,
    down: "DROP SCHEMA notion CASCADE; DROP TABLE sync_page_errors; DROP TABLE notion_page_versions; \
        ALTER TABLE notion_databases DROP COLUMN mapping, DROP COLUMN view_hash;",
}

sql_migration! {
    /// Exactness under interleaving: the full-run seen marker (deletions depend only on what a
    /// full run saw), durable coalesced rerun requests, fenced run bookkeeping with heartbeats,
    /// dead-letter confirmation, the `abandoned` status the reaper gives runs whose holder is gone,
    /// and the typed view's last DDL error.
    m20261124_000003_exactness,
    up: r#"
ALTER TABLE notion_pages ADD COLUMN seen_full_at timestamptz;
-- Pages whose last writer was a full run were seen by it.
UPDATE notion_pages p SET seen_full_at = r.started_at
FROM sync_runs r WHERE r.id = p.last_seen_run AND r.mode = 'full';

ALTER TABLE notion_databases
    ADD COLUMN rerun_mode text CHECK (rerun_mode IN ('full', 'incremental')),
    ADD COLUMN rerun_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN rerun_requested_at timestamptz,
    ADD COLUMN view_error text;

ALTER TABLE sync_runs
    ADD COLUMN fence bigint,
    ADD COLUMN heartbeat_at timestamptz,
    ADD COLUMN dead_lettered_at timestamptz,
    DROP CONSTRAINT sync_runs_status_check,
    ADD CONSTRAINT sync_runs_status_check CHECK (status IN
        ('queued', 'running', 'retrying', 'abandoned', 'succeeded', 'partial', 'failed', 'skipped'));
CREATE INDEX sync_runs_active ON sync_runs (status, heartbeat_at) WHERE status IN ('queued', 'running', 'retrying');
"#,
    down: "DROP INDEX sync_runs_active; \
        UPDATE sync_runs SET status = 'failed' WHERE status = 'abandoned'; \
        ALTER TABLE sync_runs DROP CONSTRAINT sync_runs_status_check, \
            ADD CONSTRAINT sync_runs_status_check CHECK (status IN \
            ('queued', 'running', 'retrying', 'succeeded', 'partial', 'failed', 'skipped')), \
            DROP COLUMN fence, DROP COLUMN heartbeat_at, DROP COLUMN dead_lettered_at; \
        ALTER TABLE notion_databases DROP COLUMN rerun_mode, DROP COLUMN rerun_seq, \
            DROP COLUMN rerun_requested_at, DROP COLUMN view_error; \
        ALTER TABLE notion_pages DROP COLUMN seen_full_at;",
}

sql_migration! {
    /// Deletion confirmations counted per run, and the durable claims that de-duplicate failure
    /// notifications (a Redis restart must not announce the same failure twice).
    m20261124_000004_confirmations,
    up: r#"
ALTER TABLE sync_runs
    ADD COLUMN IF NOT EXISTS deletion_checks bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS deletions_refuted bigint NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS notification_claims (
    subject     text NOT NULL,
    kind        text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, kind)
);
"#,
    down: "DROP TABLE notification_claims; \
        ALTER TABLE sync_runs DROP COLUMN deletion_checks, DROP COLUMN deletions_refuted;",
}

sql_migration! {
    /// The control plane: databases can be disabled (the scheduler leaves them alone), and every
    /// change to a run is announced with `NOTIFY syncfleet_runs` carrying the run's state and its
    /// change sequence, so the API streams progress to any number of clients from one `LISTEN`.
    m20261124_000005_control_plane,
    up: r#"
ALTER TABLE notion_databases ADD COLUMN IF NOT EXISTS enabled boolean NOT NULL DEFAULT true;
ALTER TABLE sync_runs ADD COLUMN IF NOT EXISTS change_seq bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS sync_runs_history ON sync_runs (enqueued_at DESC, id DESC);

CREATE OR REPLACE FUNCTION syncfleet_run_seq() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    NEW.change_seq := OLD.change_seq + 1;
    RETURN NEW;
END
$fn$;

-- NOTIFY refuses payloads of 8000 bytes or more, and a refused NOTIFY would abort the worker's
-- transaction: the text fields are cut (the error message at 1000 characters, the API reads the
-- whole run when asked), and a payload still too long is sent without them.
CREATE OR REPLACE FUNCTION syncfleet_run_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    payload jsonb;
BEGIN
    payload := jsonb_build_object(
        'id', NEW.id, 'seq', NEW.change_seq, 'database_id', NEW.database_id,
        'integration', left(NEW.integration, 200), 'mode', left(NEW.mode, 50), 'reason', left(NEW.reason, 50),
        'status', left(NEW.status, 50), 'attempt', NEW.attempt,
        'enqueued_at', NEW.enqueued_at, 'started_at', NEW.started_at, 'finished_at', NEW.finished_at,
        'requests', NEW.requests, 'rate_limited', NEW.rate_limited,
        'pages_seen', NEW.pages_seen, 'pages_created', NEW.pages_created,
        'pages_updated', NEW.pages_updated, 'pages_unchanged', NEW.pages_unchanged,
        'pages_deleted', NEW.pages_deleted, 'pages_invalid', NEW.pages_invalid,
        'error_kind', left(NEW.error_kind, 100), 'error_message', left(NEW.error_message, 1000)
    );
    IF octet_length(payload::text) > 7000 THEN
        payload := payload || '{"integration": "", "error_message": null}'::jsonb;
    END IF;
    -- A listener that stops reading (a stuck producer) makes the queue grow; once it is full,
    -- every NOTIFY, and so every transaction that changes a run, fails at commit. Progress
    -- notifications are a convenience and the mirror is not: past half full they are left out
    -- (watchers re-read their runs every few seconds; SyncfleetNotifyQueueFilling alerts).
    IF pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('syncfleet_runs', payload::text);
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS sync_runs_seq ON sync_runs;
CREATE TRIGGER sync_runs_seq BEFORE UPDATE ON sync_runs
    FOR EACH ROW EXECUTE FUNCTION syncfleet_run_seq();
DROP TRIGGER IF EXISTS sync_runs_notify ON sync_runs;
CREATE TRIGGER sync_runs_notify AFTER INSERT OR UPDATE ON sync_runs
    FOR EACH ROW EXECUTE FUNCTION syncfleet_run_notify();
"#,
    down: "DROP TRIGGER IF EXISTS sync_runs_notify ON sync_runs; \
        DROP TRIGGER IF EXISTS sync_runs_seq ON sync_runs; \
        DROP FUNCTION IF EXISTS syncfleet_run_notify(); DROP FUNCTION IF EXISTS syncfleet_run_seq(); \
        DROP INDEX IF EXISTS sync_runs_history; \
        ALTER TABLE sync_runs DROP COLUMN change_seq; ALTER TABLE notion_databases DROP COLUMN enabled;",
}

sql_migration! {
    /// One UNLOGGED row per running attempt (database, fence). PostgreSQL empties unlogged tables
    /// in crash recovery, which also drops commits made with `synchronous_commit = off`; a backend
    /// crash recovers without restarting the postmaster, so `pg_postmaster_start_time()` alone does
    /// not show it. A missing marker does.
    m20261124_000006_attempt_markers,
    up: r#"
CREATE UNLOGGED TABLE IF NOT EXISTS sync_attempt_markers (
    database_id uuid NOT NULL,
    fence       bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (database_id, fence)
);
"#,
    down: "DROP TABLE IF EXISTS sync_attempt_markers;",
}

sql_migration! {
    /// Notion webhooks: the subscription's verification token (encrypted like integration tokens;
    /// one subscription per deployment), and the event ids already handled, so a replayed delivery
    /// is ignored.
    m20261124_000007_notion_webhooks,
    up: r#"
-- `armed_until`: the window an operator opened (`webhook arm`) for the verification request;
-- outside it no token is accepted, so nobody else can become the first to send one.
CREATE TABLE IF NOT EXISTS notion_webhook_subscription (
    id              smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    token_encrypted bytea,
    armed_until     timestamptz,
    received_at     timestamptz
);
CREATE TABLE IF NOT EXISTS notion_webhook_events (
    event_id    text PRIMARY KEY,
    event_type  text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notion_webhook_events_received ON notion_webhook_events (received_at);
-- Databases with events not yet served by a job (the debounce): upserted by each event,
-- deleted in the transaction that serves them.
-- `mode` is `full` once an event needs one (a page deleted or moved out: only full runs find
-- those); `claimed_until` is set by the producer serving the row.
CREATE TABLE IF NOT EXISTS notion_webhook_pending (
    database_id   uuid PRIMARY KEY REFERENCES notion_databases (id) ON DELETE CASCADE,
    mode          text NOT NULL DEFAULT 'incremental',
    first_at      timestamptz NOT NULL DEFAULT now(),
    last_at       timestamptz NOT NULL DEFAULT now(),
    claimed_until timestamptz
);
"#,
    down: "DROP TABLE IF EXISTS notion_webhook_pending; DROP TABLE IF EXISTS notion_webhook_events; \
        DROP TABLE IF EXISTS notion_webhook_subscription;",
}

sql_migration! {
    /// Cron schedules: an expression, its time zone and jitter per database, and the last
    /// occurrence the scheduler enqueued (misfires are served by one catch-up run).
    m20261124_000008_cron_schedules,
    up: r#"
ALTER TABLE notion_databases ADD COLUMN IF NOT EXISTS schedule_cron text;
ALTER TABLE notion_databases ADD COLUMN IF NOT EXISTS schedule_tz text;
ALTER TABLE notion_databases ADD COLUMN IF NOT EXISTS schedule_jitter_secs integer NOT NULL DEFAULT 0
    CHECK (schedule_jitter_secs BETWEEN 0 AND 86400);
ALTER TABLE notion_databases ADD COLUMN IF NOT EXISTS schedule_fired_at timestamptz
    CHECK (schedule_fired_at IS NULL OR isfinite(schedule_fired_at));
"#,
    down: "ALTER TABLE notion_databases DROP COLUMN IF EXISTS schedule_cron, \
        DROP COLUMN IF EXISTS schedule_tz, DROP COLUMN IF EXISTS schedule_jitter_secs, \
        DROP COLUMN IF EXISTS schedule_fired_at;",
}

sql_migration! {
    /// Priorities: whether a coalesced rerun request came from a high-priority job (its run then
    /// goes to the high-priority queue too), and the priority a run was published with (so a
    /// run published again keeps it, and a webhook knows which queue a queued run waits in).
    m20261124_000009_rerun_priority,
    up: r#"
ALTER TABLE notion_databases ADD COLUMN IF NOT EXISTS rerun_high boolean NOT NULL DEFAULT false;
ALTER TABLE sync_runs ADD COLUMN IF NOT EXISTS priority text NOT NULL DEFAULT 'normal'
    CHECK (priority IN ('low', 'normal', 'high'));
"#,
    down: "ALTER TABLE notion_databases DROP COLUMN IF EXISTS rerun_high; \
        ALTER TABLE sync_runs DROP COLUMN IF EXISTS priority;",
}
