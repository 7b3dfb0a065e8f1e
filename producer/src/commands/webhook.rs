//! `syncfleet-producer webhook status|reset`: the Notion webhook subscription's stored
//! verification token (see `api::webhook`).

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use syncfleet_shared::Settings;

#[derive(clap::Subcommand, Debug)]
pub enum WebhookCommand {
    /// Accept the next verification request (`{"verification_token": …}`) for this long: do
    /// this, then create the subscription in Notion.
    Arm {
        #[arg(long, default_value_t = 900)]
        for_secs: u32,
    },
    /// Whether a verification token is stored (masked, or in full with `--reveal` to paste it
    /// into Notion's verification form), and the events handled lately.
    Status {
        #[arg(long)]
        reveal: bool,
    },
    /// Forget the stored verification token, so that the next subscription's verification
    /// request is accepted (deliveries signed with the old token are refused from then on).
    Reset,
}

pub async fn run(settings: &Settings, command: WebhookCommand) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    match command {
        WebhookCommand::Arm { for_secs } => {
            if !(10..=86_400).contains(&for_secs) {
                anyhow::bail!("for-secs: must be between 10 and 86400");
            }
            let armed = db
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "INSERT INTO notion_webhook_subscription (id, armed_until) VALUES (1, now() + make_interval(secs => $1)) \
                     ON CONFLICT (id) DO UPDATE SET armed_until = EXCLUDED.armed_until \
                     WHERE notion_webhook_subscription.token_encrypted IS NULL",
                    [f64::from(for_secs).into()],
                ))
                .await?;
            if armed.rows_affected() == 0 {
                anyhow::bail!(
                    "a verification token is already stored: `webhook reset` first to accept a new subscription"
                );
            }
            println!(
                "armed for {for_secs} s: create the subscription in Notion (endpoint …/v1/notion/webhook); its verification request will be accepted"
            );
            Ok(())
        }
        WebhookCommand::Status { reveal } => {
            use secrecy::ExposeSecret;
            match crate::api::webhook::read_token(&db, settings)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?
            {
                None => println!(
                    "no verification token stored: `webhook arm`, then create the subscription in Notion"
                ),
                Some(token) if reveal => println!("verification token {}", token.expose_secret()),
                Some(token) => {
                    println!(
                        "verification token {} stored",
                        syncfleet_shared::webhook::mask(token.expose_secret())
                    )
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
