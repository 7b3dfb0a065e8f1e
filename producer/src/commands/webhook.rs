//! `syncfleet-producer webhook status|reset`: the Notion webhook subscription's stored
//! verification token (see `api::webhook`).

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use syncfleet_shared::Settings;

#[derive(clap::Subcommand, Debug)]
pub enum WebhookCommand {
    /// Whether a verification token is stored (shown masked), and the events handled lately.
    Status,
    /// Forget the stored verification token, so that the next subscription's verification
    /// request is accepted (deliveries signed with the old token are refused from then on).
    Reset,
}

pub async fn run(settings: &Settings, command: WebhookCommand) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    match command {
        WebhookCommand::Status => {
            let row = db
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT token_encrypted, received_at::text AS at FROM notion_webhook_subscription WHERE id = 1",
                ))
                .await?;
            match row {
                None => println!("no verification token stored: create the subscription in Notion"),
                Some(row) => {
                    use secrecy::ExposeSecret;
                    let stored: Vec<u8> = row.try_get("", "token_encrypted")?;
                    let token = settings.token_cipher()?.decrypt(&stored)?;
                    let at: String = row.try_get("", "at")?;
                    println!(
                        "verification token {} stored at {at}",
                        syncfleet_shared::webhook::mask(token.expose_secret())
                    );
                }
            }
            let rows = db
                .query_all_raw(Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT event_type, count(*) AS n FROM notion_webhook_events \
                     WHERE received_at > now() - interval '24 hours' GROUP BY event_type ORDER BY event_type",
                ))
                .await?;
            println!("events handled in the last 24 h: {}", if rows.is_empty() { "none" } else { "" });
            for row in rows {
                let kind: String = row.try_get("", "event_type")?;
                let n: i64 = row.try_get("", "n")?;
                println!("  {kind}: {n}");
            }
            Ok(())
        }
        WebhookCommand::Reset => {
            db.execute_raw(Statement::from_string(
                DbBackend::Postgres,
                "DELETE FROM notion_webhook_subscription WHERE id = 1",
            ))
            .await?;
            println!(
                "verification token forgotten: producers refuse deliveries signed with it within a minute; create the subscription in Notion again"
            );
            Ok(())
        }
    }
}
