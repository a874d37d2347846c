//! Secret content comes from stdin or a file, never from the command line
//! (argv is visible to every user through `ps` and /proc).

use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

use crate::fail::UsageError;

/// Far above the server's default limit; stops a runaway pipe from filling
/// memory before the server gets to say no.
const READ_LIMIT: u64 = 64 * 1024 * 1024;

pub fn read_content(from_file: Option<&Path>, allow_empty: bool) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    match from_file {
        Some(path) if path != Path::new("-") => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            file.take(READ_LIMIT + 1)
                .read_to_end(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
        }
        _ => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(UsageError(
                    "no content: pipe it on stdin (e.g. `secretfs secret add NAME < value.txt`) or use --from-file FILE; \
                     secretfs never takes secret content from the command line"
                        .into(),
                )
                .into());
            }
            stdin
                .lock()
                .take(READ_LIMIT + 1)
                .read_to_end(&mut buf)
                .context("cannot read the content from stdin")?;
        }
    }
    if buf.len() as u64 > READ_LIMIT {
        bail!("the content is over {READ_LIMIT} bytes; secrets are small values, not files of that size");
    }
    if buf.is_empty() && !allow_empty {
        return Err(UsageError(
            "the content is empty (was anything piped in?); pass --allow-empty if an empty secret is really meant".into(),
        )
        .into());
    }
    Ok(buf)
}
