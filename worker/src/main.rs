//! `syncfleet-worker`: settings → telemetry → build → run until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use syncfleet_shared::{Settings, shutdown, telemetry};
use syncfleet_worker::Worker;

/// mimalloc: markedly faster than the system allocator for the worker's JSON-heavy batches.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "syncfleet-worker",
    version,
    about = "Consumes syncfleet jobs and mirrors Notion into PostgreSQL"
)]
struct Args {
    /// Jobs run at once (also the AMQP prefetch); overrides SYNCFLEET_WORKER__CONCURRENCY.
    #[arg(long)]
    concurrency: Option<u16>,
    /// Where to serve /metrics, /healthz and /readyz (also SYNCFLEET_METRICS_ADDR).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// A TOML settings file (also SYNCFLEET_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    // Before any thread starts. With transparent huge pages, every 2 MiB region mimalloc touches
    // became resident and was zeroed whole: on `unthrottled` the worker used about a fifth more
    // CPU per page with them, and freeing memory at once to keep RSS down cost still more
    // (BENCHMARKS.md, 2026-11-24 evening).
    let thp = nix::sys::prctl::set_thp_disable(true);
    run(thp)
}

#[tokio::main]
async fn run(thp: nix::Result<()>) -> ExitCode {
    let args = Args::parse();
    let mut settings = match Settings::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("syncfleet-worker: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(c) = args.concurrency {
        settings.worker.concurrency = c;
        if let Err(e) = settings.validate() {
            eprintln!("syncfleet-worker: {e}");
            return ExitCode::from(2);
        }
    }
    if args.metrics_addr.is_some() {
        settings.metrics_addr = args.metrics_addr;
    }
    let telemetry = telemetry::init(&settings, "syncfleet-worker");
    if let Err(e) = thp {
        tracing::warn!(error = %e, "Could not turn transparent huge pages off for this process; memory use will be higher.");
    }
    let result = match Worker::build(settings).await {
        Ok(worker) => worker.run_until(shutdown::signal()).await,
        Err(e) => Err(e),
    };
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "syncfleet-worker stopped with an error.");
            eprintln!("syncfleet-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
