//! deploy/Dockerfile builds: no Docker engine runs here, so instead of a
//! build this checks what made the build fail before. Cargo reads every
//! workspace member's manifest even to build one package, so the build
//! stage must copy every member of the root Cargo.toml (bench was missing),
//! every path dependency, Cargo.toml and Cargo.lock, and .dockerignore
//! must not drop any file of them. The builder's Rust must be at least the
//! workspace's `rust-version`.

use std::path::Path;

use crate::common::{repo_file, workspace};

/// The quoted strings of the TOML array that follows `key =` (one level,
/// as Cargo.toml writes `members`).
fn toml_array(text: &str, key: &str) -> Vec<String> {
    let start = text
        .lines()
        .position(|l| l.trim_start().starts_with(key) && l.contains('='))
        .unwrap_or_else(|| panic!("no {key} in Cargo.toml"));
    let rest: String = text.lines().skip(start).collect::<Vec<_>>().join("\n");
    let open = rest.find('[').expect("an array");
    let close = rest[open..].find(']').expect("a closed array") + open;
    rest[open + 1..close]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The `path = "..."` dependencies of a manifest, relative to the root.
fn path_deps(manifest_dir: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut rest = line;
        while let Some(i) = rest.find("path = \"") {
            rest = &rest[i + 8..];
            let end = rest.find('"').expect("closing quote");
            let joined = Path::new(manifest_dir).join(&rest[..end]);
            out.push(normalise(&joined));
            rest = &rest[end..];
        }
    }
    out
}

fn normalise(path: &Path) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.components() {
        match c.as_os_str().to_str().unwrap() {
            "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

/// The sources of the COPY lines of the first (build) stage, where the
/// destination mirrors the source (`COPY a a`, `COPY a b ./`).
fn build_stage_copies(dockerfile: &str) -> Vec<String> {
    let mut stage = 0;
    let mut out = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("FROM ") {
            stage += 1;
            continue;
        }
        if stage != 1 || !upper.starts_with("COPY ") {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert!(
            !words.iter().any(|w| w.starts_with("--from")),
            "the build stage copies from the context only: {line}"
        );
        let (dest, sources) = words.split_last().expect("COPY SRC DEST");
        for src in sources {
            let src = src.trim_end_matches('/');
            let mirrored =
                *dest == "./" || *dest == "." || dest.trim_end_matches('/') == src || src == ".";
            assert!(
                mirrored,
                "COPY {src} to {dest}: expected the same path in /src"
            );
            out.push(src.to_owned());
        }
    }
    out
}

/// .dockerignore's patterns (Go filepath.Match plus `**`), ignoring
/// comments; exceptions (`!`) are not used here and refused.
fn ignore_patterns(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            assert!(!l.starts_with('!'), "exceptions are not checked: {l}");
            l.trim_start_matches('/').trim_end_matches('/').to_owned()
        })
        .collect()
}

/// Does `pattern` match `path` (both `/`-separated) or one of its parent
/// directories? (Docker ignores a directory's whole content.)
fn ignored(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.split('/').collect();
    let segs: Vec<&str> = path.split('/').collect();
    (1..=segs.len()).any(|n| match_segments(&pat, &segs[..n]))
}

fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    match (pat.first(), segs.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            match_segments(&pat[1..], segs) || (!segs.is_empty() && match_segments(pat, &segs[1..]))
        }
        (Some(p), Some(s)) => {
            match_glob(p.as_bytes(), s.as_bytes()) && match_segments(&pat[1..], &segs[1..])
        }
        _ => false,
    }
}

fn match_glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => match_glob(&p[1..], s) || (!s.is_empty() && match_glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => match_glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) => a == b && match_glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Every file under `dir` (relative to the root), skipping build output.
fn files_under(rel: &str, out: &mut Vec<String>) {
    let path = workspace().join(rel);
    if path.is_file() {
        out.push(rel.to_owned());
        return;
    }
    for entry in std::fs::read_dir(&path).unwrap_or_else(|e| panic!("{rel}: {e}")) {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name == "target" {
            continue;
        }
        files_under(&format!("{rel}/{name}"), out);
    }
}

/// What is wrong with this Dockerfile and .dockerignore for this workspace.
fn problems(dockerfile: &str, dockerignore: &str) -> Vec<String> {
    let root = repo_file("Cargo.toml");
    let members = toml_array(&root, "members");
    assert!(members.len() >= 5, "members parsed: {members:?}");

    let copies = build_stage_copies(dockerfile);
    let copied = |path: &str| {
        copies
            .iter()
            .any(|c| c == "." || path == c || path.starts_with(&format!("{c}/")))
    };

    let mut needed: Vec<String> = vec!["Cargo.toml".into(), "Cargo.lock".into()];
    needed.extend(path_deps(".", &root));
    for member in &members {
        needed.push(member.clone());
        let manifest = repo_file(&format!("{member}/Cargo.toml"));
        needed.extend(path_deps(member, &manifest));
    }
    needed.sort();
    needed.dedup();

    let mut out = Vec::new();
    for path in &needed {
        if !copied(path) {
            out.push(format!(
                "{path} is not copied into the build stage (add `COPY {path} {path}`)"
            ));
        }
    }
    let patterns = ignore_patterns(dockerignore);
    let mut files = Vec::new();
    for path in needed.iter().filter(|p| copied(p)) {
        files_under(path, &mut files);
    }
    for file in &files {
        if let Some(p) = patterns.iter().find(|p| ignored(p, file)) {
            out.push(format!(
                ".dockerignore pattern {p:?} drops {file}, which the build needs"
            ));
        }
    }

    let want = root
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version in Cargo.toml");
    let first_from = dockerfile
        .lines()
        .find(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .expect("FROM");
    let image = first_from.split_whitespace().nth(1).unwrap();
    let have = image
        .strip_prefix("rust:")
        .and_then(|t| t.split('-').next())
        .unwrap_or_else(|| panic!("the build stage should start from rust:VERSION: {first_from}"));
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    if version(have) < version(&want) {
        out.push(format!(
            "the builder {image} is older than the workspace's rust-version {want}"
        ));
    }
    out
}

#[test]
fn the_dockerfile_copies_everything_the_build_reads() {
    let found = problems(&repo_file("deploy/Dockerfile"), &repo_file(".dockerignore"));
    assert!(found.is_empty(), "deploy/Dockerfile:\n{}", found.join("\n"));
}

#[test]
fn the_check_catches_a_missing_member_an_ignored_file_and_an_old_rust() {
    let dockerfile = repo_file("deploy/Dockerfile");
    let ignore = repo_file(".dockerignore");

    let without_bench = dockerfile.replace("COPY bench bench\n", "");
    assert_ne!(without_bench, dockerfile, "the Dockerfile copies bench");
    let found = problems(&without_bench, &ignore);
    assert!(
        found.iter().any(|p| p.starts_with("bench is not copied")),
        "{found:?}"
    );

    let found = problems(&dockerfile, &format!("{ignore}\n**/*.sql\n"));
    assert!(
        found
            .iter()
            .any(|p| p.contains("drops server/src/store/sqlite/migrations/")),
        "{found:?}"
    );
    let found = problems(&dockerfile, &format!("{ignore}\nbench\n"));
    assert!(
        found.iter().any(|p| p.contains("drops bench/Cargo.toml")),
        "{found:?}"
    );

    let old = dockerfile.replacen("FROM rust:1.", "FROM rust:0.", 1);
    assert_ne!(old, dockerfile);
    let found = problems(&old, &ignore);
    assert!(
        found
            .iter()
            .any(|p| p.contains("older than the workspace's rust-version")),
        "{found:?}"
    );
}

#[test]
fn the_ignore_matcher_follows_docker() {
    assert!(ignored("target", "target/debug/x"));
    assert!(!ignored("target", "tests/target.rs"));
    assert!(ignored("**/target", "bench/target/x"));
    assert!(ignored("**/*.key", "web.key"));
    assert!(ignored("**/*.key", "a/b/web.key"));
    assert!(!ignored("*.key", "a/web.key"));
    assert!(ignored("proto/*.proto", "proto/secretfs.proto"));
    assert!(!ignored("proto/*.proto", "proto/src/x.proto"));
}
