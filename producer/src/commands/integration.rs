//! `syncfleet-producer integration add`.

use std::io::BufRead;

use anyhow::{Context, bail};
use sea_orm::sea_query::OnConflict;
use sea_orm::{EntityTrait, Set};
use secrecy::{ExposeSecret, SecretString};
use syncfleet_shared::Settings;
use syncfleet_shared::db::entities::integration;

/// `integration add`: reads the token (NOTION_TOKEN or stdin) and saves the integration.
pub async fn add(
    settings: &Settings,
    slug: &str,
    workspace: Option<String>,
    rate: Option<f64>,
    burst: Option<u32>,
    token_stdin: bool,
) -> anyhow::Result<()> {
    let token = read_token(token_stdin)?;
    save(settings, slug, workspace, rate, burst, &token).await
}

/// Registers an integration, or replaces its token and budget. The token is stored encrypted.
pub async fn save(
    settings: &Settings,
    slug: &str,
    workspace: Option<String>,
    rate: Option<f64>,
    burst: Option<u32>,
    token: &SecretString,
) -> anyhow::Result<()> {
    if slug.is_empty()
        || slug.len() > 64
        || !slug.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("--slug must be 1-64 characters of [A-Za-z0-9_-]");
    }
    let rate = rate.unwrap_or(settings.sync.default_rate);
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    let burst = burst.unwrap_or(settings.sync.default_burst).max(1);
    let cipher = settings.token_cipher()?;
    let encrypted = cipher.encrypt(token)?;
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let now = chrono::Utc::now();
    let model = integration::ActiveModel {
        slug: Set(slug.to_string()),
        workspace: Set(workspace),
        token_encrypted: Set(encrypted),
        rate_per_second: Set(rate),
        burst: Set(burst as i32),
        created_at: Set(now),
        updated_at: Set(now),
    };
    integration::Entity::insert(model)
        .on_conflict(
            OnConflict::column(integration::Column::Slug)
                .update_columns([
                    integration::Column::Workspace,
                    integration::Column::TokenEncrypted,
                    integration::Column::RatePerSecond,
                    integration::Column::Burst,
                    integration::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec(&db)
        .await
        .context("saving the integration")?;
    println!("integration {slug} saved (rate {rate}/s, burst {burst}; token encrypted at rest)");
    Ok(())
}

fn read_token(from_stdin: bool) -> anyhow::Result<SecretString> {
    let token = if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the token from standard input")?;
        SecretString::from(line.trim().to_string())
    } else {
        match std::env::var("NOTION_TOKEN") {
            Ok(t) => SecretString::from(t.trim().to_string()),
            Err(_) => bail!("no token: set NOTION_TOKEN or pass --token-stdin"),
        }
    };
    if token.expose_secret().is_empty() {
        bail!("the Notion token is empty");
    }
    Ok(token)
}
