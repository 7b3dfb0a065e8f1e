//! Query semantics of `POST /v1/data_sources/{id}/query`: timestamp filters (minute-granular, as
//! Notion stores them), timestamp sorts, `page_size`, and keyset cursors that live in the server
//! session only.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::data::{SimDatabase, SimPage};

/// A client mistake, answered with 400 `validation_error`.
#[derive(Debug)]
pub struct Invalid(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TsField {
    Created,
    LastEdited,
}

impl TsField {
    fn of(self, page: &SimPage) -> i64 {
        match self {
            TsField::Created => page.created,
            TsField::LastEdited => page.last_edited,
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "created_time" => Some(TsField::Created),
            "last_edited_time" => Some(TsField::LastEdited),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Equals,
    Before,
    After,
    OnOrBefore,
    OnOrAfter,
}

#[derive(Debug, Clone)]
pub enum Filter {
    Ts { field: TsField, op: Op, at: i64, date_only: bool },
    And(Vec<Filter>),
    Or(Vec<Filter>),
}

impl Filter {
    pub fn parse(v: &Value, depth: u8) -> Result<Filter, Invalid> {
        if depth > 2 {
            return Err(Invalid("body failed validation: filter nesting is deeper than 2".into()));
        }
        let obj = v.as_object().ok_or_else(|| Invalid("body.filter should be an object".into()))?;
        if let Some(list) = obj.get("and").or(obj.get("or")) {
            let items =
                list.as_array().ok_or_else(|| Invalid("compound filter should be an array".into()))?;
            let parsed = items.iter().map(|f| Filter::parse(f, depth + 1)).collect::<Result<Vec<_>, _>>()?;
            return Ok(if obj.contains_key("and") { Filter::And(parsed) } else { Filter::Or(parsed) });
        }
        if let Some(ts) = obj.get("timestamp").and_then(Value::as_str) {
            let field = TsField::parse(ts).ok_or_else(|| {
                Invalid(format!(
                    "body.filter.timestamp should be `created_time` or `last_edited_time`, instead was `{ts}`"
                ))
            })?;
            let cond = obj
                .get(ts)
                .and_then(Value::as_object)
                .ok_or_else(|| Invalid(format!("body.filter.{ts} should be defined")))?;
            let (name, value) =
                cond.iter().next().ok_or_else(|| Invalid(format!("body.filter.{ts} is empty")))?;
            let op = match name.as_str() {
                "equals" => Op::Equals,
                "before" => Op::Before,
                "after" => Op::After,
                "on_or_before" => Op::OnOrBefore,
                "on_or_after" => Op::OnOrAfter,
                other => return Err(Invalid(format!("body.filter.{ts}.{other} is not supported"))),
            };
            let text = value
                .as_str()
                .ok_or_else(|| Invalid(format!("body.filter.{ts}.{name} should be a string")))?;
            let (at, date_only) = parse_date(text).ok_or_else(|| {
                Invalid(format!("body.filter.{ts}.{name} should be an ISO 8601 date, instead was `{text}`"))
            })?;
            return Ok(Filter::Ts { field, op, at, date_only });
        }
        if obj.contains_key("property") {
            return Err(Invalid(
                "notion-sim supports timestamp filters only (property filters are not simulated)".into(),
            ));
        }
        Err(Invalid("body.filter should have `timestamp`, `and` or `or`".into()))
    }

    pub fn matches(&self, page: &SimPage) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(page)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(page)),
            Filter::Ts { field, op, at, date_only } => {
                let t = field.of(page);
                if *date_only {
                    let day_start = *at;
                    let day_end = at + 86_400;
                    match op {
                        Op::Equals => t >= day_start && t < day_end,
                        Op::Before => t < day_start,
                        Op::OnOrBefore => t < day_end,
                        Op::After => t >= day_end,
                        Op::OnOrAfter => t >= day_start,
                    }
                } else {
                    match op {
                        Op::Equals => t == *at,
                        Op::Before => t < *at,
                        Op::OnOrBefore => t <= *at,
                        Op::After => t > *at,
                        Op::OnOrAfter => t >= *at,
                    }
                }
            }
        }
    }
}

/// Parses `2026-11-01` or an RFC 3339 time; returns unix seconds and whether it was a bare date.
fn parse_date(text: &str) -> Option<(i64, bool)> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some((t.with_timezone(&Utc).timestamp(), false));
    }
    let day = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    Some((day.and_hms_opt(0, 0, 0)?.and_utc().timestamp(), true))
}

/// Sort order: by a timestamp, ties broken by creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sort {
    pub field: TsField,
    pub ascending: bool,
}

impl Sort {
    /// Notion's default when no sort is given: newest first by creation.
    pub const DEFAULT: Sort = Sort { field: TsField::Created, ascending: false };

    pub fn parse(v: Option<&Value>) -> Result<Sort, Invalid> {
        let Some(v) = v else { return Ok(Sort::DEFAULT) };
        let list = v.as_array().ok_or_else(|| Invalid("body.sorts should be an array".into()))?;
        match list.as_slice() {
            [] => Ok(Sort::DEFAULT),
            [one] => {
                if one.get("property").is_some() {
                    return Err(Invalid("notion-sim supports timestamp sorts only".into()));
                }
                let ts = one.get("timestamp").and_then(Value::as_str).unwrap_or_default();
                let field = TsField::parse(ts).ok_or_else(|| {
                    Invalid(format!("body.sorts[0].timestamp should be a timestamp, instead was `{ts}`"))
                })?;
                let ascending = match one.get("direction").and_then(Value::as_str) {
                    Some("ascending") => true,
                    Some("descending") => false,
                    _ => {
                        return Err(Invalid(
                            "body.sorts[0].direction should be `ascending` or `descending`".into(),
                        ));
                    }
                };
                Ok(Sort { field, ascending })
            }
            _ => Err(Invalid("notion-sim supports a single sort".into())),
        }
    }

    pub fn key(&self, page: &SimPage) -> (i64, u64) {
        (self.field.of(page), page.seq)
    }
}

/// One page of results: indices into `db.pages`, and the key of the last one when more remain.
pub struct Selection {
    pub indices: Vec<usize>,
    pub next_after: Option<(i64, u64)>,
}

/// Selects the next `page_size` live pages after `after` in `sort` order: one O(n log k) pass
/// with a bounded heap, no allocation proportional to the database.
pub fn select(
    db: &SimDatabase,
    filter: Option<&Filter>,
    sort: Sort,
    after: Option<(i64, u64)>,
    page_size: usize,
) -> Selection {
    use std::collections::BinaryHeap;
    // Normalise to "smaller comes first" so one heap serves both directions.
    let rank = |k: (i64, u64)| -> (i64, i128) {
        if sort.ascending { (k.0, i128::from(k.1)) } else { (-k.0, -i128::from(k.1)) }
    };
    let after_rank = after.map(rank);
    // A max-heap of the best `page_size + 1` candidates (the extra one tells "has more").
    let mut heap: BinaryHeap<((i64, i128), usize)> = BinaryHeap::with_capacity(page_size + 2);
    let now = std::time::Instant::now();
    for (i, p) in db.pages.iter().enumerate() {
        let p = p.as_indexed(now);
        let p = p.as_ref();
        if p.in_trash {
            continue;
        }
        let r = rank(sort.key(p));
        if after_rank.is_some_and(|a| r <= a) {
            continue;
        }
        if heap.len() > page_size && heap.peek().is_some_and(|top| r >= top.0) {
            continue;
        }
        if !filter.is_none_or(|f| f.matches(p)) {
            continue;
        }
        heap.push((r, i));
        if heap.len() > page_size + 1 {
            heap.pop();
        }
    }
    let mut best: Vec<((i64, i128), usize)> = heap.into_vec();
    best.sort_unstable();
    let more = best.len() > page_size;
    best.truncate(page_size);
    let next_after =
        if more { best.last().map(|&(_, i)| sort.key(&db.pages[i].as_indexed(now))) } else { None };
    Selection { indices: best.into_iter().map(|(_, i)| i).collect(), next_after }
}

/// The cursor-drift mode's selection: the live pages matching `filter` in `sort` order *as they
/// are now*, from position `offset`. Returns the page and whether more remain.
pub fn select_offset(
    db: &SimDatabase,
    filter: Option<&Filter>,
    sort: Sort,
    offset: usize,
    page_size: usize,
) -> (Vec<usize>, bool) {
    let now = std::time::Instant::now();
    let mut all: Vec<usize> = (0..db.pages.len())
        .filter(|&i| {
            let p = db.pages[i].as_indexed(now);
            !p.in_trash && filter.is_none_or(|f| f.matches(&p))
        })
        .collect();
    all.sort_unstable_by_key(|&i| {
        let (t, seq) = sort.key(&db.pages[i].as_indexed(now));
        if sort.ascending { (t, i128::from(seq)) } else { (-t, -i128::from(seq)) }
    });
    let end = offset.saturating_add(page_size).min(all.len());
    let start = offset.min(end);
    (all[start..end].to_vec(), end < all.len())
}
