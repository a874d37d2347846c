//! The docs say what the product does: `dev --no-mount` promises no
//! unmount, `read` prints the bytes (and JSON with `-o json`, as the README
//! says every command that prints data does), and the README, docs/ and
//! deploy/ name only files the repository has.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

#[test]
fn dev_without_a_mount_does_not_promise_to_unmount() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut child = Command::new(bin())
        .args(["dev", "--no-mount", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let last = line.contains("Ctrl-C");
            lines.push(line);
            if last {
                let _ = tx.send(lines.clone());
            }
        }
    });
    let Ok(lines) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = child.kill();
        panic!("secretfs dev --no-mount did not get ready");
    };
    signal(&child, Signal::INT);
    let out = wait_bounded(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0));

    let text = lines.join("\n");
    assert_eq!(lines.last().unwrap(), "Ctrl-C stops the server.", "{text}");
    assert!(!text.contains("unmount"), "{text}");
    assert!(!text.contains("/mnt/"), "no mount paths to try: {text}");
    assert!(!is_mounted(&dir.join("mnt")));
}

#[test]
fn read_prints_the_bytes_and_json_with_o_json() {
    let server = TestServer::start();
    let text = "line one\n\"quoted\" \\ tab\t and é\n";
    server.add_secret("app/text", text.as_bytes());
    let binary = [0u8, 0xff, 0xfe, b'\n', 1];
    server
        .cli_in(&["secret", "add", "app/binary"], &binary)
        .ok();
    server
        .cli_in(&["secret", "rotate", "app/text"], text.as_bytes())
        .ok();
    let app = server.add_client("app");
    server.grant("app", &["app"], &["app/text", "app/binary"]);

    // Plain: exactly the bytes, nothing added.
    let r = server.cli_as(&app, &["read", "app/text"], None).ok();
    assert_eq!(r.raw_stdout, text.as_bytes());
    let r = server.cli_as(&app, &["read", "app/binary"], None).ok();
    assert_eq!(r.raw_stdout, binary);

    // -o json: one object, the content as a string, the current version.
    let r = server
        .cli_as(&app, &["read", "app/text", "-o", "json"], None)
        .ok();
    assert_eq!(
        r.json(),
        serde_json::json!({"name": "app/text", "version": 2, "content": text})
    );
    assert!(r.stdout.ends_with("}\n"), "{:?}", r.stdout);

    // Bytes JSON cannot carry are refused, with the way out, and nothing
    // of the content reaches stdout.
    let r = server
        .cli_as(&app, &["read", "app/binary", "-o", "json"], None)
        .fails(1, "not UTF-8");
    assert!(r.stderr.contains("without -o json"), "{}", r.stderr);
    assert!(r.raw_stdout.is_empty(), "{:?}", r.raw_stdout);
}

/// Repository paths a doc names: `docs/x.md`, `deploy/...`, `tests/...`,
/// crate sources. A path that ends in `/` or holds a placeholder is skipped.
fn named_paths(text: &str) -> Vec<String> {
    const ROOTS: [&str; 10] = [
        "docs/", "deploy/", "tests/", "scripts/", "mount/", "server/", "cli/", "proto/", "bench/",
        ".ci/",
    ];
    let mut out = Vec::new();
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./@-".contains(c);
    for (i, _) in text.char_indices() {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| is_path_char(c) || c == ':') {
            continue; // inside a word, a URL or an absolute path
        }
        let Some(root) = ROOTS.iter().find(|r| text[i..].starts_with(**r)) else {
            continue;
        };
        let len = text[i..]
            .find(|c: char| !is_path_char(c))
            .unwrap_or(text.len() - i);
        let path = text[i..i + len].trim_end_matches(['.', ',']);
        if path.len() > root.len() && !path.ends_with('/') && path.contains('.') {
            out.push(path.to_owned());
        }
    }
    out
}

#[test]
fn the_docs_name_only_files_that_exist() {
    let root = workspace();
    let mut docs = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    for dir in ["docs", "deploy", "deploy/kubernetes", "deploy/systemd"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                docs.push(path);
            }
        }
    }
    let mut missing = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        assert!(
            !text.contains("DESIGN.md"),
            "{} names DESIGN.md, which the repository does not have",
            doc.display()
        );
        for path in named_paths(&text) {
            if !root.join(&path).exists() {
                missing.push(format!("{}: {path}", doc.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named but missing:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_path_finder_finds_paths_and_skips_the_rest() {
    let text = "see docs/decisions.md, and [x](deploy/kubernetes/README.md). \
                Not /etc/secretfs/web.env, https://x/docs/a.md, mydocs/b.md, \
                deploy/systemd/ or /run/secretfs/<container>; \
                `tests/tests/integration/kubernetes.rs` and mount/src/watch.rs.";
    assert_eq!(
        named_paths(text),
        [
            "docs/decisions.md",
            "deploy/kubernetes/README.md",
            "tests/tests/integration/kubernetes.rs",
            "mount/src/watch.rs"
        ]
    );
}
