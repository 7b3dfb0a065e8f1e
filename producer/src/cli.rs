//! The command line of `syncfleet-producer`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use syncfleet_shared::Settings;
use uuid::Uuid;

use crate::commands;

#[derive(Parser, Debug)]
#[command(
    name = "syncfleet-producer",
    version,
    about = "Operate syncfleet: schema, integrations, databases and sync jobs"
)]
pub struct Cli {
    /// A TOML settings file (also SYNCFLEET_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the database if needed and apply pending migrations (idempotent).
    Migrate,
    /// Print a new random encryption key (base64) for SYNCFLEET_ENCRYPTION_KEY.
    Keygen,
    /// Print the JSON Schema of the v1 job message.
    Schema,
    /// Manage Notion integrations.
    #[command(subcommand)]
    Integration(IntegrationCommand),
    /// Manage mirrored Notion databases.
    #[command(subcommand)]
    Database(DatabaseCommand),
    /// Publish a sync job for a database.
    Enqueue(EnqueueArgs),
    /// Run the scheduler (incremental syncs on each database's interval, a full reconciliation
    /// nightly) and serve /metrics, /healthz and /readyz. Runs until SIGTERM/SIGINT.
    Serve {
        /// Where to serve /metrics, /healthz and /readyz (also SYNCFLEET_METRICS_ADDR).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Show databases and their latest runs.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum IntegrationCommand {
    /// Register an integration (or replace its token and budget). The token is read from
    /// NOTION_TOKEN or, with --token-stdin, from standard input; never from an argument.
    Add {
        #[arg(long)]
        slug: String,
        #[arg(long)]
        workspace: Option<String>,
        /// Requests per second this integration may make (default: sync.default_rate).
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long)]
        burst: Option<u32>,
        /// Read the token from the first line of standard input.
        #[arg(long)]
        token_stdin: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DatabaseCommand {
    /// Register a Notion database: reads it and its data source from Notion and stores the schema.
    Add {
        #[arg(long)]
        integration: String,
        /// The Notion database id.
        #[arg(long)]
        id: Uuid,
        /// Which data source to mirror when the database has several (default: the first).
        #[arg(long)]
        data_source: Option<Uuid>,
        /// Schedule an incremental sync every this many seconds.
        #[arg(long)]
        interval_secs: Option<u32>,
    },
    /// Set how one property appears in the database's typed view, and how its values are
    /// validated. The next sync regenerates the view. Without options it prints the mapping.
    Map(MapArgs),
}

#[derive(clap::Args, Debug)]
pub struct MapArgs {
    #[arg(long)]
    pub database: Uuid,
    /// The property's Notion id or current name.
    #[arg(long)]
    pub property: Option<String>,
    /// The view column's name.
    #[arg(long)]
    pub column: Option<String>,
    /// Leave the property out of the view.
    #[arg(long)]
    pub skip: bool,
    /// enum_text (select/status), integer (number) or date_only (date).
    #[arg(long, value_parser = ["enum_text", "integer", "date_only"])]
    pub transform: Option<String>,
    /// Pages with an empty value go to sync_page_errors instead of the table.
    #[arg(long)]
    pub required: bool,
    /// Remove the property's rule.
    #[arg(long)]
    pub clear: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    Full,
    Incremental,
}

#[derive(clap::Args, Debug)]
pub struct EnqueueArgs {
    #[arg(long)]
    pub database: Uuid,
    #[arg(long, value_enum, default_value = "incremental")]
    pub mode: ModeArg,
    /// Show a progress bar until the run ends; exit non-zero if it fails.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 6 * 3600)]
    pub timeout_secs: u64,
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    let telemetry = syncfleet_shared::telemetry::init(&settings, "syncfleet-producer");
    let result = dispatch(cli.command, settings).await;
    // Export the spans of this command (a publish, say) before the process ends.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

async fn dispatch(command: Command, mut settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Migrate => commands::migrate::run(&settings).await,
        Command::Keygen => {
            use secrecy::ExposeSecret;
            println!("{}", syncfleet_shared::crypto::TokenCipher::generate_key().expose_secret());
            Ok(())
        }
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&syncfleet_shared::job::json_schema())?);
            Ok(())
        }
        Command::Integration(IntegrationCommand::Add { slug, workspace, rate, burst, token_stdin }) => {
            commands::integration::add(&settings, &slug, workspace, rate, burst, token_stdin).await
        }
        Command::Database(DatabaseCommand::Add { integration, id, data_source, interval_secs }) => {
            commands::database::add(&settings, &integration, id, data_source, interval_secs).await
        }
        Command::Database(DatabaseCommand::Map(args)) => commands::database::map(&settings, &args).await,
        Command::Enqueue(args) => commands::enqueue::run(&settings, &args).await,
        Command::Serve { metrics_addr } => {
            if metrics_addr.is_some() {
                settings.metrics_addr = metrics_addr;
            }
            commands::serve::run(&settings, syncfleet_shared::shutdown::signal()).await
        }
        Command::Status { json } => commands::status::run(&settings, json).await,
    }
}
