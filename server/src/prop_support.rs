//! What the property tests share: how many cases each runs (few by
//! default, so the whole suite stays fast in CI; as many as asked with
//! `PROPTEST_CASES`: `PROPTEST_CASES=100000 cargo test -p secretfs-server
//! prop_`), and the text they feed to parsers.

use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per property when `PROPTEST_CASES` is not set.
pub const DEFAULT_CASES: u32 = 64;

/// proptest's configuration (which reads every `PROPTEST_*` variable),
/// with [`DEFAULT_CASES`] unless `PROPTEST_CASES` says otherwise.
pub fn config() -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    config
}

/// Characters that would let text pass for something else on a terminal
/// or in a log: control characters, bidi controls, zero-width ones.
pub fn deceptive(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Text built mostly of what names are made of, with the characters that
/// break the rules mixed in (arbitrary strings alone would almost never
/// make a valid multi-segment name), names near the length limits, and
/// arbitrary strings.
pub fn text() -> impl Strategy<Value = String> {
    let alphabet = prop::sample::select(vec![
        'a', 'Z', '0', '9', '.', '_', '-', '/', '/', ' ', '\0', '\n', '\u{1b}', '\\', ':', '*',
        'é', '\u{202e}', '\u{200b}',
    ]);
    let chars = prop::collection::vec(alphabet, 0..48).prop_map(String::from_iter);
    // Segments of 250-260 bytes: around the 255-byte and 1024-byte limits.
    let long = prop::collection::vec(
        (250usize..=260, prop::sample::select(vec!["a", "b-", "c."])),
        1..6,
    )
    .prop_map(|segs| {
        segs.into_iter()
            .map(|(n, s)| s.repeat(n).chars().take(n).collect::<String>())
            .collect::<Vec<_>>()
            .join("/")
    });
    prop_oneof![4 => chars, 1 => long, 2 => any::<String>()]
}

/// Standard base64 with padding (test only; no crate for one function).
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `der` as PEM with `label` (`CERTIFICATE REQUEST`).
pub fn pem(label: &str, der: &[u8]) -> String {
    let body: Vec<String> = base64(der)
        .as_bytes()
        .chunks(64)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}
