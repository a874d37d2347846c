//! Text tables and JSON for commands that print data.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

use crate::args::Format;

/// The latest time RFC 3339 can write (9999-12-31T23:59:59Z, unix seconds).
/// The server refuses later ones, but whatever it returns (an old server,
/// an edited database) must print, never panic.
const MAX_SECS: i64 = 253_402_300_799;

/// A time from the server in the one format of messages and logs
/// ([`secretfs_proto::cert::rfc3339_unix`]); "-" for none (0).
pub fn time(secs: i64) -> String {
    if secs <= 0 {
        return "-".into();
    }
    if secs > MAX_SECS {
        return format!("{secs} (unix seconds, beyond year 9999)");
    }
    secretfs_proto::cert::rfc3339_unix(secs)
}

pub fn time_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    if ms / 1000 > MAX_SECS {
        return format!("{ms} (unix milliseconds, beyond year 9999)");
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

/// Text from the server, safe for a terminal: control characters (escape
/// sequences, carriage returns) are shown escaped, never sent raw.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
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

    /// Every cell escaped for the terminal (see [`printable`]): the one
    /// place all text output passes.
    fn cells(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
            .collect()
    }

    pub fn print(&self) {
        let rows = self.cells();
        if self.vertical {
            let width = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
            for r in &rows {
                println!(
                    "{:width$}  {}",
                    format!("{}:", r[0]),
                    r[1],
                    width = width + 1
                );
            }
            return;
        }
        if rows.is_empty() {
            if !self.empty.is_empty() {
                println!("{}", self.empty);
            }
            return;
        }
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for r in &rows {
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
        for r in &rows {
            line(r.iter().map(|s| s.as_str()).collect());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Whatever time the server returns, printing it never panics.
        #[test]
        fn any_time_prints(t in any::<i64>()) {
            let _ = time(t);
            let _ = time_ms(t);
        }

        #[test]
        fn printable_text_has_no_control_characters(s in any::<String>()) {
            prop_assert!(!printable(&s).chars().any(char::is_control));
        }
    }

    #[test]
    fn edges_of_time() {
        for t in [
            i64::MIN,
            -1,
            0,
            1,
            MAX_SECS,
            MAX_SECS + 1,
            1 << 62,
            i64::MAX,
        ] {
            let _ = time(t);
            let _ = time_ms(t);
        }
        assert_eq!(time(MAX_SECS), "9999-12-31T23:59:59Z");
        assert!(time(1 << 62).contains("beyond"));
        assert_eq!(printable("a\x1b[31mb"), "a\\u{1b}[31mb");
    }
}
