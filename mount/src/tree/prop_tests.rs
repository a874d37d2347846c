//! Property tests of the FUSE core against what a container's processes
//! send: any inode number, any name bytes, any offset and size, in any
//! order, never panic; a lookup finds only a name the tree lists; a read
//! returns at most what was asked, from the file's own bytes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use proptest::prelude::*;

use super::*;
use crate::prop_support::config;
use crate::snapshot::tests::file;

#[derive(Debug, Clone)]
enum Op {
    Lookup(u64, Vec<u8>),
    Forget(u64, u64),
    Getattr(u64),
    Read(u64, u64, u32),
    Readdir(u64, u64, bool, usize),
}

/// Inode numbers near the ones the tree hands out, and any.
fn ino() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..24, 1 => any::<u64>()]
}

fn op() -> impl Strategy<Value = Op> {
    let name = prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "db", "password", ".secretfs", "status", ".", "..", ""])
            .prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ];
    prop_oneof![
        (ino(), name).prop_map(|(i, n)| Op::Lookup(i, n)),
        (ino(), any::<u64>()).prop_map(|(i, n)| Op::Forget(i, n)),
        ino().prop_map(Op::Getattr),
        (ino(), prop_oneof![0u64..16, any::<u64>()], any::<u32>())
            .prop_map(|(i, o, s)| Op::Read(i, o, s)),
        (
            ino(),
            prop_oneof![0u64..8, any::<u64>()],
            any::<bool>(),
            0usize..4
        )
            .prop_map(|(i, o, p, n)| Op::Readdir(i, o, p, n)),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_any_request_from_a_container_is_answered_without_panic(
        ops in prop::collection::vec(op(), 1..40),
        fail_closed in any::<bool>(),
    ) {
        let defaults = Defaults { uid: 1000, gid: 1000, mode: 0o400, force: Force::default() };
        let mut t = Tree::new(defaults, UNIX_EPOCH);
        let snap = Snapshot::build(vec![
            file(1, 1, "a", b"alpha"),
            file(2, 1, "db/password", b"s3cret"),
            file(3, 2, "b", b""),
        ]);
        t.apply(&snap, UNIX_EPOCH);
        t.set_status(b"{}".to_vec(), UNIX_EPOCH);
        if fail_closed {
            t.set_fail_closed(true);
        }
        for op in ops {
            match op {
                Op::Lookup(parent, name) => {
                    let name = OsStr::from_bytes(&name);
                    if let Ok(attr) = t.lookup(parent, name) {
                        // Found only where a listing shows it.
                        let mut listed = Vec::new();
                        t.readdir(parent, 0, false, |e| {
                            listed.push((e.name.clone(), e.attr.ino));
                            false
                        })
                        .unwrap();
                        let name = name.to_str().unwrap().to_owned();
                        prop_assert!(listed.contains(&(name, attr.ino)));
                    }
                }
                Op::Forget(ino, n) => t.forget(ino, n),
                Op::Getattr(ino) => {
                    let _ = t.getattr(ino);
                }
                Op::Read(ino, offset, size) => {
                    if let Ok(out) = t.read(ino, offset, size) {
                        let bytes = out.bytes();
                        prop_assert!(bytes.len() <= size as usize);
                        let whole = t.read(ino, 0, u32::MAX).unwrap();
                        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(whole.bytes().len());
                        prop_assert_eq!(bytes, &whole.bytes()[start..start + bytes.len()]);
                    }
                }
                Op::Readdir(ino, offset, plus, stop_after) => {
                    let mut seen = 0;
                    let _ = t.readdir(ino, offset, plus, |e| {
                        seen += 1;
                        assert!(!e.name.is_empty() && !e.name.contains('/'));
                        seen > stop_after
                    });
                }
            }
        }
    }
}
