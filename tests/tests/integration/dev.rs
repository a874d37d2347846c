//! `secretfs dev`: the README's first command gives a running server, a demo
//! secret readable through the CLI and through a mount, and Ctrl-C stops
//! everything cleanly. Run twice: the second run reuses the state.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// Runs `secretfs dev` in `dir` until it is ready; returns its output so
/// far and the child.
fn start_dev(dir: &Path) -> (std::process::Child, String) {
    let mut child = Command::new(bin())
        .args(["dev", "--dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if line.contains("Ctrl-C") {
                let _ = tx.send(text.clone());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(text) => (child, text),
        Err(_) => {
            let _ = child.kill();
            panic!("secretfs dev did not get ready");
        }
    }
}

/// Ctrl-C, then the exit code.
fn stop(child: std::process::Child) -> i32 {
    signal(&child, Signal::INT);
    let out = wait_bounded(child, Duration::from_secs(30));
    out.status.code().unwrap_or(-1)
}

/// The value of `export NAME=...` in the printed text.
fn export(text: &str, name: &str) -> String {
    let prefix = format!("export {name}=");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .to_owned()
}

#[test]
fn dev_brings_up_a_working_system_and_ctrl_c_stops_it() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    for round in 0..2 {
        let (child, text) = start_dev(&dir);
        let mnt = dir.join("mnt");
        assert!(
            text.contains(&format!("cat {}/demo/greeting", mnt.display())),
            "{text}"
        );
        assert_eq!(
            std::fs::read(mnt.join("demo/greeting")).unwrap(),
            b"hello from secretfs\n",
            "round {round}"
        );
        assert_eq!(
            std::fs::read(mnt.join("demo/db/password")).unwrap().len(),
            36
        );

        // The printed admin settings work.
        let mut cmd = Command::new(bin());
        for var in [
            "SECRETFS_SERVER",
            "SECRETFS_CA",
            "SECRETFS_CERT",
            "SECRETFS_KEY",
        ] {
            cmd.env(var, export(&text, var));
        }
        cmd.args(["secret", "list", "-o", "json"]);
        let list = run_cmd(cmd, None).ok().json();
        assert_eq!(list.as_array().unwrap().len(), 2, "round {round}: {list}");

        // So does the printed read as the demo client.
        let read_line = text
            .lines()
            .find(|l| l.ends_with("read demo/greeting"))
            .expect("a read line");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(read_line.replace("secretfs read", &format!("{} read", bin().display())))
            .env("SECRETFS_SERVER", export(&text, "SECRETFS_SERVER"))
            .env("SECRETFS_CA", export(&text, "SECRETFS_CA"));
        assert_eq!(run_cmd(cmd, None).ok().stdout, "hello from secretfs\n");

        assert_eq!(stop(child), 0, "round {round}");
        assert!(!is_mounted(&mnt), "still mounted after Ctrl-C");
    }
}
