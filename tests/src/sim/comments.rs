//! Comments on pages, for `GET /v1/comments?block_id=<page>`: every fifth page (from the
//! third) starts with one to three, stamped with the page's creation time, and `mutate` with
//! `comment_add` adds more, stamped when added. Generated ones are a pure function of the page;
//! comments pair into discussions by position (the first two, the next two, …), so an added
//! comment may join the last one's discussion.
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
    // Generated comments carry the page's creation time (never later than an added one, and
    // never in the future for a page created just now); ties keep their order.
    let times = (0..first).map(|_| page.created).chain(page.comments_added.iter().copied());
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
        let uuid = |v: &Value| -> Uuid { v.as_str().expect("an id").parse().expect("a uuid") };
        assert!(super::super::blocks::decode(&uuid(&after[0]["id"])).is_none(), "not a block id");
        // Two to a discussion, by position.
        let discussions: Vec<Uuid> = after.iter().map(|c| uuid(&c["discussion_id"])).collect();
        assert_eq!(discussions[0], discussions[1]);
        assert!(discussions.iter().all(|d| !ids.contains(d.to_string().as_str())));

        // A page created just now: its comments are not in the future, and an added one follows.
        let mut new = db.pages[7].clone();
        let now = data::floor_minute(Utc::now().timestamp());
        new.created = now;
        new.last_edited = now;
        new.comments_added = vec![now];
        let listed = comments(&ws.users, db, &new);
        let times: Vec<&str> = listed.iter().filter_map(|c| c["created_time"].as_str()).collect();
        assert!(times.len() == 3 && times.iter().all(|t| *t == data::iso(now)), "{times:?}");
        let d: Vec<Uuid> = listed.iter().map(|c| uuid(&c["discussion_id"])).collect();
        assert!(d[0] == d[1] && d[2] != d[0], "{d:?}");
    }
}
