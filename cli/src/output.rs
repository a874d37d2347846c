//! Text tables and JSON for commands that print data.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

use crate::args::Format;

pub fn time(secs: i64) -> String {
    if secs <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs as u64)).to_string()
}

pub fn time_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

/// Prints `json` or, for text, a table (or the `text` lines when given).
pub fn print(format: Format, json: &Value, table: Table) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(json).unwrap_or_default()),
        Format::Text => table.print(),
    }
}

#[derive(Default)]
pub struct Table {
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// Key-value layout (for `describe`): one "key: value" per row.
    pub vertical: bool,
    /// Printed when there are no rows.
    pub empty: &'static str,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            ..Table::default()
        }
    }

    pub fn vertical(rows: Vec<(&'static str, String)>) -> Self {
        Table {
            rows: rows
                .into_iter()
                .map(|(k, v)| vec![k.to_owned(), v])
                .collect(),
            vertical: true,
            ..Table::default()
        }
    }

    pub fn empty(mut self, text: &'static str) -> Self {
        self.empty = text;
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        if self.vertical {
            let width = self.rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
            for r in &self.rows {
                println!(
                    "{:width$}  {}",
                    format!("{}:", r[0]),
                    r[1],
                    width = width + 1
                );
            }
            return;
        }
        if self.rows.is_empty() {
            if !self.empty.is_empty() {
                println!("{}", self.empty);
            }
            return;
        }
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(c);
                } else {
                    out.push_str(&format!("{:w$}  ", c, w = widths[i]));
                }
            }
            println!("{}", out.trim_end());
        };
        line(self.headers.clone());
        for r in &self.rows {
            line(r.iter().map(|s| s.as_str()).collect());
        }
    }
}
