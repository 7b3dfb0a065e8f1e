//! Per-token rate limiting (GCRA, like Notion's "average 3 requests per second, some bursts"),
//! and the request statistics the tests and benchmarks read from `/_sim/stats`.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

/// A GCRA per token.
#[derive(Debug, Clone)]
pub struct Gcra {
    tat: Option<Instant>,
}

impl Gcra {
    pub fn new() -> Self {
        Self { tat: None }
    }

    /// Admits a request at `now`, or says how long until one would be admitted. With
    /// `rejected_spend`, a refused request still spends a slot (a client that retries before
    /// Retry-After only pushes its next admission further out).
    pub fn check(
        &mut self,
        now: Instant,
        rate: f64,
        burst: u32,
        rejected_spend: bool,
    ) -> Result<(), Duration> {
        if rate <= 0.0 {
            return Ok(());
        }
        let interval = Duration::from_secs_f64(1.0 / rate);
        let tolerance = interval * burst.saturating_sub(1);
        let tat = self.tat.unwrap_or(now).max(now);
        let allowed_at = tat.checked_sub(tolerance).unwrap_or(now);
        if allowed_at > now {
            if rejected_spend {
                // The refused request spent a slot: the wait is counted from after it.
                let tat = tat + interval;
                self.tat = Some(tat);
                return Err(tat.checked_sub(tolerance).unwrap_or(now).saturating_duration_since(now));
            }
            return Err(allowed_at - now);
        }
        self.tat = Some(tat + interval);
        Ok(())
    }
}

/// Counts per token, with the densest one-second windows seen.
#[derive(Debug, Default, Serialize)]
pub struct TokenStats {
    pub requests: u64,
    pub admitted: u64,
    pub rate_limited: u64,
    /// Most requests (any status) that arrived within any 1 s.
    pub max_requests_in_any_1s: usize,
    /// Most admitted (non-429) requests within any 1 s.
    pub max_admitted_in_any_1s: usize,
    #[serde(skip)]
    window_all: VecDeque<Instant>,
    #[serde(skip)]
    window_admitted: VecDeque<Instant>,
}

impl TokenStats {
    fn record(&mut self, at: Instant, admitted: bool) {
        self.requests += 1;
        push_window(&mut self.window_all, at, &mut self.max_requests_in_any_1s);
        if admitted {
            self.admitted += 1;
            push_window(&mut self.window_admitted, at, &mut self.max_admitted_in_any_1s);
        } else {
            self.rate_limited += 1;
        }
    }
}

fn push_window(window: &mut VecDeque<Instant>, at: Instant, max: &mut usize) {
    window.push_back(at);
    while let Some(front) = window.front() {
        if at.duration_since(*front) >= Duration::from_secs(1) {
            window.pop_front();
        } else {
            break;
        }
    }
    *max = (*max).max(window.len());
}

/// One request, for `/_sim/requests` (bounded log).
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// Milliseconds since the simulator started (monotonic clock).
    pub t_ms: f64,
    /// Index of the token in the simulator's token list, when it was a known one.
    pub token: Option<usize>,
    pub endpoint: &'static str,
    pub status: u16,
}

const LOG_CAP: usize = 500_000;

#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub requests_total: u64,
    pub rate_limited_total: u64,
    /// endpoint template → HTTP status → count
    pub by_endpoint: BTreeMap<&'static str, BTreeMap<u16, u64>>,
    /// `t0`, `t1`… in the order tokens were configured (token values are never shown).
    pub per_token: BTreeMap<String, TokenStats>,
    #[serde(skip)]
    pub log: VecDeque<LogEntry>,
}

impl Stats {
    pub fn record(
        &mut self,
        started: Instant,
        at: Instant,
        token: Option<usize>,
        endpoint: &'static str,
        status: u16,
    ) {
        self.requests_total += 1;
        if status == 429 {
            self.rate_limited_total += 1;
        }
        *self.by_endpoint.entry(endpoint).or_default().entry(status).or_default() += 1;
        if let Some(t) = token {
            self.per_token.entry(format!("t{t}")).or_default().record(at, status != 429);
        }
        if self.log.len() >= LOG_CAP {
            self.log.pop_front();
        }
        let t_ms = at.duration_since(started).as_secs_f64() * 1000.0;
        self.log.push_back(LogEntry { t_ms, token, endpoint, status });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_admits_burst_then_rate() {
        let mut g = Gcra::new();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(g.check(t0, 3.0, 3, false).is_ok());
        }
        let wait = g.check(t0, 3.0, 3, false).expect_err("fourth is limited");
        assert!(wait > Duration::from_millis(300) && wait <= Duration::from_millis(334), "{wait:?}");
        assert!(g.check(t0 + wait, 3.0, 3, false).is_ok());
    }
}
