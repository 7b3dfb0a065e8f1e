//! Logs and traces, set up once per binary.
//!
//! Logs: structured `tracing` output on stderr, text or one JSON object per line
//! (`SYNCFLEET_LOG_FORMAT=json`), filtered by `RUST_LOG` or `SYNCFLEET_LOG_LEVEL`. JSON lines
//! carry the fields of every enclosing span (`spans`), so each line of a job has `job.id`,
//! `database` and `attempt`.
//!
//! Traces: OpenTelemetry over OTLP, configured only by the standard `OTEL_*` variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `..._PROTOCOL`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, ...). Without an endpoint, or with
//! `OTEL_SDK_DISABLED=true` / `OTEL_TRACES_EXPORTER=none`, nothing is exported. The W3C
//! `traceparent`/`tracestate` headers carry the context across RabbitMQ.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, Settings};

/// Flushes spans on shutdown. Keep it alive for the life of the process.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered. Call before the process exits.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("traces could not be flushed: {e}");
        }
    }

    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

/// Whether the `OTEL_*` environment asks for trace export.
pub fn otlp_requested() -> bool {
    let set = |k: &str| std::env::var(k).map(|v| !v.trim().is_empty()).unwrap_or(false);
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").map(|v| v.eq_ignore_ascii_case("true")).unwrap_or(false)
            || std::env::var("OTEL_TRACES_EXPORTER").map(|v| v.eq_ignore_ascii_case("none")).unwrap_or(false);
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter =
        opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// Installs the global subscriber (and the OTLP exporter when asked for). `service` is the
/// default `service.name`. A second call installs nothing.
pub fn init(settings: &Settings, service: &str) -> Telemetry {
    let level = if settings.log_level.is_empty() { "info" } else { settings.log_level.as_str() };
    // The SQL drivers log every statement at info; keep them to warnings unless asked.
    let default = format!(
        "{level},sqlx=warn,sea_orm=warn,sea_orm_migration=warn,lapin=warn,opentelemetry=warn,opentelemetry_sdk=warn"
    );
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (provider, otel_error) = if otlp_requested() {
        match tracer_provider(service) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_string())).boxed());
    let fmt_layer = match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_target(false).with_writer(std::io::stderr).boxed()
        }
    };
    let installed = tracing_subscriber::registry().with(filter).with(fmt_layer).with(otel_layer).try_init();
    if let Some(e) = otel_error {
        tracing::warn!(error = %e, "OTLP trace export is configured but could not start; traces are off.");
    }
    if installed.is_err() {
        return Telemetry::default();
    }
    if provider.is_some() {
        tracing::info!("Exporting traces over OTLP.");
    }
    Telemetry { provider }
}

/// The W3C trace-context headers of `span`, for an outgoing message (empty when not tracing).
pub fn inject(span: &tracing::Span) -> Vec<(String, String)> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.into_iter().collect()
}

/// Makes `span` continue the trace of an incoming message's headers. A message without a valid
/// `traceparent` (published by another service, say) leaves `span` the root of a new trace.
pub fn continue_trace(span: &tracing::Span, headers: &[(String, String)]) {
    let carrier: HashMap<String, String> = headers.iter().cloned().collect();
    let parent = TraceContextPropagator::new().extract(&carrier);
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}
