//! Per-integration fair share: at most `worker.max_jobs_per_integration` jobs of one integration
//! run at once across the fleet, so a thousand queued jobs of one integration cannot fill every
//! slot while another integration's single job waits behind them. Running more jobs of one
//! integration than that would not make them faster anyway: they all share its ~3 requests/s.
//!
//! The running jobs are a sorted set in Redis (`<prefix>:share:{<integration>}:running`, job id
//! scored by its lease's expiry on Redis's clock), renewed every third of the lease, removed on
//! release; a crashed or paused worker's entries expire with their lease. A job over the cap is
//! parked (`<prefix>.park.<ms>ms`) and comes back after the park delay.
//!
//! High-priority jobs go first here too: a high job over the cap is recorded as waiting
//! (`…:waiting`, for three park delays) and asks again every 200 ms for up to one park delay
//! before it is parked; no normal job of the integration starts while one waits, so the next
//! slot that frees is the high job's.
//!
//! Fairness is not correctness: when Redis cannot answer, the job runs (and the database lock,
//! which needs Redis, decides what happens next).

use std::time::Duration;

use redis::Script;
use syncfleet_shared::redis_pool::RedisPool;
use tracing::Instrument;

// KEYS[1] running, KEYS[2] waiting (high jobs over the cap). ARGV[1] job id, ARGV[2] lease ms,
// ARGV[3] cap, ARGV[4] "1" for a high job, ARGV[5] how long a waiting mark lasts, ms.
// 1 = admitted (or already running: a redelivery of a job whose worker died), 0 = over the cap.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local lease = tonumber(ARGV[2])
local keep = math.max(lease, tonumber(ARGV[5])) * 2
local function admit()
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], keep)
  return 1
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return admit()
end
local running = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[3])
if ARGV[4] == '1' then
  if running < cap then
    return admit()
  end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
  redis.call('PEXPIRE', KEYS[2], keep)
  return 0
end
if running < cap and redis.call('ZCARD', KEYS[2]) == 0 then
  return admit()
end
return 0
"#;

// KEYS[1] running. ARGV[1] job id, ARGV[2] lease ms.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"#;

/// `<prefix>:share:{<integration>}:running`.
pub fn running_key(prefix: &str, integration: &str) -> String {
    format!("{prefix}:share:{{{integration}}}:running")
}

fn waiting_key(prefix: &str, integration: &str) -> String {
    format!("{prefix}:share:{{{integration}}}:waiting")
}

/// What one integration's cap allows.
pub struct Request<'a> {
    pub prefix: &'a str,
    pub integration: &'a str,
    pub job_id: &'a str,
    pub high: bool,
    /// 0: no cap.
    pub cap: u16,
    pub lease: Duration,
    pub park_delay: Duration,
}

pub enum Admission {
    /// Run it; drop or release the share when done.
    Admitted(Option<Share>),
    /// Over the cap: park it.
    OverCap,
}

/// A job's place among its integration's running jobs, renewed until released or dropped.
pub struct Share {
    pool: RedisPool,
    key: String,
    member: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl Share {
    /// Frees the place at once (otherwise it expires with its lease).
    pub async fn release(self) {
        self.renewer.abort();
        let removed = async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            redis::cmd("ZREM")
                .arg(&self.key)
                .arg(&self.member)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(e) = removed.await {
            tracing::warn!(error = %e, "Could not release the integration's share; it expires with its lease.");
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Admits the job if its integration is under the cap.
pub async fn admit(pool: &RedisPool, req: Request<'_>) -> Admission {
    if req.cap == 0 {
        return Admission::Admitted(None);
    }
    let running = running_key(req.prefix, req.integration);
    let lease_ms = req.lease.as_millis().max(1) as u64;
    let wait_ms = (req.park_delay.as_millis() as u64).saturating_mul(3).max(1);
    let outcome = async {
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        Script::new(ADMIT)
            .key(&running)
            .key(waiting_key(req.prefix, req.integration))
            .arg(req.job_id)
            .arg(lease_ms)
            .arg(req.cap)
            .arg(if req.high { "1" } else { "0" })
            .arg(wait_ms)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), outcome).await {
        Ok(Ok(1)) => {
            let renewer = tokio::spawn(
                renew(pool.clone(), running.clone(), req.job_id.to_string(), req.lease)
                    .instrument(tracing::Span::current()),
            );
            Admission::Admitted(Some(Share {
                pool: pool.clone(),
                key: running,
                member: req.job_id.to_string(),
                renewer,
            }))
        }
        Ok(Ok(_)) => Admission::OverCap,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Could not check the integration's share of the fleet; running the job.");
            Admission::Admitted(None)
        }
        Err(_) => {
            tracing::warn!("Redis did not answer the integration's share check within 5 s; running the job.");
            Admission::Admitted(None)
        }
    }
}

async fn renew(pool: RedisPool, key: String, member: String, lease: Duration) {
    let script = Script::new(RENEW);
    loop {
        tokio::time::sleep(lease / 3).await;
        let renewed = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            script
                .key(&key)
                .arg(&member)
                .arg(lease.as_millis() as u64)
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(lease / 3, renewed).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "Renewing the integration's share failed; retrying."),
            Err(_) => tracing::debug!("Renewing the integration's share timed out; retrying."),
        }
    }
}
