//! Cached-read cost: open+read+close of a 4 KiB file, in a loop, on a
//! secretfs mount of a static snapshot and on tmpfs (/dev/shm), same run.
//!
//! `cargo run --release -p secretfs-mount --example readbench [ITERATIONS]`
//! (root, /dev/fuse).

use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

use secretfs_mount::{StaticMount, StaticSecret};

/// Plain libc calls, as a C program would make them: the measurement is the
/// filesystem, not std's wrappers.
fn loop_read(path: &Path, iterations: u32) -> Duration {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    let mut buf = vec![0u8; 8192];
    let start = Instant::now();
    for _ in 0..iterations {
        // SAFETY: valid path and buffer.
        unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
            assert!(fd >= 0, "open {}", path.display());
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            assert_eq!(n, 4096);
            libc::close(fd);
        }
    }
    start.elapsed()
}

fn per_op_us(d: Duration, n: u32) -> f64 {
    d.as_secs_f64() * 1e6 / f64::from(n)
}

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ITERATIONS"))
        .unwrap_or(20_000);
    let content = vec![b'x'; 4096];

    let mnt = tempfile::tempdir().unwrap();
    let m = StaticMount::mount(
        mnt.path(),
        0,
        0,
        0o400,
        vec![StaticSecret::new(1, 1, "bench/secret", &content)],
    )
    .expect("mount (needs root and /dev/fuse)");
    let fuse_file = mnt.path().join("bench/secret");

    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let shm_file = shm.path().join("secret");
    std::fs::write(&shm_file, &content).unwrap();

    // Warm both caches (dentries, attributes, pages), then alternate runs.
    loop_read(&fuse_file, 100);
    loop_read(&shm_file, 100);
    let mut fuse = Vec::new();
    let mut tmpfs = Vec::new();
    for _ in 0..3 {
        fuse.push(per_op_us(loop_read(&fuse_file, iterations), iterations));
        tmpfs.push(per_op_us(loop_read(&shm_file, iterations), iterations));
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let (f, t) = (best(&fuse), best(&tmpfs));
    println!("iterations per run: {iterations} (best of 3 runs)");
    println!("secretfs: {f:.2} µs per open+read+close   runs: {fuse:.2?}");
    println!("tmpfs:    {t:.2} µs per open+read+close   runs: {tmpfs:.2?}");
    println!("ratio:    {:.2}x", f / t);

    m.unmount(Duration::from_secs(2));
}
