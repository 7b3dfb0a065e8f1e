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
//! At most `worker.max_high_jobs_per_integration` (default 1) of the running jobs may be
//! high-priority ones (`…:running-high`), so one integration's manual, API or webhook jobs
//! cannot take every worker's high-priority slots; a high job over that parks at once.
//!
//! High-priority jobs go first here too: a high job over the cap is recorded as waiting
//! (`…:waiting`, for three park delays), and no normal job of the integration starts while one
//! waits, so the next slot that frees is a high job's. One of them at a time (`…:waiter`) keeps
//! its slot and asks again every 200 ms, for up to one park delay; the others park at once, so
//! one integration's high jobs cannot fill every worker's high-priority slots.
//!
//! Fairness is not correctness: when Redis cannot answer, the job runs (and the database lock,
//! which needs Redis, decides what happens next).

use std::time::Duration;

use redis::Script;
use syncfleet_shared::redis_pool::RedisPool;
use tracing::Instrument;

// KEYS[1] running, KEYS[2] waiting (high jobs over the cap), KEYS[3] the one high job that
// waits in place, KEYS[4] running high jobs. ARGV[1] job id, ARGV[2] lease ms, ARGV[3] cap,
// ARGV[4] "1" for a high job, ARGV[5] how long a waiting mark lasts, ms, ARGV[6] how long the
// waiter's claim lasts, ms, ARGV[7] the cap on high jobs.
// 1 = admitted (or already running: a redelivery of a job whose worker died), 0 = over a cap
// (park), 2 = over the cap, and this high job is the one that waits in place.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[4]}) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
end
local lease = tonumber(ARGV[2])
local keep = math.max(lease, tonumber(ARGV[5])) * 2
local high = ARGV[4] == '1'
local function admit()
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], keep)
  if high then
    redis.call('ZADD', KEYS[4], now + lease, ARGV[1])
    redis.call('PEXPIRE', KEYS[4], keep)
  end
  redis.call('ZREM', KEYS[2], ARGV[1])
  if redis.call('GET', KEYS[3]) == ARGV[1] then
    redis.call('DEL', KEYS[3])
  end
  return 1
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return admit()
end
local running = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[3])
if high then
  -- As many high jobs of the integration run as it may have: park, without holding a slot
  -- or the normal jobs back (the integration's next high job gets in when this one returns).
  if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[7]) then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
  end
  if running < cap then
    return admit()
  end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
  redis.call('PEXPIRE', KEYS[2], keep)
  local waiter = redis.call('GET', KEYS[3])
  if (not waiter) or waiter == ARGV[1] then
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[6])
    return 2
  end
  return 0
end
-- A normal job waits for the high jobs marked waiting, unless none of them could run now.
if running < cap and (redis.call('ZCARD', KEYS[2]) == 0 or redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[7])) then
  return admit()
end
return 0
"#;

// KEYS: the sets the job is in. ARGV[1] job id, ARGV[2] lease ms.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', key, tonumber(ARGV[2]) * 2)
end
return 1
"#;

// KEYS: the sets the job is in. ARGV[1] job id.
const RELEASE: &str = r#"
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
end
return 1
"#;

/// `<prefix>:share:{<integration>}:running`.
fn running_key(prefix: &str, integration: &str) -> String {
    format!("{prefix}:share:{{{integration}}}:running")
}

fn waiting_key(prefix: &str, integration: &str) -> String {
    format!("{prefix}:share:{{{integration}}}:waiting")
}

fn waiter_key(prefix: &str, integration: &str) -> String {
    format!("{prefix}:share:{{{integration}}}:waiter")
}

fn running_high_key(prefix: &str, integration: &str) -> String {
    format!("{prefix}:share:{{{integration}}}:running-high")
}

/// How long the high job waiting in place holds that role without asking again (it asks every
/// 200 ms).
const WAITER_CLAIM_MS: u64 = 1_000;

// KEYS[1] waiting, KEYS[2] waiter. ARGV[1] job id.
const FORGET: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 1
"#;

/// What one integration's cap allows.
pub struct Request<'a> {
    pub prefix: &'a str,
    pub integration: &'a str,
    pub job_id: &'a str,
    pub high: bool,
    /// 0: no cap (and no cap on high jobs either).
    pub cap: u16,
    /// Most high-priority jobs of the integration at once (within `cap`).
    pub high_cap: u16,
    pub lease: Duration,
    pub park_delay: Duration,
}

pub enum Admission {
    /// Run it; drop or release the share when done.
    Admitted(Option<Share>),
    /// Over the cap: park it, unless `wait` (the integration's one high job that waits in place).
    OverCap { wait: bool },
}

/// A job's place among its integration's running jobs, renewed until released or dropped.
pub struct Share {
    pool: RedisPool,
    /// The running set, and the running-high one for a high job.
    keys: Vec<String>,
    member: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl Share {
    /// Frees the place at once (otherwise it expires with its lease).
    pub async fn release(self) {
        self.renewer.abort();
        let removed = async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            let script = Script::new(RELEASE);
            let mut invocation = script.prepare_invoke();
            for key in &self.keys {
                invocation.key(key);
            }
            invocation.arg(&self.member).invoke_async::<i64>(&mut conn).await.map_err(|e| e.to_string())
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
            .key(waiter_key(req.prefix, req.integration))
            .key(running_high_key(req.prefix, req.integration))
            .arg(req.job_id)
            .arg(lease_ms)
            .arg(req.cap)
            .arg(if req.high { "1" } else { "0" })
            .arg(wait_ms)
            .arg(WAITER_CLAIM_MS)
            .arg(req.high_cap.max(1))
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), outcome).await {
        Ok(Ok(1)) => {
            let mut keys = vec![running];
            if req.high {
                keys.push(running_high_key(req.prefix, req.integration));
            }
            let renewer = tokio::spawn(
                renew(pool.clone(), keys.clone(), req.job_id.to_string(), req.lease)
                    .instrument(tracing::Span::current()),
            );
            Admission::Admitted(Some(Share {
                pool: pool.clone(),
                keys,
                member: req.job_id.to_string(),
                renewer,
            }))
        }
        Ok(Ok(2)) => Admission::OverCap { wait: true },
        Ok(Ok(_)) => Admission::OverCap { wait: false },
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

/// Drops a high job's waiting mark once it no longer waits (it was coalesced into a running
/// sync of its database, failed, or finished), so the integration's normal jobs need not wait
/// for the mark to expire. Best effort: the mark expires by itself after three park delays.
pub async fn forget_waiting(pool: &RedisPool, prefix: &str, integration: &str, job_id: &str) {
    let removed = async {
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        Script::new(FORGET)
            .key(waiting_key(prefix, integration))
            .key(waiter_key(prefix, integration))
            .arg(job_id)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), removed).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "Could not drop a high job's waiting mark; it expires."),
        Err(_) => tracing::debug!("Dropping a high job's waiting mark timed out; it expires."),
    }
}

async fn renew(pool: RedisPool, keys: Vec<String>, member: String, lease: Duration) {
    let script = Script::new(RENEW);
    loop {
        tokio::time::sleep(lease / 3).await;
        let renewed = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            invocation
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
