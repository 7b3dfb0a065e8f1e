//! One running sync per database: a lease in Redis (`SET NX PX` with a random token, renewed every
//! third of the lease, released by compare-and-delete).
//!
//! A Redis lock alone cannot stop a paused process from writing after its lease expired, so
//! every acquisition also takes a new fence from PostgreSQL (`db::fence`), and every write checks
//! it. The lease only keeps two holders from *starting*; the fence keeps a stale one from *writing*.

use std::time::{Duration, Instant};

use crate::redis_pool::RedisPool as Pool;
use redis::Script;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

// KEYS[1] lock; ARGV[1] token, ARGV[2] lease ms. 1 = taken, 0 = held by someone, 2 = the key
// held something without an expiry (every syncfleet lock has one: garbage, or another type) and
// was replaced — otherwise such a key would block the database forever.
const ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"#;

// KEYS[1] lock; ARGV[1] token, ARGV[2] lease ms. 1 if still ours and extended; 3 if the key
// was gone (a Redis restart, failover or eviction lost it) and is ours again; 0 if another
// holder has it. Re-taking a vanished key is safe: whoever acquires a lock takes a new fence, so
// if anyone else held it meanwhile our writes are rejected by the fence, never by luck.
const RENEW: &str = r#"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not held then
  if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 3
  end
end
return 0
"#;

// KEYS[1] lock; ARGV[1] token. 1 if it was ours and is gone.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

#[derive(Debug, Clone, thiserror::Error)]
#[error("the database lock in Redis is unavailable: {0}")]
pub struct LockError(pub String);

/// `<prefix>:lock:{<database>}`.
pub fn lock_key(prefix: &str, database: &uuid::Uuid) -> String {
    format!("{prefix}:lock:{{{database}}}")
}

/// `<prefix>:rerun:{<database>}`: set by jobs that found the lock held.
pub fn rerun_key(prefix: &str, database: &uuid::Uuid) -> String {
    format!("{prefix}:rerun:{{{database}}}")
}

/// A held lease. Dropping it stops renewal (the lease then expires); call [`release`](Self::release).
pub struct LeaseGuard {
    pool: Pool,
    key: String,
    token: String,
    lost: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
}

impl LeaseGuard {
    /// Cancelled when the lease is lost (taken over, or not renewable for a whole lease). A lost
    /// lease alone does not mean another holder exists: callers check the fence.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing and deletes the lock if it is still ours.
    pub async fn release(self) {
        self.renewer.abort();
        if let Ok(mut conn) = self.pool.get().await {
            let released: Result<i64, _> =
                Script::new(RELEASE).key(&self.key).arg(&self.token).invoke_async(&mut conn).await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "Could not release the database lock; it will expire.");
            }
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Takes the lock for `database` if it is free, on behalf of `owner` (a run id): the lock's
/// value names it, so a later attempt of the same run can tell its own dead holder's lock from
/// another run's.
pub async fn try_acquire(
    pool: &Pool,
    prefix: &str,
    database: &uuid::Uuid,
    owner: &str,
    lease: Duration,
) -> Result<Option<LeaseGuard>, LockError> {
    try_acquire_key(pool, lock_key(prefix, database), owner, lease).await
}

/// Who holds the lock for `database` (the `owner` given to [`try_acquire`]), if anyone.
pub async fn holder(pool: &Pool, prefix: &str, database: &uuid::Uuid) -> Result<Option<String>, LockError> {
    let mut conn = pool.get().await.map_err(|e| LockError(e.to_string()))?;
    let value: Option<String> = redis::cmd("GET")
        .arg(lock_key(prefix, database))
        .query_async(&mut conn)
        .await
        .map_err(|e| LockError(e.to_string()))?;
    Ok(value.and_then(|v| v.rsplit_once('/').map(|(owner, _)| owner.to_string())))
}

/// Takes the lease at `key` if it is free (also used for the producer's scheduler leadership).
/// The token is `<owner>/<random>`: unique per acquisition, and naming its owner.
pub async fn try_acquire_key(
    pool: &Pool,
    key: String,
    owner: &str,
    lease: Duration,
) -> Result<Option<LeaseGuard>, LockError> {
    let token = format!("{owner}/{}", uuid::Uuid::new_v4());
    let mut conn = pool.get().await.map_err(|e| LockError(e.to_string()))?;
    let outcome: i64 = Script::new(ACQUIRE)
        .key(&key)
        .arg(&token)
        .arg(lease.as_millis() as u64)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| LockError(e.to_string()))?;
    match outcome {
        0 => return Ok(None),
        2 => tracing::warn!(
            key = %key,
            "The lock key held something syncfleet never writes (no expiry, or another type); it was replaced."
        ),
        _ => {}
    }
    let lost = CancellationToken::new();
    // The renewer logs under the job that holds the lock.
    let renewer = tokio::spawn(
        renew(pool.clone(), key.clone(), token.clone(), lease, lost.clone())
            .instrument(tracing::Span::current()),
    );
    Ok(Some(LeaseGuard { pool: pool.clone(), key, token, lost, renewer }))
}

/// Renews every third of the lease; declares the lease lost when it is no longer ours, or when
/// no renewal succeeded for a whole lease (Redis unreachable: someone else may hold it by now).
async fn renew(pool: Pool, key: String, token: String, lease: Duration, lost: CancellationToken) {
    let script = Script::new(RENEW);
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(lease / 3).await;
        // Bounded, so a Redis that hangs (paused, partitioned) counts as a failed renewal.
        let attempt = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            script
                .key(&key)
                .arg(&token)
                .arg(lease.as_millis() as u64)
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        let outcome = tokio::time::timeout(lease / 3, attempt)
            .await
            .unwrap_or_else(|_| Err("no answer from Redis".to_string()));
        match outcome {
            Ok(1) => last_ok = Instant::now(),
            Ok(3) => {
                tracing::warn!(key = %key, "The lock key had vanished from Redis (restart, failover or eviction); it was taken again.");
                last_ok = Instant::now();
            }
            Ok(_) => {
                tracing::warn!(key = %key, "The database lock was taken over; stopping the job.");
                lost.cancel();
                return;
            }
            Err(e) if last_ok.elapsed() >= lease => {
                tracing::warn!(key = %key, error = %e, "Could not renew the database lock for a whole lease; stopping the job.");
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(key = %key, error = %e, "Renewing the database lock failed; retrying."),
        }
    }
}
