//! The fleet-wide rate budget: one GCRA per integration in Redis, computed in a Lua script that
//! reads Redis `TIME`, so every worker replica shares one clock and one schedule.
//!
//! `acquire` reserves the next slot and returns how long to sleep before using it (callers sleep,
//! never spin). A reservation never reaches more than the horizon into the future: beyond it the
//! script reserves nothing and says when to ask again. A 429/529 moves the schedule to at least
//! `now + Retry-After`, pausing the whole fleet at once. A key holding garbage or the wrong type
//! is reset by the script and reported, so a corrupted budget heals instead of failing forever.

use std::time::Duration;

use crate::redis_pool::RedisPool as Pool;
use redis::Script;

/// Which budget a request draws from, and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetKey {
    pub integration: String,
    /// Requests per second.
    pub rate: f64,
    /// Requests that may go back to back after a quiet period.
    pub burst: u32,
}

impl BudgetKey {
    /// Time between two requests at the configured rate.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate.max(0.001))
    }
    /// How far ahead of schedule a burst may run.
    pub fn tolerance(&self) -> Duration {
        self.interval() * self.burst.saturating_sub(1)
    }
}

/// The budget every Notion request waits on (fleet-wide, in Redis).
pub type Budget = RedisBudget;

/// An integration's budget as [`RedisBudget::snapshot`] reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSnapshot {
    /// How far reserved slots run ahead of now (0 when the budget is idle).
    pub backlog_ms: f64,
    /// Time left of a Retry-After pause (0 when none).
    pub paused_ms: i64,
    pub circuit_open: bool,
    /// The effective share of the configured rate after unexplained 429s (1 = full rate).
    pub factor: f64,
}

/// How far ahead one reservation may reach.
pub const DEFAULT_HORIZON: Duration = Duration::from_secs(10);

/// Taken off the burst tolerance. Notion (and notion-sim) start their own schedule at the first
/// request's *arrival*; if a later request travels faster than that one did, it arrives "early"
/// by the difference. 50 ms of margin absorbs loopback and LAN jitter and costs nothing at the
/// steady rate (only the very first burst is 50 ms slower).
pub const SAFETY_MARGIN: Duration = Duration::from_millis(50);

// The effective-rate factor after unexplained 429s (slow start): stored as "factor:since_us" in
// KEYS[2]; it recovers additively with time, `RECOVERY` of the configured rate per second.
const FACTOR: &str = r#"
local function factor(key, now)
  local ok, raw = pcall(redis.call, 'GET', key)
  if not ok or not raw then return 1.0 end
  local f, since = string.match(raw, '^([%d%.]+):(%d+)$')
  f = tonumber(f)
  since = tonumber(since)
  if not f or not since then return 1.0 end
  return math.min(1.0, f + (now - since) / 1000000 * tonumber(ARGV[#ARGV]))
end
"#;

// KEYS[1] gcra key, KEYS[2] factor key, KEYS[3] circuit key; ARGV[1] interval µs, ARGV[2]
// tolerance µs, ARGV[3] horizon µs, ARGV[4] recovery per second. Returns {wait_us, reserved,
// repaired, effective-rate factor ×1000, circuit}: circuit 0 = closed and clean, 1 = outcomes
// must be reported (failures counted, or half-open), 2 = open (wait_us = time left, nothing
// reserved).
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cok, c = pcall(redis.call, 'HMGET', KEYS[3], 'failures', 'open_until')
if not cok then
  redis.call('DEL', KEYS[3])
  c = {false, false}
end
local failures = tonumber(c[1]) or 0
local open_until = tonumber(c[2]) or 0
if open_until > now then
  return {open_until - now, 0, 0, 1000, 2}
end
local circuit = 0
if failures > 0 or open_until > 0 then circuit = 1 end
local interval = math.floor(tonumber(ARGV[1]) / factor(KEYS[2], now))
local tolerance = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local repaired = 0
local ok, raw = pcall(redis.call, 'GET', KEYS[1])
if not ok then
  redis.call('DEL', KEYS[1])
  raw = false
  repaired = 1
end
local tat = tonumber(raw)
if raw and not tat then repaired = 1 end
if not tat or tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
local permille = math.floor(tonumber(ARGV[1]) / interval * 1000)
if wait > horizon then
  return {wait - horizon, 0, repaired, permille, circuit}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 60000)
return {wait, 1, repaired, permille, circuit}
"#;

// KEYS[1] circuit key; ARGV[1] 1 = success, 0 = failure, ARGV[2] failure threshold, ARGV[3]
// open µs, ARGV[4] successes that close a half-open circuit. Returns {state, changed}: state
// 0 closed, 1 half-open, 2 open; changed 1 when this outcome moved it.
const RECORD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ok, c = pcall(redis.call, 'HMGET', KEYS[1], 'failures', 'open_until', 'successes')
if not ok then
  redis.call('DEL', KEYS[1])
  c = {false, false, false}
end
local failures = tonumber(c[1]) or 0
local open_until = tonumber(c[2]) or 0
local successes = tonumber(c[3]) or 0
local half_open = open_until > 0 and open_until <= now
local function open()
  redis.call('HSET', KEYS[1], 'failures', failures + 1, 'open_until', now + tonumber(ARGV[3]), 'successes', 0)
  redis.call('PEXPIRE', KEYS[1], 3600000)
end
if ARGV[1] == '1' then
  if half_open then
    successes = successes + 1
    if successes >= tonumber(ARGV[4]) then
      redis.call('DEL', KEYS[1])
      return {0, 1}
    end
    redis.call('HSET', KEYS[1], 'successes', successes)
    return {1, 0}
  end
  if open_until > now then return {2, 0} end
  redis.call('DEL', KEYS[1])
  return {0, 0}
end
if half_open then
  open()
  return {2, 1}
end
if open_until > now then return {2, 0} end
if failures + 1 >= tonumber(ARGV[2]) then
  open()
  return {2, 1}
end
redis.call('HSET', KEYS[1], 'failures', failures + 1)
redis.call('PEXPIRE', KEYS[1], 3600000)
return {0, 0}
"#;

// KEYS[1] gcra key, KEYS[2] pause key, KEYS[3] factor key; ARGV[1] pause µs, ARGV[2] tolerance
// µs, ARGV[3] recovery per second. Moves the schedule so that the next admission is no earlier
// than now + pause, marks the pause itself so that slots reserved before it was known are not
// used during it, and halves the effective rate (not below a tenth). Returns the new factor ×1000.
const PAUSE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lowered = math.max(0.1, factor(KEYS[3], now) * 0.5)
redis.call('SET', KEYS[3], string.format('%.4f:%d', lowered, now), 'PX', 600000)
local pause_us = tonumber(ARGV[1])
local target = now + pause_us + tonumber(ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', math.max(1, math.floor(pause_us / 1000)))
local ok, raw = pcall(redis.call, 'GET', KEYS[1])
if not ok then redis.call('DEL', KEYS[1]) raw = false end
local tat = tonumber(raw) or 0
if tat < target then
  redis.call('SET', KEYS[1], string.format('%d', target), 'PX', math.floor((target - now) / 1000) + 60000)
end
return math.floor(lowered * 1000)
"#;

/// Share of the configured rate regained per second after a slow-start decrease (full recovery
/// from half the rate takes 25 s).
pub const RECOVERY_PER_SEC: f64 = 0.02;

/// The effective-rate factor that `"factor:since_us"` stands for at `now` (µs): the stored value
/// plus its recovery since then, as the acquire script computes it, so the status page shows the
/// rate the fleet actually uses. Anything unreadable is 1 (no slowdown), as in the script.
pub fn effective_factor(raw: &str, now_us: i64) -> f64 {
    // The script's pattern: `^([%d%.]+):(%d+)$` (no sign, no exponent).
    let digits =
        |t: &str, dot: bool| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || (dot && b == b'.'));
    let parsed = raw
        .split_once(':')
        .filter(|(f, since)| digits(f, true) && digits(since, false))
        .and_then(|(f, since)| Some((f.parse::<f64>().ok()?, since.parse::<i64>().ok()?)));
    match parsed {
        Some((f, since)) if f.is_finite() => {
            let recovered = now_us.saturating_sub(since).max(0) as f64 / 1_000_000.0 * RECOVERY_PER_SEC;
            (f + recovered).min(1.0)
        }
        _ => 1.0,
    }
}

/// Why the budget could not be consulted (Redis down, or a script error).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the rate budget in Redis is unavailable: {0}")]
pub struct BudgetError(pub String);

/// One slot request's answer, with the share of the configured rate in force (slow start)
/// and whether the request's outcome must be reported to the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    pub grant: Grant,
    pub factor: f64,
    pub report_outcome: bool,
}

/// What `acquire` hands back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Send now. `report_outcome`: call [`RedisBudget::record_outcome`] after the request.
    Granted { factor: f64, report_outcome: bool },
    /// The integration's circuit is open for this long: fail fast.
    CircuitOpen(Duration),
}

/// The circuit after an outcome was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

/// Whether a slot was reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Reserved: sleep this long, then send.
    Reserved(Duration),
    /// Beyond the horizon: nothing reserved; ask again after this long.
    RetryAfter(Duration),
    /// The circuit is open for this long; nothing reserved.
    CircuitOpen(Duration),
}

/// The shared budget. Cheap to clone.
#[derive(Clone)]
pub struct RedisBudget {
    pool: Pool,
    prefix: String,
    horizon: Duration,
    acquire: std::sync::Arc<Script>,
    pause: std::sync::Arc<Script>,
    record: std::sync::Arc<Script>,
    circuit: crate::config::CircuitSettings,
}

impl std::fmt::Debug for RedisBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBudget").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl RedisBudget {
    pub fn new(pool: Pool, prefix: &str) -> Self {
        Self {
            pool,
            prefix: prefix.to_string(),
            horizon: DEFAULT_HORIZON,
            acquire: std::sync::Arc::new(Script::new(&format!("{FACTOR}{ACQUIRE}"))),
            pause: std::sync::Arc::new(Script::new(&format!("{FACTOR}{PAUSE}"))),
            record: std::sync::Arc::new(Script::new(RECORD)),
            circuit: crate::config::CircuitSettings::default(),
        }
    }

    /// Uses `circuit` instead of the default breaker settings.
    pub fn with_circuit(mut self, circuit: crate::config::CircuitSettings) -> Self {
        self.circuit = circuit;
        self
    }

    /// `<prefix>:{<integration>}:circuit` — the fleet-wide circuit breaker (a hash).
    pub fn circuit_key(&self, integration: &str) -> String {
        format!("{}:{{{}}}:circuit", self.prefix, integration)
    }

    /// Records a request's outcome with the fleet-wide breaker. Only needed when the admission
    /// asked for it or the request failed, so a healthy integration costs no extra round trip.
    pub async fn record_outcome(
        &self,
        key: &BudgetKey,
        success: bool,
    ) -> Result<(CircuitState, bool), BudgetError> {
        let mut conn = self.pool.get().await.map_err(|e| BudgetError(e.to_string()))?;
        let (state, changed): (i64, i64) = self
            .record
            .key(self.circuit_key(&key.integration))
            .arg(if success { 1 } else { 0 })
            .arg(self.circuit.failure_threshold.max(1))
            .arg(self.circuit.open_secs.max(1).saturating_mul(1_000_000))
            .arg(self.circuit.close_after_successes.max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| BudgetError(e.to_string()))?;
        let state = match state {
            2 => CircuitState::Open,
            1 => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        };
        Ok((state, changed == 1))
    }

    /// `<prefix>:{<integration>}:gcra` — the hash tag keeps it on one Redis Cluster slot.
    pub fn key(&self, integration: &str) -> String {
        format!("{}:{{{}}}:gcra", self.prefix, integration)
    }

    /// `<prefix>:{<integration>}:rate` — the effective-rate factor after unexplained 429s.
    pub fn factor_key(&self, integration: &str) -> String {
        format!("{}:{{{}}}:rate", self.prefix, integration)
    }

    /// `<prefix>:{<integration>}:pause` — set for the length of a Retry-After.
    pub fn pause_key(&self, integration: &str) -> String {
        format!("{}:{{{}}}:pause", self.prefix, integration)
    }

    /// How the integration's budget stands right now, read without changing it (the status
    /// page): how far the reservations run ahead of now, the effective-rate factor, and whether a
    /// Retry-After pause or the circuit breaker holds the fleet back. Values that are not numbers
    /// read as absent.
    pub async fn snapshot(&self, integration: &str) -> Result<BudgetSnapshot, BudgetError> {
        let err = |e: redis::RedisError| BudgetError(e.to_string());
        let mut conn = self.pool.get().await.map_err(|e| BudgetError(e.to_string()))?;
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.map_err(err)?;
        let now = secs.saturating_mul(1_000_000).saturating_add(micros);
        let tat: Option<String> =
            redis::cmd("GET").arg(self.key(integration)).query_async(&mut conn).await.unwrap_or(None);
        let pause_ms: i64 =
            redis::cmd("PTTL").arg(self.pause_key(integration)).query_async(&mut conn).await.unwrap_or(-2);
        let open_until: Option<String> = redis::cmd("HGET")
            .arg(self.circuit_key(integration))
            .arg("open_until")
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        let factor: Option<String> =
            redis::cmd("GET").arg(self.factor_key(integration)).query_async(&mut conn).await.unwrap_or(None);
        let backlog_us = tat.and_then(|t| t.parse::<i64>().ok()).map_or(0, |t| (t - now).max(0));
        Ok(BudgetSnapshot {
            backlog_ms: backlog_us as f64 / 1000.0,
            paused_ms: pause_ms.max(0),
            circuit_open: open_until.and_then(|t| t.parse::<i64>().ok()).is_some_and(|t| t > now),
            factor: factor.map_or(1.0, |raw| effective_factor(&raw, now)),
        })
    }

    /// One round trip: reserves a slot or says when to ask again.
    pub async fn try_acquire(&self, key: &BudgetKey) -> Result<Answer, BudgetError> {
        let mut conn = self.pool.get().await.map_err(|e| BudgetError(e.to_string()))?;
        let name = self.key(&key.integration);
        let (wait, reserved, repaired, permille, circuit): (i64, i64, i64, i64, i64) = self
            .acquire
            .key(&name)
            .key(self.factor_key(&key.integration))
            .key(self.circuit_key(&key.integration))
            .arg(key.interval().as_micros() as i64)
            .arg(key.tolerance().saturating_sub(SAFETY_MARGIN).as_micros() as i64)
            .arg(self.horizon.as_micros() as i64)
            .arg(RECOVERY_PER_SEC)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| BudgetError(e.to_string()))?;
        if repaired == 1 {
            tracing::warn!(key = %name, "The rate budget key held an invalid value or type; it was reset.");
        }
        let wait = Duration::from_micros(wait.max(0) as u64);
        let grant = match (reserved, circuit) {
            (_, 2) => Grant::CircuitOpen(wait),
            (1, _) => Grant::Reserved(wait),
            _ => Grant::RetryAfter(wait),
        };
        Ok(Answer { grant, factor: permille as f64 / 1000.0, report_outcome: circuit == 1 })
    }

    /// Waits for this caller's turn: reserves a slot, sleeps until it, and checks that no
    /// fleet-wide pause began meanwhile (then it waits the pause out and reserves again).
    /// Two Redis round trips per request. Fails fast while the integration's circuit is open.
    pub async fn acquire(&self, key: &BudgetKey) -> Result<Admission, BudgetError> {
        loop {
            let answer = self.try_acquire(key).await?;
            match answer.grant {
                Grant::CircuitOpen(left) => return Ok(Admission::CircuitOpen(left)),
                Grant::RetryAfter(wait) => {
                    tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
                    continue;
                }
                Grant::Reserved(wait) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            let remaining = self.paused_for(key).await?;
            if remaining.is_zero() {
                return Ok(Admission::Granted {
                    factor: answer.factor,
                    report_outcome: answer.report_outcome,
                });
            }
            tokio::time::sleep(remaining).await;
        }
    }

    /// How much of a fleet-wide pause is left.
    pub async fn paused_for(&self, key: &BudgetKey) -> Result<Duration, BudgetError> {
        let mut conn = self.pool.get().await.map_err(|e| BudgetError(e.to_string()))?;
        let ttl: i64 = redis::cmd("PTTL")
            .arg(self.pause_key(&key.integration))
            .query_async(&mut conn)
            .await
            .map_err(|e| BudgetError(e.to_string()))?;
        Ok(Duration::from_millis(ttl.max(0) as u64))
    }

    /// Pauses the integration fleet-wide for `retry_after` and halves its effective rate (it
    /// recovers by [`RECOVERY_PER_SEC`]): our own budget admitted the request, so the 429 means
    /// someone else (another app, the workspace limit) spends the same Notion budget.
    /// Returns the lowered effective-rate factor.
    pub async fn pause(&self, key: &BudgetKey, retry_after: Duration) -> Result<f64, BudgetError> {
        let mut conn = self.pool.get().await.map_err(|e| BudgetError(e.to_string()))?;
        let permille: i64 = self
            .pause
            .key(self.key(&key.integration))
            .key(self.pause_key(&key.integration))
            .key(self.factor_key(&key.integration))
            .arg(retry_after.as_micros() as i64)
            .arg(key.tolerance().saturating_sub(SAFETY_MARGIN).as_micros() as i64)
            .arg(RECOVERY_PER_SEC)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| BudgetError(e.to_string()))?;
        tracing::warn!(
            integration = %key.integration,
            effective_rate = key.rate * permille as f64 / 1000.0,
            "Unexplained 429: pausing the fleet and lowering the integration's effective rate."
        );
        Ok(permille as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shown_factor_recovers_as_the_acquire_script_does() {
        let now = 100_000_000;
        assert_eq!(effective_factor(&format!("0.5:{now}"), now), 0.5);
        // 10 s later: 0.5 + 10 × 0.02.
        assert!((effective_factor(&format!("0.5:{now}"), now + 10_000_000) - 0.7).abs() < 1e-9);
        assert_eq!(effective_factor(&format!("0.5:{now}"), now + 60_000_000), 1.0);
        // A stamp in the future (clock skew) does not lower it further.
        assert_eq!(effective_factor(&format!("0.25:{}", now + 5_000_000), now), 0.25);
        for junk in ["", "x", "0.5", "-0.5:1", "1e-1:5", "inf:5", "0.5:-3", "0.5:abc", ":5", "NaN:1"] {
            assert_eq!(effective_factor(junk, now), 1.0, "{junk:?}");
        }
    }
}
