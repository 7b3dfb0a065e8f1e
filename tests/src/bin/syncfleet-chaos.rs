//! `syncfleet-chaos [--seconds N]`: one chaos run (see `syncfleet_tests::chaos`); prints one
//! JSON line and exits 1 when anything was lost, wrong, duplicated or left hanging.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Time beyond the fault phase for starting the servers, the calm phase and the counting.
const OVERHEAD_SECS: u64 = 420;

#[derive(Parser)]
#[command(
    name = "syncfleet-chaos",
    about = "Puts a 3-worker fleet through faults and checks nothing is lost"
)]
struct Args {
    /// How long faults keep coming.
    #[arg(long, default_value_t = 40)]
    seconds: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    let seconds = args.seconds.max(20);
    // Every wait inside is bounded; this bounds the whole run as well, so a hang anywhere is a
    // failure that names itself instead of a stuck CI job. Dropping the run stops its servers.
    let limit = Duration::from_secs(seconds + OVERHEAD_SECS);
    match tokio::time::timeout(limit, syncfleet_tests::chaos::run(seconds)).await {
        Err(_) => {
            eprintln!("syncfleet-chaos: the run did not finish within {limit:?} (its last step is above)");
            ExitCode::from(3)
        }
        Ok(Ok(report)) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Ok(Err(e)) => {
            eprintln!("syncfleet-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}
