//! `notion-sim`: serves a generated Notion workspace over HTTP until SIGTERM/SIGINT.

use clap::Parser;
use syncfleet_tests::sim::{SimConfig, SimServer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "notion-sim", about = "A faithful stand-in for the Notion API (see docs/notion-api.md)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8787", env = "SIM_ADDR")]
    addr: std::net::SocketAddr,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 1000)]
    pages: u64,
    #[arg(long, default_value_t = 1)]
    databases: u64,
    /// Requests per second per token; 0 turns the limit off.
    #[arg(long, default_value_t = 3.0)]
    rate: f64,
    #[arg(long, default_value_t = 3)]
    burst: u32,
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// An accepted bearer token (repeatable). Defaults to `secret_sim_token`.
    #[arg(long = "token", env = "SIM_TOKENS", value_delimiter = ',', hide_env_values = true)]
    tokens: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tokens = if a.tokens.is_empty() { SimConfig::default().tokens } else { a.tokens };
    let config = SimConfig {
        seed: a.seed,
        databases: a.databases,
        pages: a.pages,
        rate: a.rate,
        burst: a.burst,
        latency_ms: a.latency_ms,
        jitter_ms: a.jitter_ms,
        tokens,
    };
    let server = SimServer::start(config, a.addr).await?;
    eprintln!("notion-sim listening on {}", server.base_url());
    let stop = server.shutdown_token();
    tokio::spawn(async move {
        syncfleet_shared::shutdown::signal().await;
        stop.cancel();
    });
    server.wait().await;
    Ok(())
}
