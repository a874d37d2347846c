//! Property tests of the caller check's parsers: `/proc/PID/cgroup` text
//! is written by the kernel but holds cgroup names a container may choose
//! (in a delegated subtree), so arbitrary lines never panic and are
//! accepted exactly when they are in the kernel's format; valid files
//! round trip; a container match always names a configured id at a
//! segment boundary of the path; and the whole check, over a fixture
//! /proc holding arbitrary text, never panics.

use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::prop_support::config;

const ID: &str = "3f4e8a1b2c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const OTHER: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9";

/// The kernel's format for one line, written as a reference: `ID:CTRL:PATH`
/// with ID decimal (a u32), CTRL empty exactly on hierarchy 0 and otherwise
/// comma-separated names (`name=` allowed) of `[A-Za-z0-9_.-]`, PATH
/// absolute without NUL (it may hold ':').
fn line_model(line: &str) -> Option<(u32, String, String)> {
    let first = line.find(':')?;
    let second = first + 1 + line[first + 1..].find(':')?;
    let id = &line[..first];
    let controllers = &line[first + 1..second];
    let path = &line[second + 1..];
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hierarchy: u32 = id.parse().ok()?;
    let controller_ok = |c: &str| {
        let name = c.strip_prefix("name=").unwrap_or(c);
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    };
    let controllers_ok = if hierarchy == 0 {
        controllers.is_empty()
    } else {
        controllers.split(',').all(controller_ok)
    };
    (controllers_ok && path.starts_with('/') && !path.contains('\0'))
        .then(|| (hierarchy, controllers.to_owned(), path.to_owned()))
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            ID.to_owned(),
            OTHER.to_owned(),
            ID[..12].to_owned(),
            "docker".into(),
            "system.slice".into(),
            "user.slice".into(),
            format!("runc-{ID}.scope"),
            format!("docker-{OTHER}.scope"),
            format!("libpod-conmon-{ID}.scope"),
            "kubepods.slice".into(),
            "kubepods-burstable-pod1234.slice".into(),
            format!("kubepods-pod1234.slice:cri-containerd:{ID}"),
            "containerd.service".into(),
            "a:b".into(),
            "x.service".into(),
            "app.service".into(),
        ]),
        1 => prop::sample::select(vec!["", ".", "..", "\0", "a b"]).prop_map(str::to_owned),
        1 => "[^/\n]{0,12}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..5).prop_map(|s| format!("/{}", s.join("/")))
}

fn controllers() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "cpu",
            "cpuacct",
            "memory",
            "pids",
            "name=systemd",
            "net_cls",
        ]),
        1..3,
    )
    .prop_map(|c| c.join(","))
}

/// A line in the kernel's format.
fn good_line() -> impl Strategy<Value = (u32, String, String)> {
    prop_oneof![
        path().prop_map(|p| (0, String::new(), p)),
        (1u32..14, controllers(), path()),
    ]
    .prop_filter("a path without NUL", |(_, _, p)| !p.contains('\0'))
}

/// A line in the kernel's format, or one broken in one of the ways that
/// matter, or anything.
fn line() -> impl Strategy<Value = String> {
    let good = good_line().prop_map(|(h, c, p)| format!("{h}:{c}:{p}"));
    prop_oneof![
        6 => good,
        1 => prop::sample::select(vec![
            "0:cpu:/x", "3::/x", "x::/a", "-1::/a", "4294967296::/a", "0::a", "0:/a", ":/a", "0::",
            "0::/a\0b", "3:cpu,,memory:/a", "3:name=:/a", "3:cpu memory:/a", "", "0", "+1::/a",
        ])
        .prop_map(str::to_owned),
        1 => "[^\n]{0,30}",
    ]
}

fn file() -> impl Strategy<Value = String> {
    (prop::collection::vec(line(), 0..6), any::<bool>()).prop_map(|(lines, trailing)| {
        let mut text = lines.join("\n");
        if trailing {
            text.push('\n');
        }
        text
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_cgroup_files_are_read_as_the_kernel_writes_them(text in prop_oneof![4 => file(), 1 => any::<String>()]) {
        let model: Option<Vec<_>> = text.split_terminator('\n').map(line_model).collect();
        let model = model.filter(|lines| !lines.is_empty());
        match (parse_cgroup_file(&text), model) {
            (Ok(lines), Some(want)) => {
                let got: Vec<_> = lines
                    .iter()
                    .map(|l| (l.hierarchy, l.controllers.to_owned(), l.path.to_owned()))
                    .collect();
                prop_assert_eq!(got, want);
                // The deciding lines: the unified one off the root, else
                // every v1 line off the root.
                let deciding = deciding_lines(&lines);
                let unified = lines.iter().find(|l| l.hierarchy == 0 && l.path != "/");
                match unified {
                    Some(u) => prop_assert_eq!(deciding, vec![*u]),
                    None => prop_assert!(deciding.iter().all(|l| l.hierarchy != 0 && l.path != "/")),
                }
            }
            (Err(line), None) => {
                // The refusal quotes a line of the file (empty: no lines).
                prop_assert!(line.is_empty() || text.split('\n').any(|l| l == line));
            }
            (got, want) => prop_assert!(false, "parsed {:?}, the format says {:?}", got, want),
        }
    }

    #[test]
    fn prop_valid_files_round_trip(lines in prop::collection::vec(good_line(), 1..6)) {
        let text: String = lines.iter().map(|(h, c, p)| format!("{h}:{c}:{p}\n")).collect();
        let parsed = parse_cgroup_file(&text).unwrap();
        let back: Vec<_> = parsed
            .iter()
            .map(|l| (l.hierarchy, l.controllers.to_owned(), l.path.to_owned()))
            .collect();
        prop_assert_eq!(back, lines);
    }

    #[test]
    fn prop_a_container_match_is_anchored_to_a_configured_id(
        path in prop_oneof![3 => path(), 1 => any::<String>()],
        ids in prop::sample::subsequence(vec![ID.to_owned(), ID[..12].to_owned(), OTHER.to_owned(), "my-ctr".to_owned()], 0..3),
    ) {
        if let Some((id, cgroup)) = container_of(&path, &ids) {
            prop_assert!(ids.contains(&id));
            prop_assert!(path.starts_with(cgroup));
            let rest = &path[cgroup.len()..];
            prop_assert!(rest.is_empty() || rest.starts_with('/'), "{:?} in {:?}", cgroup, path);
            prop_assert!(!cgroup.split('/').skip(1).any(|s| s.is_empty() || s == "." || s == ".."));
            // The container's own segment names the id.
            let last = cgroup.rsplit('/').next().unwrap();
            let named = container_name(last).map_or(last, |(_, id)| id);
            prop_assert!(id_matches(&id, named), "{:?} does not name {:?}", last, id);
            // Nothing above it names a container.
            let above: Vec<&str> = cgroup.split('/').skip(1).collect();
            let above = &above[..above.len() - 1];
            prop_assert!(!above.iter().any(|s| is_full_id(s) || container_name(s).is_some()), "{:?}", path);
        }
    }

    #[test]
    fn prop_the_check_never_panics_on_any_cgroup_file(text in prop_oneof![4 => file(), 1 => any::<String>()]) {
        let proc_root = tempfile::tempdir().unwrap();
        let cgroup_root = tempfile::tempdir().unwrap();
        let pid = proc_root.path().join("100");
        std::fs::create_dir(&pid).unwrap();
        std::fs::write(pid.join("cgroup"), &text).unwrap();
        let policy = CallerPolicy::with_roots(
            vec![ID.to_owned()],
            vec!["/system.slice/app.service".to_owned()],
            proc_root.path(),
            cgroup_root.path(),
        )
        .unwrap();
        match policy.check(100) {
            Ok(info) => {
                // Admitted only through a well-formed file that places it.
                let lines = parse_cgroup_file(&text);
                prop_assert!(lines.is_ok());
                prop_assert!(!deciding_lines(&lines.unwrap()).is_empty());
                prop_assert!(Path::new(&info.cgroup).is_absolute());
            }
            Err(denial) => {
                let _ = denial.reason.to_string();
            }
        }
    }
}
