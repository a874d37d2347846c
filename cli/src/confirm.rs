//! Asking before a removal that cannot be undone (`secret delete`, `group
//! remove`, `client remove`).
//!
//! Only a person at a terminal is asked: with `--yes`, or when stdin is not
//! a terminal (a script, a pipe, CI), the command goes ahead as it always
//! has, so existing scripts keep working. The question goes to stderr, so
//! `-o json` output stays clean.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context, Result};

/// Whether to ask: not with `--yes`, and only when a person can answer.
pub fn wanted(yes: bool) -> bool {
    !yes && std::io::stdin().is_terminal()
}

/// Asks `question` and returns when the answer is yes; anything else
/// (including end of input) stops the command with nothing changed.
pub fn ask(question: &str) -> Result<()> {
    let mut stderr = std::io::stderr().lock();
    write!(stderr, "{} [y/N] ", crate::output::printable(question))
        .and_then(|()| stderr.flush())
        .context("cannot ask for confirmation on stderr")?;
    drop(stderr);
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("cannot read the answer from stdin")?;
    if is_yes(&answer) {
        return Ok(());
    }
    bail!("not confirmed; nothing was changed (answer y, or pass --yes to skip the question)")
}

fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// "1 version" / "3 versions".
pub fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// ": a, b" for a non-empty list; "" otherwise.
pub fn listed(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_yes_is_yes() {
        for yes in ["y", "Y\n", " yes ", "YES\n"] {
            assert!(is_yes(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yess", "oui", "y y"] {
            assert!(!is_yes(no), "{no:?}");
        }
    }

    #[test]
    fn counts_and_lists_read_well() {
        assert_eq!(count(1, "version"), "1 version");
        assert_eq!(count(3, "version"), "3 versions");
        assert_eq!(listed(&[]), "");
        assert_eq!(listed(&["a".into(), "b".into()]), " (a, b)");
    }
}
