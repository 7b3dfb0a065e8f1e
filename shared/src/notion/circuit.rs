//! A circuit breaker per integration, per process: after [`FAILURE_THRESHOLD`] transient
//! failures in a row (timeouts, connection errors, 5xx; more than one job retries in place) the
//! integration's requests fail fast for
//! [`OPEN_FOR`] instead of each job burning its in-place retries against a Notion that is down.
//! Then one request at a time probes (half-open); a success closes the circuit, a failure opens
//! it again. Rate limits (429) are not failures here: the budget handles them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

pub const FAILURE_THRESHOLD: u32 = 10;
pub const OPEN_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// The breakers of every integration this process talks to.
#[derive(Debug, Clone)]
pub struct Breakers {
    states: Arc<Mutex<HashMap<String, State>>>,
    metrics: Arc<Metrics>,
}

impl Breakers {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { states: Arc::default(), metrics }
    }

    /// `Err(remaining)` while the circuit is open; otherwise the request may go (in half-open
    /// state only one request probes at a time).
    pub fn check(&self, integration: &str) -> Result<(), Duration> {
        let Ok(mut states) = self.states.lock() else { return Ok(()) };
        let Some(state) = states.get_mut(integration) else { return Ok(()) };
        match state.open_until {
            Some(until) if Instant::now() < until => Err(until - Instant::now()),
            Some(_) if state.probing => Err(Duration::from_millis(500)),
            Some(_) => {
                state.probing = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    pub fn record_success(&self, integration: &str) {
        let Ok(mut states) = self.states.lock() else { return };
        if let Some(state) = states.get_mut(integration) {
            if state.open_until.is_some() {
                tracing::info!(integration, "Notion answers again; closing the circuit.");
                self.metrics.circuit_open.with_label_values(&[integration]).set(0);
            }
            *state = State::default();
        }
    }

    pub fn record_failure(&self, integration: &str) {
        let Ok(mut states) = self.states.lock() else { return };
        let state = states.entry(integration.to_string()).or_default();
        state.consecutive_failures += 1;
        let reopen = state.probing || state.consecutive_failures >= FAILURE_THRESHOLD;
        if reopen {
            if state.open_until.is_none() || state.probing {
                tracing::warn!(
                    integration,
                    failures = state.consecutive_failures,
                    open_secs = OPEN_FOR.as_secs(),
                    "Notion keeps failing for this integration; opening the circuit."
                );
            }
            state.open_until = Some(Instant::now() + OPEN_FOR);
            state.probing = false;
            self.metrics.circuit_open.with_label_values(&[integration]).set(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Role;

    #[test]
    fn opens_after_the_threshold_and_closes_after_a_successful_probe() {
        let breakers = Breakers::new(Metrics::new(Role::Worker));
        for _ in 0..FAILURE_THRESHOLD - 1 {
            breakers.record_failure("acme");
            assert!(breakers.check("acme").is_ok());
        }
        breakers.record_failure("acme");
        assert!(breakers.check("acme").is_err());
        assert!(breakers.check("other").is_ok(), "integrations are independent");
        // Pretend the open period is over: the first caller probes, the second waits.
        if let Ok(mut s) = breakers.states.lock()
            && let Some(st) = s.get_mut("acme")
        {
            st.open_until = Some(Instant::now());
        }
        assert!(breakers.check("acme").is_ok());
        assert!(breakers.check("acme").is_err());
        breakers.record_success("acme");
        assert!(breakers.check("acme").is_ok());
    }
}
