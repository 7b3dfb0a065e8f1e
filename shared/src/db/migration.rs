//! Schema migrations (sea-orm-migration). `syncfleet-producer migrate` applies them; re-running
//! changes nothing because applied versions are recorded in `seaql_migrations`.
//!
//! The DDL is plain PostgreSQL so that column types (`jsonb`, `timestamptz`, `bytea`) and
//! constraints are exactly what operators will query.

use sea_orm_migration::prelude::*;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261122_000001_init::Migration), Box::new(m20261122_000002_sync_semantics::Migration)]
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

/// Page history, invalid pages, per-database property mappings, and the `notion` schema that
/// holds one typed view per database with the helper functions the views use.
mod m20261122_000002_sync_semantics {
    use sea_orm_migration::prelude::*;

    pub struct Migration;

    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m20261122_000002_sync_semantics"
        }
    }

    const UP: &str = r#"
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
"#;

    const DOWN: &str = "DROP SCHEMA notion CASCADE; DROP TABLE sync_page_errors; DROP TABLE notion_page_versions; \
        ALTER TABLE notion_databases DROP COLUMN mapping, DROP COLUMN view_hash;";

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager.get_connection().execute_unprepared(UP).await.map(|_| ())
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager.get_connection().execute_unprepared(DOWN).await.map(|_| ())
        }
    }
}
