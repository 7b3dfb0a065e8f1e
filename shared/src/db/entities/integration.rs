//! `integrations`: a Notion integration, its encrypted token and its rate budget.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "integrations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub slug: String,
    pub workspace: Option<String>,
    /// `nonce || AES-256-GCM ciphertext` of the Notion token; see `crypto`.
    pub token_encrypted: Vec<u8>,
    pub rate_per_second: f64,
    pub burst: i32,
    pub created_at: ChronoDateTimeUtc,
    pub updated_at: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
