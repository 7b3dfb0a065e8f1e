//! Logging setup shared by every binary: structured `tracing` output, text or one JSON object
//! per line (`SYNCFLEET_LOG_FORMAT=json`), filtered by `RUST_LOG` or `SYNCFLEET_LOG_LEVEL`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, Settings};

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored).
pub fn init(settings: &Settings) {
    let level = if settings.log_level.is_empty() { "info" } else { settings.log_level.as_str() };
    // The SQL drivers log every statement at info; keep them to warnings unless asked.
    let default = format!("{level},sqlx=warn,sea_orm=warn,sea_orm_migration=warn,lapin=warn");
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_target(false).with_writer(std::io::stderr))
            .try_init(),
    };
    let _ = result;
}
