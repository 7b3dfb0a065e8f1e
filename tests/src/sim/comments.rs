//! Comments on pages, for `GET /v1/comments?block_id=<page>`: every fifth page (from the
//! third) starts with one to three, and `mutate` with `comment_add` adds more. Generated ones
//! are a pure function of the seed and the page; an added one also keeps the time it was added.
//!
//! Adding a comment leaves the page's `last_edited_time` alone in the simulator. Whether Notion
//! moves it is not confirmed here (docs/notion-api.md), so a reader must not rely on either.

use serde_json::{Value, json};
use uuid::Uuid;

use super::blocks::marked_id as id;
use super::data::{self, SimDatabase, SimPage};

/// Bytes 6..10 of comment ids and discussion ids; block ids carry another mark.
const COMMENT: [u8; 4] = [0x4c, 0x0e, 0x8d, 0x1a];
const DISCUSSION: [u8; 4] = [0x4d, 0x15, 0x8c, 0x55];

/// How many comments a page starts with.
fn generated(seq: u64) -> u32 {
    if seq % 5 == 2 { 1 + (seq / 5 % 3) as u32 } else { 0 }
}

/// The page's comments, oldest first (as Notion lists them). Two consecutive comments share a
/// discussion.
pub fn comments(users: &[Uuid], db: &SimDatabase, page: &SimPage) -> Vec<Value> {
    let first = generated(page.seq);
    let times =
        (0..first).map(|k| page.created + 60 * (i64::from(k) + 1)).chain(page.comments_added.iter().copied());
    times
        .enumerate()
        .map(|(k, at)| {
            let k = k as u32;
            let author = users.get((page.seq as usize + k as usize) % users.len().max(1)).copied().unwrap_or_default();
            json!({
                "object": "comment",
                "id": id(COMMENT, db.index, page.seq, k),
                "parent": {"type": "page_id", "page_id": page.id},
                "discussion_id": id(DISCUSSION, db.index, page.seq, k / 2),
                "created_time": data::iso(at),
                "last_edited_time": data::iso(at),
                "created_by": {"object": "user", "id": author},
                "rich_text": [data::rich_text(&format!("Comment {} on page {}: \"quoted\" — ✓", k + 1, page.seq))],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn every_fifth_page_has_one_to_three_and_added_ones_follow_in_order() {
        let ws = data::Workspace::generate(42, 1, 50, Utc::now());
        let db = &ws.databases[0];
        let counts: Vec<usize> = db.pages.iter().map(|p| comments(&ws.users, db, p).len()).collect();
        assert_eq!(counts.iter().filter(|&&n| n > 0).count(), 10);
        assert!(counts.iter().all(|&n| n <= 3));
        assert!(counts.contains(&3) && counts.contains(&1));
        let mut page = db.pages[2].clone();
        let before = comments(&ws.users, db, &page);
        page.comments_added.push(page.created + 86_400);
        let after = comments(&ws.users, db, &page);
        assert_eq!(after.len(), before.len() + 1);
        assert_eq!(after[..before.len()], before[..], "earlier comments stay as they were");
        let times: Vec<&str> = after.iter().filter_map(|c| c["created_time"].as_str()).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first: {times:?}");
        let ids: std::collections::HashSet<&str> = after.iter().filter_map(|c| c["id"].as_str()).collect();
        assert_eq!(ids.len(), after.len());
        assert!(
            super::super::blocks::decode(
                &after[0]["id"].as_str().unwrap_or_default().parse().unwrap_or_default()
            )
            .is_none()
        );
    }
}
