//! The command line of `syncfleet-producer`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use syncfleet_shared::Settings;
use uuid::Uuid;

use crate::commands;
use crate::commands::database::MapArgs;
use crate::commands::enqueue::EnqueueArgs;

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
        /// Where to serve the HTTP API and the status page (also SYNCFLEET_API__ADDR); needs
        /// at least one token in SYNCFLEET_API__TOKENS or api.token_file.
        #[arg(long)]
        api_addr: Option<std::net::SocketAddr>,
    },
    /// Print the OpenAPI document of the HTTP API.
    Openapi,
    /// Every database's schedule and its next run times.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// The Notion webhook subscription (`POST /v1/notion/webhook`).
    #[command(subcommand)]
    Webhook(crate::commands::webhook::WebhookCommand),
    /// Run history and live progress (the API's `/v1/runs`, `/v1/jobs/{id}` and events).
    #[command(subcommand)]
    Runs(crate::commands::runs::RunsCommand),
    /// Active runs, queue depth, budgets, the last 24 h per database and recent failures (the
    /// API's `/v1/overview`, which the status page shows).
    Overview {
        #[arg(long)]
        json: bool,
    },
    /// Runs, success rate, durations and pages over the last hours (the API's `/v1/stats`).
    Stats {
        #[arg(long, default_value_t = 24)]
        hours: u32,
        #[arg(long)]
        json: bool,
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
pub enum SchedulesCommand {
    /// Each database's schedule and its next three run times.
    List {
        #[arg(long)]
        json: bool,
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
        /// Print the registered database as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the mirrored databases (the API's `GET /v1/databases`).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one database (the API's `GET /v1/databases/{id}`).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a database's schedule, mapping or whether it is scheduled (the API's
    /// `PATCH /v1/databases/{id}`).
    Update(crate::commands::runs::UpdateArgs),
    /// Schedule a database by cron expression (with a time zone and jitter) or interval, or
    /// turn its schedule off.
    Schedule(crate::commands::schedules::ScheduleArgs),
    /// Set how one property appears in the database's typed view, and how its values are
    /// validated. The next sync regenerates the view. Without options it prints the mapping.
    Map(MapArgs),
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
        Command::Database(DatabaseCommand::Add { integration, id, data_source, interval_secs, json }) => {
            commands::database::add(&settings, &integration, id, data_source, interval_secs, json).await
        }
        Command::Database(DatabaseCommand::List { json }) => {
            commands::runs::list_databases(&settings, json).await
        }
        Command::Database(DatabaseCommand::Show { id, json }) => {
            commands::runs::show_database(&settings, &id, json).await
        }
        Command::Database(DatabaseCommand::Update(args)) => {
            commands::runs::update_database(&settings, &args).await
        }
        Command::Database(DatabaseCommand::Map(args)) => commands::database::map(&settings, &args).await,
        Command::Database(DatabaseCommand::Schedule(args)) => {
            commands::schedules::set(&settings, &args).await
        }
        Command::Schedules(SchedulesCommand::List { json }) => {
            commands::schedules::list(&settings, json).await
        }
        Command::Enqueue(args) => commands::enqueue::run(&settings, &args).await,
        Command::Serve { metrics_addr, api_addr } => {
            if metrics_addr.is_some() {
                settings.metrics_addr = metrics_addr;
            }
            if api_addr.is_some() {
                settings.api.addr = api_addr;
            }
            commands::serve::run(&settings, syncfleet_shared::shutdown::signal()).await
        }
        Command::Status { json } => commands::status::run(&settings, json).await,
        Command::Openapi => {
            println!("{}", crate::api::openapi().to_pretty_json()?);
            Ok(())
        }
        Command::Runs(command) => commands::runs::run(&settings, command).await,
        Command::Stats { hours, json } => commands::runs::stats(&settings, hours, json).await,
        Command::Overview { json } => commands::runs::overview(&settings, json).await,
        Command::Webhook(command) => commands::webhook::run(&settings, command).await,
    }
}
