//! `syncfleet-producer`: the operator CLI.

use std::process::ExitCode;

use clap::Parser;
use syncfleet_producer::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    match cli::run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncfleet-producer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
