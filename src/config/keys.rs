//! Finding keys in the text: which key an error offset falls in, and where a key path is.

use super::check::Seg;
use std::ops::Range;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// `volume[1].pool`.
pub(super) fn render(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The deepest key whose name or value contains `offset`.
pub(super) fn at_offset(text: &str, offset: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    let mut best: Option<Vec<String>> = None;
    walk_table(doc.get_ref(), &mut Vec::new(), offset, &mut best);
    best.map(|path| {
        path.iter().fold(String::new(), |mut out, seg| {
            if !seg.starts_with('[') && !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
            out
        })
    })
}

fn contains(span: Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

fn walk_table(
    table: &DeTable<'_>,
    path: &mut Vec<String>,
    offset: usize,
    best: &mut Option<Vec<String>>,
) {
    for (key, value) in table {
        path.push(key.get_ref().to_string());
        let here = contains(key.span(), offset) || contains(value.span(), offset);
        if here && !matches!(best, Some(b) if b.len() >= path.len()) {
            *best = Some(path.clone());
        }
        walk_value(value, path, offset, best);
        path.pop();
    }
}

fn walk_value(
    value: &Spanned<DeValue<'_>>,
    path: &mut Vec<String>,
    offset: usize,
    best: &mut Option<Vec<String>>,
) {
    match value.get_ref() {
        DeValue::Table(t) => walk_table(t, path, offset, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if item.get_ref().is_table() {
                    path.push(format!("[{i}]"));
                    walk_value(item, path, offset, best);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

/// Byte offset of the key at `path` (or of the nearest existing parent).
pub(super) fn offset_of(text: &str, path: &[Seg<'_>]) -> Option<usize> {
    let doc = DeTable::parse(text).ok()?;
    let mut found = None;
    let mut table: &DeTable<'_> = doc.get_ref();
    let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
    for seg in path {
        match (seg, array) {
            (Seg::Key(k), None) => {
                let (key, value) = table.get_key_value(*k)?;
                found = Some(key.span().start);
                match value.get_ref() {
                    DeValue::Table(t) => table = t,
                    DeValue::Array(a) => array = Some(a),
                    _ => {}
                }
            }
            (Seg::Index(i), Some(items)) => {
                let item = items.get(*i)?;
                array = None;
                match item.get_ref() {
                    DeValue::Table(t) => table = t,
                    _ => return found,
                }
            }
            _ => return found,
        }
    }
    found
}
