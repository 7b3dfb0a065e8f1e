//! Page content: each page's block tree, a pure function of (seed, database, page, content
//! version) like its property values, so content costs no memory until it is read.
//!
//! The shapes, by the page's creation order (`seq`):
//! - `seq % 97 == 0` (the first page among them): a showcase with every common block type, rich
//!   text with links, annotations, mentions and an inline equation, nested lists, a table,
//!   columns, a synced block, and sub-page and inline-database links;
//! - `seq % 100 == 13`: 120–269 top-level blocks, so reading them takes two or three requests;
//! - `seq % 50 == 7`: toggles nested six deep;
//! - `seq % 1000 == 501`: very large, a 400-row table and 300 paragraphs;
//! - otherwise 4–12 top-level blocks of mixed types, about one in eight with children (nested
//!   lists and toggles).
//!
//! A content edit bumps the page's content version: every fourth block (by ordinal) carries the
//! version in its text, so each edit changes those blocks' text; ids and shape stay. Block ids encode where the block lives (database, page, ordinal in the
//! tree), so `GET /v1/blocks/{id}/children` finds any block without an index of all blocks.

use serde_json::{Value, json};
use uuid::Uuid;

use super::data::{self, Rng, SimDatabase, SimPage};

/// One generated block and its children.
#[derive(Debug, Clone)]
pub struct Block {
    pub id: Uuid,
    pub ty: &'static str,
    /// The object under the block's type key.
    pub body: Value,
    pub children: Vec<Block>,
}

/// Bytes 6..10 of every block id; page and database ids are random v4 UUIDs.
const MARK: [u8; 4] = [0x4b, 0x1c, 0x8c, 0xb1];

/// The id of block `ordinal` of page `seq` in database `db`.
pub fn block_id(db: u64, seq: u64, ordinal: u32) -> Uuid {
    marked_id(MARK, db, seq, ordinal)
}

/// An id that says where its object lives: page `seq` of database `db`, number `n`, with `mark`
/// (which keeps the UUID's version and variant bits) telling objects apart. The simulator's
/// workspaces stay far below 2^32 pages and 2^16 databases.
pub(super) fn marked_id(mark: [u8; 4], db: u64, seq: u64, n: u32) -> Uuid {
    debug_assert!(seq <= u64::from(u32::MAX) && db <= u64::from(u16::MAX));
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&(seq as u32).to_be_bytes());
    b[4..6].copy_from_slice(&(db as u16).to_be_bytes());
    b[6..10].copy_from_slice(&mark);
    b[12..16].copy_from_slice(&n.to_be_bytes());
    Uuid::from_bytes(b)
}

/// (database index, page seq, ordinal) of a block id, if it is one.
pub fn decode(id: &Uuid) -> Option<(u64, u64, u32)> {
    let b = id.as_bytes();
    if b[6..10] != MARK || b[10..12] != [0, 0] {
        return None;
    }
    let seq = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let db = u16::from_be_bytes([b[4], b[5]]) as u64;
    let ordinal = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
    Some((db, seq, ordinal))
}

struct Gen<'a> {
    db: &'a SimDatabase,
    page: &'a SimPage,
    rng: Rng,
    next: u32,
    users: &'a [Uuid],
}

impl Gen<'_> {
    fn text(&mut self, base: &str) -> Value {
        let ordinal = self.next;
        let edited = self.page.content_version > 0 && ordinal.is_multiple_of(4);
        let content = if edited {
            format!("{base} (revision {})", self.page.content_version)
        } else {
            base.to_string()
        };
        json!([data::rich_text(&content)])
    }

    /// A block without children.
    fn block(&mut self, ty: &'static str, body: Value) -> Block {
        self.with(ty, body, |_| Vec::new())
    }

    /// A block whose children are generated after its own ordinal is taken, so a parent's id
    /// does not depend on what its subtree holds.
    fn with(
        &mut self,
        ty: &'static str,
        body: Value,
        children: impl FnOnce(&mut Self) -> Vec<Block>,
    ) -> Block {
        let id = block_id(self.db.index, self.page.seq, self.next);
        self.next += 1;
        let children = children(self);
        Block { id, ty, body, children }
    }

    fn paragraph(&mut self, n: u64) -> Block {
        let rt = self.text(&format!("Paragraph {n} of page {}.", self.page.seq));
        self.block("paragraph", json!({"rich_text": rt, "color": "default"}))
    }

    fn bullets(&mut self, depth: u32) -> Block {
        let rt = self.text(&format!("Point at depth {depth}"));
        self.with("bulleted_list_item", json!({"rich_text": rt, "color": "default"}), |g| {
            if depth >= 2 { Vec::new() } else { vec![g.bullets(depth + 1), g.paragraph(u64::from(depth))] }
        })
    }

    fn toggle_chain(&mut self, depth: u32, max: u32) -> Block {
        let rt = self.text(&format!("Toggle level {depth}"));
        self.with("toggle", json!({"rich_text": rt, "color": "default"}), |g| {
            if depth >= max {
                vec![g.paragraph(u64::from(depth))]
            } else {
                vec![g.toggle_chain(depth + 1, max), g.paragraph(u64::from(depth))]
            }
        })
    }

    fn table(&mut self, rows: u64) -> Block {
        self.with(
            "table",
            json!({"table_width": 3, "has_column_header": true, "has_row_header": false}),
            |g| {
                (0..rows)
                    .map(|r| {
                        let cells: Vec<Value> = (0..3)
                            .map(|c| {
                                if r == 0 {
                                    g.text(&format!("Column {c}"))
                                } else {
                                    g.text(&format!("r{r}c{c}"))
                                }
                            })
                            .collect();
                        g.block("table_row", json!({"cells": cells}))
                    })
                    .collect()
            },
        )
    }

    fn mixed(&mut self, n: u64) -> Block {
        let pick = self.rng.below(16);
        match pick {
            0 => self.bullets(0),
            1 => {
                let rt = self.text("A toggle");
                self.with("toggle", json!({"rich_text": rt, "color": "default"}), |g| {
                    vec![g.paragraph(n), g.paragraph(n + 1)]
                })
            }
            2 => {
                let rt = self.text(&format!("Heading {n}"));
                self.block("heading_2", json!({"rich_text": rt, "is_toggleable": false, "color": "default"}))
            }
            3 => {
                let rt = self.text(&format!("Task {n}"));
                let checked = self.rng.below(2) == 1;
                self.block("to_do", json!({"rich_text": rt, "checked": checked, "color": "default"}))
            }
            4 => {
                let rt = self.text("let answer = 42;");
                self.block("code", json!({"rich_text": rt, "caption": [], "language": "rust"}))
            }
            _ => self.paragraph(n),
        }
    }

    fn showcase(&mut self) -> Vec<Block> {
        let rich = rich_showcase(self.users.first().copied().unwrap_or_default(), self.page.id);
        let other = self.db.pages.get(1).map(|p| p.id).unwrap_or(self.page.id);
        let mut out = Vec::new();
        for (ty, level) in [("heading_1", 1), ("heading_2", 2), ("heading_3", 3)] {
            let rt = self.text(&format!("Heading {level}"));
            out.push(self.block(ty, json!({"rich_text": rt, "is_toggleable": false, "color": "default"})));
        }
        out.push(self.block("paragraph", json!({"rich_text": rich, "color": "default"})));
        out.push(self.bullets(0));
        for i in 0..2 {
            let rt = self.text(&format!("Step {}", i + 1));
            out.push(self.block("numbered_list_item", json!({"rich_text": rt, "color": "default"})));
        }
        for checked in [true, false] {
            let rt = self.text(if checked { "Done task" } else { "Open task" });
            out.push(self.block("to_do", json!({"rich_text": rt, "checked": checked, "color": "default"})));
        }
        out.push(self.toggle_chain(1, 2));
        let code = self.text("fn main() {\n    println!(\"hi\");\n}");
        out.push(self.block("code", json!({"rich_text": code, "caption": [], "language": "rust"})));
        let quote = self.text("A quotation.");
        out.push(self.block("quote", json!({"rich_text": quote, "color": "default"})));
        let callout = self.text("Note this.");
        out.push(self.block(
            "callout",
            json!({"rich_text": callout, "icon": {"type": "emoji", "emoji": "💡"}, "color": "gray_background"})));
        out.push(self.block("divider", json!({})));
        out.push(self.block("equation", json!({"expression": "e^{i\\pi} + 1 = 0"})));
        out.push(self.table(3));
        out.push(self.with("column_list", json!({}), |g| {
            (0..2).map(|c| g.with("column", json!({}), |g| vec![g.paragraph(100 + c)])).collect()
        }));
        out.push(self.with("synced_block", json!({"synced_from": null}), |g| vec![g.paragraph(200)]));
        out.push(self.block("bookmark", json!({"caption": [], "url": "https://example.com/reading"})));
        out.push(self.block(
            "image",
            json!({"caption": [], "type": "external", "external": {"url": "https://example.com/diagram.png"}})));
        out.push(self.block("link_to_page", json!({"type": "page_id", "page_id": other})));
        // A sub-page with content of its own, and an inline database: links, not followed.
        out.push(self.with("child_page", json!({"title": "Meeting notes"}), |g| vec![g.paragraph(300)]));
        out.push(self.block("child_database", json!({"title": "Inline tracker"})));
        out.push(self.block("unsupported", json!({})));
        out
    }
}

/// Rich text with a link, bold and code annotations, a user, page and date mention and an
/// inline equation.
fn rich_showcase(user: Uuid, page: Uuid) -> Value {
    let plain = |s: &str| data::rich_text(s);
    let mut link = data::rich_text("a link");
    link["text"]["link"] = json!({"url": "https://example.com/"});
    link["href"] = json!("https://example.com/");
    let mut bold = data::rich_text("bold");
    bold["annotations"]["bold"] = json!(true);
    let mut code = data::rich_text("code");
    code["annotations"]["code"] = json!(true);
    let annotations = plain("x")["annotations"].clone();
    json!([
        plain("Text with "), link, plain(", "), bold, plain(", "), code, plain(", "),
        {"type": "mention", "mention": {"type": "user", "user": {"object": "user", "id": user}},
         "annotations": annotations, "plain_text": "@User 1", "href": null},
        plain(", "),
        {"type": "mention", "mention": {"type": "page", "page": {"id": page}},
         "annotations": annotations, "plain_text": "This page", "href": format!("https://www.notion.so/{}", page.simple())},
        plain(", "),
        {"type": "mention", "mention": {"type": "date", "date": {"start": "2026-01-02", "end": null, "time_zone": null}},
         "annotations": annotations, "plain_text": "2026-01-02", "href": null},
        plain(" and "),
        {"type": "equation", "equation": {"expression": "x^2"}, "annotations": annotations, "plain_text": "x^2", "href": null},
        plain("."),
    ])
}

/// The page's top-level blocks, each with its subtree.
pub fn tree(seed: u64, users: &[Uuid], db: &SimDatabase, page: &SimPage) -> Vec<Block> {
    let mut g = Gen { db, page, rng: Rng::new(&[seed, db.index, page.seq, 0xB10C]), next: 0, users };
    let seq = page.seq;
    if seq.is_multiple_of(97) {
        g.showcase()
    } else if seq % 1000 == 501 {
        let mut out = vec![g.table(400)];
        out.extend((0..300).map(|n| g.paragraph(n)));
        out
    } else if seq % 100 == 13 {
        let n = 120 + g.rng.below(150);
        (0..n).map(|n| g.mixed(n)).collect()
    } else if seq % 50 == 7 {
        vec![g.paragraph(0), g.toggle_chain(1, 6), g.paragraph(1)]
    } else {
        let n = 4 + g.rng.below(9);
        (0..n).map(|n| g.mixed(n)).collect()
    }
}

/// The block with `id` in `blocks`, at any depth.
pub fn find(blocks: &[Block], id: Uuid) -> Option<&Block> {
    blocks.iter().find_map(|b| if b.id == id { Some(b) } else { find(&b.children, id) })
}

/// The block as `GET /v1/blocks/{id}/children` lists it; `parent` is the page or block it
/// hangs from.
pub fn block_json(block: &Block, parent: Parent, page: &SimPage) -> Value {
    let parent = match parent {
        Parent::Page(id) => json!({"type": "page_id", "page_id": id}),
        Parent::Block(id) => json!({"type": "block_id", "block_id": id}),
    };
    let mut map = serde_json::Map::new();
    map.insert("object".into(), "block".into());
    map.insert("id".into(), block.id.to_string().into());
    map.insert("parent".into(), parent);
    map.insert("created_time".into(), data::iso(page.created).into());
    map.insert("last_edited_time".into(), data::iso(page.last_edited).into());
    map.insert("created_by".into(), json!({"object": "user", "id": page.created_by}));
    map.insert("last_edited_by".into(), json!({"object": "user", "id": page.last_edited_by}));
    map.insert("has_children".into(), (!block.children.is_empty()).into());
    map.insert("archived".into(), false.into());
    map.insert("in_trash".into(), false.into());
    map.insert("type".into(), block.ty.into());
    map.insert(block.ty.into(), block.body.clone());
    Value::Object(map)
}

/// What a listed block hangs from.
#[derive(Debug, Clone, Copy)]
pub enum Parent {
    Page(Uuid),
    Block(Uuid),
}

/// The ground truth of a page's content for `/_sim/export`: every block as listed, with its
/// children under `children`, in order. A `child_page` block's children are the sub-page's own
/// content, so they are not part of this page's (`children` is empty, `has_children` true).
pub fn export_tree(blocks: &[Block], parent: Parent, page: &SimPage) -> Value {
    Value::Array(
        blocks
            .iter()
            .map(|b| {
                let mut v = block_json(b, parent, page);
                v["children"] = if b.ty == "child_page" {
                    Value::Array(Vec::new())
                } else {
                    export_tree(&b.children, Parent::Block(b.id), page)
                };
                v
            })
            .collect(),
    )
}

/// Requests a reader needs for the whole tree at `page_size` blocks a request (the floor that
/// content benchmarks compare against).
pub fn requests_to_read(blocks: &[Block], page_size: usize) -> u64 {
    let own = blocks.len().div_ceil(page_size.max(1)).max(1) as u64;
    own + blocks
        .iter()
        .filter(|b| !b.children.is_empty() && b.ty != "child_page")
        .map(|b| requests_to_read(&b.children, page_size))
        .sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn workspace() -> data::Workspace {
        data::Workspace::generate(42, 1, 2_000, Utc::now())
    }

    fn all(blocks: &[Block], out: &mut Vec<(Uuid, &'static str, usize)>, depth: usize) {
        for b in blocks {
            out.push((b.id, b.ty, depth));
            all(&b.children, out, depth + 1);
        }
    }

    #[test]
    fn trees_are_deterministic_and_ids_decode_to_their_page() {
        let ws = workspace();
        let db = &ws.databases[0];
        for page in db.pages.iter().take(300) {
            let a = tree(ws.seed, &ws.users, db, page);
            let b = tree(ws.seed, &ws.users, db, page);
            let (mut ia, mut ib) = (Vec::new(), Vec::new());
            all(&a, &mut ia, 0);
            all(&b, &mut ib, 0);
            assert_eq!(ia, ib);
            assert!(!ia.is_empty(), "page {} has content", page.seq);
            let mut seen = std::collections::HashSet::new();
            for (id, _, _) in &ia {
                assert!(seen.insert(*id), "ids are unique within a page");
                assert_eq!(decode(id).map(|(d, s, _)| (d, s)), Some((db.index, page.seq)));
            }
        }
        assert_eq!(decode(&db.pages[5].id), None, "a page id is not a block id");
    }

    #[test]
    fn the_shapes_cover_every_type_depth_pagination_and_size() {
        let ws = workspace();
        let db = &ws.databases[0];
        let mut kinds = std::collections::BTreeSet::new();
        let (mut deepest, mut widest, mut largest) = (0, 0, 0);
        let mut requests = 0;
        for page in &db.pages {
            let t = tree(ws.seed, &ws.users, db, page);
            let mut flat = Vec::new();
            all(&t, &mut flat, 0);
            kinds.extend(flat.iter().map(|(_, ty, _)| *ty));
            deepest = deepest.max(flat.iter().map(|(_, _, d)| *d).max().unwrap_or(0));
            widest = widest.max(t.len());
            largest = largest.max(flat.len());
            requests += requests_to_read(&t, 100);
        }
        for ty in [
            "paragraph",
            "heading_1",
            "heading_2",
            "heading_3",
            "bulleted_list_item",
            "numbered_list_item",
            "to_do",
            "toggle",
            "code",
            "quote",
            "callout",
            "divider",
            "equation",
            "table",
            "table_row",
            "column_list",
            "column",
            "synced_block",
            "bookmark",
            "image",
            "link_to_page",
            "child_page",
            "child_database",
            "unsupported",
        ] {
            assert!(kinds.contains(ty), "{ty} is generated");
        }
        assert!(deepest >= 4, "nested to depth {deepest}");
        assert!(widest > 100, "some pages have more than 100 top-level blocks ({widest})");
        assert!(largest >= 700, "a few pages are very large ({largest} blocks)");
        let mean = requests as f64 / db.pages.len() as f64;
        assert!((2.7..=3.3).contains(&mean), "about three requests a page, measured {mean}");
    }

    #[test]
    fn a_content_edit_changes_text_but_not_ids() {
        let ws = workspace();
        let db = &ws.databases[0];
        let mut page = db.pages[3].clone();
        let before = tree(ws.seed, &ws.users, db, &page);
        page.content_version += 1;
        let after = tree(ws.seed, &ws.users, db, &page);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        all(&before, &mut a, 0);
        all(&after, &mut b, 0);
        assert_eq!(a, b, "same ids and shape");
        let text = |t: &[Block]| export_tree(t, Parent::Page(page.id), &page).to_string();
        assert_ne!(text(&before), text(&after), "some text changed");
    }
}
