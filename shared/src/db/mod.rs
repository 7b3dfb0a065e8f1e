//! PostgreSQL: the durable truth. Connection, migrations, entities and the write paths.

pub mod entities;
pub mod fence;
pub mod migration;
pub mod pages;
pub mod rerun;
pub mod runs;
pub mod views;

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement};
use sea_orm_migration::MigratorTrait;
use secrecy::ExposeSecret;

use crate::config::DatabaseSettings;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to PostgreSQL at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("PostgreSQL error: {0}")]
    Query(#[from] DbErr),
    #[error("{0}")]
    Invalid(String),
}

/// Opens a pool. The error names the server with the password masked.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, DbError> {
    let mut options = ConnectOptions::new(settings.url.expose_secret().to_string());
    options
        .max_connections(settings.max_connections.max(1))
        .min_connections(0)
        .connect_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
        .acquire_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
        .sqlx_logging(false)
        // Bounded waits on every connection: a worker paused (SIGSTOP, a frozen VM) inside a
        // transaction has its session ended instead of holding row locks forever, and nothing
        // queues behind such locks without limit — the statement fails, and the failure policy
        // retries it.
        .map_sqlx_postgres_opts(|o| {
            o.options([("idle_in_transaction_session_timeout", "60s"), ("lock_timeout", "30s")])
        });
    probe_tcp(settings).await?;
    let db = Database::connect(options).await.map_err(|e| connect_error(settings, &e))?;
    // `connect` is lazy for some drivers; make an unreachable server fail here, clearly.
    db.execute_unprepared("SELECT 1").await.map_err(|e| connect_error(settings, &e))?;
    Ok(db)
}

/// A plain TCP connect first, so that "connection refused" is reported as such rather than as
/// a pool timeout.
async fn probe_tcp(settings: &DatabaseSettings) -> Result<(), DbError> {
    let Ok(url) = url::Url::parse(settings.url.expose_secret()) else {
        return Err(DbError::Invalid("database.url is not a URL".into()));
    };
    let Some(host) = url.host_str() else { return Ok(()) };
    let port = url.port().unwrap_or(5432);
    let timeout = Duration::from_secs(settings.connect_timeout_secs.max(1));
    let fail = |message: String| DbError::Connect { url: settings.display_url(), message };
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(format!("no answer within {timeout:?}"))),
    }
}

fn connect_error(settings: &DatabaseSettings, error: &DbErr) -> DbError {
    // Drivers should not echo the URL, but never let one through.
    let message = crate::secret::scrub(&error.to_string(), settings.url.expose_secret());
    DbError::Connect { url: settings.display_url(), message }
}

/// Creates the configured database when it is missing (connecting to `postgres` to do so),
/// then applies every pending migration. Running it twice changes nothing.
pub async fn migrate(settings: &DatabaseSettings) -> Result<Vec<String>, DbError> {
    ensure_database(settings).await?;
    let db = connect(settings).await?;
    let pending: Vec<String> = migration::Migrator::get_pending_migrations(&db)
        .await?
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    migration::Migrator::up(&db, None).await?;
    db.close().await.ok();
    Ok(pending)
}

async fn ensure_database(settings: &DatabaseSettings) -> Result<(), DbError> {
    let Ok(mut url) = url::Url::parse(settings.url.expose_secret()) else {
        return Err(DbError::Invalid("database.url is not a URL".into()));
    };
    let name = url.path().trim_start_matches('/').to_string();
    if name.is_empty() || name == "postgres" {
        return Ok(());
    }
    url.set_path("/postgres");
    let admin = DatabaseSettings {
        url: secrecy::SecretString::from(url.to_string()),
        max_connections: 1,
        connect_timeout_secs: settings.connect_timeout_secs,
    };
    let Ok(conn) = connect(&admin).await else {
        // No access to the maintenance database: let the real connect report the problem.
        return Ok(());
    };
    let exists = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT 1 FROM pg_database WHERE datname = $1",
            [name.clone().into()],
        ))
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        if let Err(e) = conn.execute_unprepared(&format!("CREATE DATABASE {quoted}")).await {
            // Another process may have created it at the same moment.
            tracing::debug!(error = %e, "CREATE DATABASE failed; assuming it exists");
        }
    }
    conn.close().await.ok();
    Ok(())
}
