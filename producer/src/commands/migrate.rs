//! `syncfleet-producer migrate`.

use syncfleet_shared::Settings;

pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let applied = syncfleet_shared::db::migrate(&settings.database).await?;
    if applied.is_empty() {
        println!("schema is up to date ({})", settings.database.display_url());
    } else {
        for name in &applied {
            println!("applied {name}");
        }
    }
    Ok(())
}
