//! The Redis connection pool (coordination only: rate budgets, locks, leader leases).

use std::time::Duration;

use deadpool_redis::{Config, Pool, Runtime};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;
use crate::secret::redact_url;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("cannot connect to Redis at {url}: {message}")]
    Connect { url: String, message: String },
}

/// Creates a pool and checks that the server answers `PING`.
pub async fn connect(settings: &RedisSettings) -> Result<Pool, RedisError> {
    let url = settings.url.expose_secret();
    let fail = |message: String| RedisError::Connect { url: redact_url(url), message };
    let pool = Config::from_url(url).create_pool(Some(Runtime::Tokio1)).map_err(|e| fail(e.to_string()))?;
    let ping = async {
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), ping).await {
        Ok(Ok(_)) => Ok(pool),
        Ok(Err(message)) => Err(fail(message)),
        Err(_) => Err(fail("no answer within 5s".into())),
    }
}
