//! The external audit sink: every committed audit entry, with its chain
//! value, as one JSON line in a file (rotated by size) or on stdout.
//!
//! The database is written first, in the change's own transaction, and
//! always holds the chain. A thread exports committed entries in id order
//! after that, one batch and one fsync at a time, and remembers the last id
//! it wrote. If it cannot write (disk full, EIO, a rename that fails), the
//! sink is marked failed: every request is refused UNAVAILABLE naming the
//! sink (Vault's rule, adapted: nothing more happens while the external
//! audit cannot record it), the gRPC health service says NOT_SERVING, and
//! the error is logged once. It retries every second; once it can write, it
//! catches up from the last id it exported (the entries are read from the
//! database), so the sink loses nothing, and requests succeed again.
//!
//! On start a file sink resumes after the id of its last line, and that
//! line must match the database (same id, same chain value): a database
//! whose audit tail was deleted and head row rolled back is refused there.
//! A new file starts with the whole log. Stdout (and any file that is not
//! a regular file: a FIFO, a character device) cannot be read back, so the
//! last id exported there is remembered in a small file in the state
//! directory (`audit-sink.exported`, written after each batch): the next
//! start resumes after it, so entries committed but not exported at a
//! crash, or written while the server ran without this sink (`server
//! verify --accept`), still reach it (at least once: a crash between a
//! write and the record repeats that batch). With no record for this
//! target (its first start), it starts after the current head.
//!
//! A write that blocks (stdout piped to a stalled reader, a hung network
//! filesystem) never returns an error; a watchdog marks the sink failed
//! ("stalled") once entries wait and no write has completed for
//! [`DEFAULT_STALL`], with the same refusals, until a write completes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::Error;
use crate::store::audit_chain::ChainedEntry;
use crate::store::Store;

/// Entries written per batch (one write and one fsync).
const BATCH: usize = 1000;
/// How often the exporter looks for new entries when idle.
const POLL: Duration = Duration::from_millis(50);
/// How often a failed sink is retried.
const RETRY: Duration = Duration::from_secs(1);

pub const DEFAULT_MAX_SIZE: u64 = 100 * 1024 * 1024;
pub const DEFAULT_KEEP: u32 = 5;
/// Entries wait and no write completed for this long: the sink is stalled.
pub const DEFAULT_STALL: Duration = Duration::from_secs(10);

/// Where the audit goes besides the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkTarget {
    File(PathBuf),
    Stdout,
}

#[derive(Clone, Debug)]
pub struct SinkOptions {
    pub target: SinkTarget,
    /// A file is rotated before it would grow past this many bytes.
    pub max_size: u64,
    /// Rotated files kept: PATH.1 (newest) to PATH.N.
    pub keep: u32,
    /// A write pending this long without completing marks the sink failed.
    pub stall: Duration,
    /// Where a sink that cannot be read back (stdout, a FIFO) records the
    /// last id it exported (the server sets it in the state directory).
    pub resume_file: Option<PathBuf>,
}

/// What the rest of the server sees of the sink.
#[derive(Debug)]
pub struct SinkStatus {
    name: String,
    /// Why it cannot write, while it cannot.
    failed: Mutex<Option<String>>,
    /// The last entry written: id and chain value.
    exported: Mutex<Option<(u64, Vec<u8>)>>,
    /// `true` while it can write (for the health service).
    serving: tokio::sync::watch::Sender<bool>,
    /// Set at shutdown: export what is committed, then end.
    stop: std::sync::atomic::AtomicBool,
    /// When the write under way began (the watchdog's clock).
    writing_since: Mutex<Option<Instant>>,
}

impl SinkStatus {
    fn new(name: String) -> SinkStatus {
        SinkStatus {
            name,
            failed: Mutex::new(None),
            exported: Mutex::new(None),
            serving: tokio::sync::watch::channel(true).0,
            stop: Default::default(),
            writing_since: Mutex::new(None),
        }
    }

    /// Asks the exporter to write what is committed and end (at shutdown).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// "the audit log /var/log/secretfs/audit.jsonl" or "... on stdout".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sentence a refused request gets while the sink cannot write.
    pub fn refusal(&self) -> Option<String> {
        let why = lock(&self.failed).clone()?;
        if why.starts_with("stalled") {
            return Some(format!(
                "{} cannot be written ({why}); every request is refused until it can, so nothing \
                 happens that the external audit does not record. Its reader stopped reading (a \
                 stuck log shipper) or its filesystem hangs: fix that, and requests are served \
                 again as soon as the write completes",
                self.name
            ));
        }
        Some(format!(
            "{} cannot be written ({why}); every request is refused until it can, so nothing \
             happens that the external audit does not record. Free space on its filesystem or \
             fix the path: the server retries every second and then catches up",
            self.name
        ))
    }

    pub fn exported(&self) -> Option<(u64, Vec<u8>)> {
        lock(&self.exported).clone()
    }

    /// Follows whether the sink can write.
    pub fn serving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.serving.subscribe()
    }

    fn set_failed(&self, why: Option<String>) {
        let mut failed = lock(&self.failed);
        match (&*failed, &why) {
            (None, Some(why)) => tracing::error!(
                sink = %self.name,
                error = %why,
                "the audit sink cannot be written: requests are refused until it can"
            ),
            (Some(_), None) => {
                tracing::info!(sink = %self.name, "the audit sink can be written again; requests are served")
            }
            _ => {}
        }
        let serving = why.is_none();
        *failed = why;
        drop(failed);
        self.serving
            .send_if_modified(|s| std::mem::replace(s, serving) != serving);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One exported line.
fn line(c: &ChainedEntry) -> String {
    let e = &c.entry;
    let mut s = json!({
        "id": e.id, "at_ms": e.at_ms, "actor": e.actor, "action": e.action,
        "secret": e.secret, "client": e.client, "group": e.group, "version": e.version,
        "allowed": e.allowed, "detail": e.detail,
        "epoch": c.epoch, "chain": c.chain.as_deref().map(hex::encode),
        "prev": hex::encode(&c.prev),
    })
    .to_string();
    s.push('\n');
    s
}

/// The id and chain value of the last whole line of `path` (regular files
/// only). A partial last line (a crash mid-write) is cut off first.
fn last_line(path: &Path) -> Result<Option<(u64, Vec<u8>)>, Error> {
    let io =
        |what: &str, e| Error::io(format!("cannot {what} the audit log {}", path.display()), e);
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open", e)),
    };
    let len = f.metadata().map_err(|e| io("read", e))?.len();
    // Lines are short; the last whole one is within the last 1 MiB.
    let from = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(from)).map_err(|e| io("read", e))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(|e| io("read", e))?;
    let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
        if len > 0 && from == 0 {
            f.set_len(0).map_err(|e| io("repair", e))?;
        }
        return Ok(None);
    };
    if end + 1 < tail.len() {
        tracing::warn!(path = %path.display(), "the audit log ended in a partial line (a crash mid-write); it was cut off");
        f.set_len(from + end as u64 + 1)
            .map_err(|e| io("repair", e))?;
    }
    let start = tail[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let bad = || {
        Error::Config(format!(
            "the last line of the audit log {} is not one this server wrote; move the file aside and start again",
            path.display()
        ))
    };
    let v: serde_json::Value = serde_json::from_slice(&tail[start..end]).map_err(|_| bad())?;
    let id = v["id"].as_u64().ok_or_else(bad)?;
    let chain = v["chain"]
        .as_str()
        .and_then(|c| hex::decode(c).ok())
        .ok_or_else(bad)?;
    Ok(Some((id, chain)))
}

/// Opens the sink file for appending: created 0600, never through a
/// symbolic link.
///
/// Opened non-blocking, so a FIFO without a reader fails at once (ENXIO)
/// instead of blocking the start forever; writes then block as usual.
fn open_append(path: &Path) -> std::io::Result<File> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32)
        .open(path)?;
    let flags = rustix::fs::fcntl_getfl(&f)?;
    rustix::fs::fcntl_setfl(&f, flags - OFlags::NONBLOCK)?;
    let meta = f.metadata()?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

enum Out {
    File {
        path: PathBuf,
        file: Option<File>,
        size: u64,
        regular: bool,
    },
    Stdout,
}

impl Out {
    /// Writes `lines` (each ending in a newline), rotating the file by
    /// size between them; returns how many were written (and made durable)
    /// before an error.
    fn write(&mut self, lines: &[String], opts: &SinkOptions) -> (usize, std::io::Result<()>) {
        match self {
            Out::Stdout => {
                let mut out = std::io::stdout().lock();
                let text: String = lines.concat();
                match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                    Ok(()) => (lines.len(), Ok(())),
                    Err(e) => (0, Err(e)),
                }
            }
            Out::File {
                path,
                file,
                size,
                regular,
            } => {
                let mut done = 0;
                while done < lines.len() {
                    if file.is_none() {
                        let opened = open_append(path).and_then(|f| Ok((f.metadata()?, f)));
                        match opened {
                            Ok((meta, f)) => {
                                *regular = meta.is_file();
                                *size = meta.len();
                                *file = Some(f);
                            }
                            Err(e) => return (done, Err(e)),
                        }
                    }
                    let fits = |size: u64, more: usize| size + more as u64 <= opts.max_size;
                    if *regular && *size > 0 && !fits(*size, lines[done].len()) {
                        *file = None;
                        if let Err(e) = rotate(path, opts.keep) {
                            return (done, Err(e));
                        }
                        continue;
                    }
                    let mut chunk = String::new();
                    let mut n = 0;
                    while done + n < lines.len()
                        && (chunk.is_empty()
                            || !*regular
                            || fits(*size, chunk.len() + lines[done + n].len()))
                    {
                        chunk.push_str(&lines[done + n]);
                        n += 1;
                    }
                    let f = file.as_mut().expect("opened above");
                    // fsync only means something for a regular file (a FIFO
                    // or a character device refuses it with EINVAL).
                    let durable = |f: &mut File| if *regular { f.sync_data() } else { Ok(()) };
                    let written = f.write_all(chunk.as_bytes()).and_then(|()| durable(f));
                    if let Err(e) = written {
                        // Leave no partial line behind, and reopen on retry.
                        if *regular {
                            let _ = f.set_len(*size);
                        }
                        *file = None;
                        return (done, Err(e));
                    }
                    *size += chunk.len() as u64;
                    done += n;
                }
                (done, Ok(()))
            }
        }
    }
}

/// PATH.N-1 to PATH.N, ..., PATH to PATH.1. At least one rotated file is
/// kept (`--audit-log-keep` is 1 or more): removing PATH instead would
/// leave, after a crash between the removal and the next line, a sink with
/// no last line to resume from and check.
fn rotate(path: &Path, keep: u32) -> std::io::Result<()> {
    let keep = keep.max(1);
    for n in (1..keep).rev() {
        let from = rotated(path, n);
        if from.exists() {
            std::fs::rename(&from, rotated(path, n + 1))?;
        }
    }
    std::fs::rename(path, rotated(path, 1))
}

/// Checks the sink against the database and starts the exporter thread,
/// which ends once the store is dropped.
pub fn start(
    store: &Arc<dyn Store>,
    opts: SinkOptions,
) -> Result<(Arc<SinkStatus>, std::thread::JoinHandle<()>), Error> {
    let head = store.audit_head()?;
    let head_id = head.as_ref().map_or(0, |h| h.last_id);
    let (name, out, start) = match &opts.target {
        SinkTarget::Stdout => ("the audit log on stdout".to_owned(), Out::Stdout, None),
        SinkTarget::File(path) => {
            let name = format!("the audit log {}", path.display());
            let regular = match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Error::Config(format!(
                        "{name} is a symbolic link; give the real path (--audit-log)"
                    )))
                }
                Ok(m) => m.is_file(),
                Err(_) => true,
            };
            // Fails the start on a path that cannot be opened (a missing
            // directory, no permission), rather than the first request.
            let opened = open_append(path).map_err(|e| {
                if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) {
                    Error::Config(format!(
                        "{name} is a FIFO with no reader (--audit-log); start its reader first, \
                         then the server"
                    ))
                } else {
                    Error::io(
                        format!("cannot open {name} (--audit-log); create its directory or give another path"),
                        e,
                    )
                }
            })?;
            let mut last = None;
            if regular {
                last = last_line(path)?;
                if last.is_none() {
                    last = last_line(&rotated(path, 1))?;
                }
                if last.is_none() {
                    // A new file: the whole log.
                    last = Some((0, crate::store::audit_chain::GENESIS.to_vec()));
                }
            }
            // The handle opened here is the one written to (a FIFO must
            // keep its end open: closing it would give its reader an end of
            // file); a regular file's size is read after any repair above.
            let size = if regular {
                opened
                    .metadata()
                    .map_err(|e| Error::io(format!("cannot read {name}"), e))?
                    .len()
            } else {
                0
            };
            (
                name,
                Out::File {
                    path: path.clone(),
                    file: Some(opened),
                    size,
                    regular,
                },
                last,
            )
        }
    };
    // A sink that cannot be read back resumes from its record.
    let resume = match start {
        Some(_) => None,
        None => opts
            .resume_file
            .clone()
            .map(|file| Resume::new(file, &opts.target)),
    };
    let start = match start {
        Some((0, chain)) => (0, chain),
        Some((id, chain)) => {
            check_against_store(store.as_ref(), &name, id, &chain, FILE_FIX)?;
            (id, chain)
        }
        None => match resume.as_ref().map(Resume::load).transpose()?.flatten() {
            Some((0, chain)) => (0, chain),
            Some((id, chain)) => {
                let file = resume.as_ref().map(|r| r.file.display().to_string());
                let fix = format!(
                    "restore the database from a backup, or after investigating delete {} to start \
                     the sink at the current end of the log (`secretfs audit verify` checks the \
                     database's own chain)",
                    file.as_deref().unwrap_or_default()
                );
                check_against_store(store.as_ref(), &name, id, &chain, &fix)?;
                (id, chain)
            }
            None => (head_id, head.map(|h| h.chain).unwrap_or_default()),
        },
    };
    let status = Arc::new(SinkStatus::new(name));
    *lock(&status.exported) = Some(start.clone());
    let weak = Arc::downgrade(store);
    let thread_status = status.clone();
    let stall = opts.stall;
    let thread = std::thread::Builder::new()
        .name("audit-sink".into())
        .spawn(move || export(weak, thread_status, out, opts, start.0, resume))
        .map_err(|e| Error::io("cannot start the audit sink thread".to_owned(), e))?;
    let weak = Arc::downgrade(store);
    let watched = status.clone();
    std::thread::Builder::new()
        .name("audit-sink-watchdog".into())
        .spawn(move || watchdog(weak, watched, stall))
        .map_err(|e| Error::io("cannot start the audit sink thread".to_owned(), e))?;
    Ok((status, thread))
}

/// Marks the sink failed while a write has been pending for `stall`
/// without completing (the exporter, blocked in it, cannot); ends with the
/// store or at shutdown.
fn watchdog(store: Weak<dyn Store>, status: Arc<SinkStatus>, stall: Duration) {
    let tick = (stall / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        std::thread::sleep(tick);
        if store.strong_count() == 0 || status.stopping() {
            return;
        }
        // Held while marking, so a write that completes meanwhile clears
        // the mark after it, never before.
        let since = lock(&status.writing_since);
        if since.is_some_and(|t| t.elapsed() >= stall) {
            status.set_failed(Some(format!(
                "stalled: no write completed for {} s",
                stall.as_secs_f64().round()
            )));
        }
    }
}

/// The record of the last id a sink that cannot be read back exported.
struct Resume {
    file: PathBuf,
    target: String,
    warned: bool,
}

impl Resume {
    fn new(file: PathBuf, target: &SinkTarget) -> Resume {
        let target = match target {
            SinkTarget::Stdout => "-".to_owned(),
            SinkTarget::File(p) => p.display().to_string(),
        };
        Resume {
            file,
            target,
            warned: false,
        }
    }

    /// The last id and chain value recorded for this target (none for
    /// another target, or no record). A record that cannot be read or
    /// parsed refuses the start: starting from the head instead would skip
    /// entries without a word.
    fn load(&self) -> Result<Option<(u64, Vec<u8>)>, Error> {
        let file = self.file.display();
        let text = match std::fs::read_to_string(&self.file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "cannot read the audit sink's resume record {file}; fix its permissions, \
                         or after investigating delete it to start the sink at the current end of \
                         the log"
                    ),
                    e,
                ))
            }
        };
        let bad = || {
            Error::Config(format!(
                "the audit sink's resume record {file} is damaged (not one this server wrote); \
                 after investigating delete it to start the sink at the current end of the log"
            ))
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
        let Some(target) = v["target"].as_str() else {
            return Err(bad());
        };
        if target != self.target {
            return Ok(None);
        }
        let chain = v["chain"]
            .as_str()
            .and_then(|c| hex::decode(c).ok())
            .ok_or_else(bad)?;
        let id = v["id"].as_u64().ok_or_else(bad)?;
        Ok(Some((id, chain)))
    }

    /// Records the last id exported (written durably, then renamed over
    /// the old record; never through a symbolic link).
    fn save(&mut self, id: u64, chain: &[u8]) {
        let text =
            json!({"target": self.target, "id": id, "chain": hex::encode(chain)}).to_string();
        match crate::state_dir::replace_file(&self.file, text.as_bytes(), 0o600) {
            Ok(()) => self.warned = false,
            Err(e) if !self.warned => {
                self.warned = true;
                tracing::warn!(
                    file = %self.file.display(),
                    error = %e,
                    "cannot record the last entry the audit sink exported; a restart may resend some"
                );
            }
            Err(_) => {}
        }
    }
}

const FILE_FIX: &str =
    "restore the database from a backup, or move the audit log aside to start a \
                        new one after investigating (`secretfs audit verify` checks the database's \
                        own chain)";

/// How a sink's last entry compares with the database's entry of that id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SinkAgreement {
    /// The database holds the entry with the same chain value.
    Same,
    /// The database holds the entry with another chain value.
    Rewritten,
    /// The database does not hold the entry.
    Missing,
}

/// Compares the sink's last entry (`id`, `chain`) with the database's:
/// the one comparison the start and `audit verify` both make.
pub(crate) fn compare_with_store(
    store: &dyn Store,
    id: u64,
    chain: &[u8],
) -> Result<SinkAgreement, Error> {
    let found = store.audit_after(id - 1, 1)?.into_iter().next();
    Ok(match found {
        Some(c) if c.entry.id == id && c.chain.as_deref() == Some(chain) => SinkAgreement::Same,
        Some(c) if c.entry.id == id => SinkAgreement::Rewritten,
        _ => SinkAgreement::Missing,
    })
}

/// The sink's last entry must be the database's entry of that id.
fn check_against_store(
    store: &dyn Store,
    name: &str,
    id: u64,
    chain: &[u8],
    fix: &str,
) -> Result<(), Error> {
    match compare_with_store(store, id, chain)? {
        SinkAgreement::Same => Ok(()),
        SinkAgreement::Rewritten => Err(Error::Config(format!(
            "{name} holds entry {id} with another chain value than the database: the database's audit \
             log was rewritten; {fix}"
        ))),
        SinkAgreement::Missing => Err(Error::Config(format!(
            "{name} holds entry {id}, which the database's audit log no longer has: its tail was \
             deleted; {fix}"
        ))),
    }
}

fn export(
    store: Weak<dyn Store>,
    status: Arc<SinkStatus>,
    mut out: Out,
    opts: SinkOptions,
    mut last: u64,
    mut resume: Option<Resume>,
) {
    loop {
        let Some(store) = store.upgrade() else {
            return;
        };
        let batch = store.audit_after(last, BATCH);
        drop(store);
        let batch = match batch {
            Ok(b) if b.is_empty() => {
                if status.stopping() {
                    return;
                }
                std::thread::sleep(POLL);
                continue;
            }
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "the audit sink cannot read the database; retrying");
                std::thread::sleep(RETRY);
                continue;
            }
        };
        let lines: Vec<String> = batch.iter().map(line).collect();
        *lock(&status.writing_since) = Some(Instant::now());
        let (written, result) = out.write(&lines, &opts);
        if let Some(tail) = written.checked_sub(1).map(|i| &batch[i]) {
            last = tail.entry.id;
            let chain = tail.chain.clone().unwrap_or_default();
            if let Some(r) = resume.as_mut() {
                r.save(last, &chain);
            }
            *lock(&status.exported) = Some((last, chain));
        }
        // Cleared under the lock the watchdog marks under (see `watchdog`).
        let mut since = lock(&status.writing_since);
        *since = None;
        match result {
            Ok(()) => {
                status.set_failed(None);
                drop(since);
            }
            Err(e) => {
                status.set_failed(Some(e.to_string()));
                drop(since);
                if status.stopping() {
                    return;
                }
                std::thread::sleep(RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditEntry, SqliteStore};

    fn entry(i: usize) -> AuditEntry {
        AuditEntry {
            actor: format!("c{i}"),
            action: "secret.read".into(),
            allowed: true,
            ..Default::default()
        }
    }

    fn wait(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("not within 10 s");
    }

    #[test]
    fn a_damaged_resume_record_refuses_the_start_and_a_missing_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("sink.resume");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
        store.append_audit(&[entry(0)]).unwrap();
        let opts = SinkOptions {
            target: SinkTarget::Stdout,
            max_size: 2000,
            keep: 1,
            stall: DEFAULT_STALL,
            resume_file: Some(record.clone()),
        };
        // No record: starts at the head.
        let resume = Resume::new(record.clone(), &opts.target);
        assert!(resume.load().unwrap().is_none());
        // A record saved is read back.
        let mut resume = resume;
        resume.save(1, b"chain");
        assert_eq!(resume.load().unwrap(), Some((1, b"chain".to_vec())));
        // A torn record refuses the start, naming the file.
        std::fs::write(&record, b"{\"target\":\"-\",\"id\":").unwrap();
        let Err(e) = start(&store, opts.clone()) else {
            panic!("a damaged record must refuse the start")
        };
        let e = e.to_string();
        assert!(e.contains(&record.display().to_string()), "{e}");
        assert!(e.contains("delete it"), "{e}");
        // So does one that cannot be read.
        std::fs::remove_file(&record).unwrap();
        std::fs::create_dir(&record).unwrap();
        let Err(e) = start(&store, opts) else {
            panic!("a damaged record must refuse the start")
        };
        let e = e.to_string();
        assert!(e.contains(&record.display().to_string()), "{e}");
    }

    #[test]
    fn lines_carry_the_chain_rotate_by_size_and_resume_after_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
        for i in 0..5 {
            store.append_audit(&[entry(i)]).unwrap();
        }
        let opts = SinkOptions {
            target: SinkTarget::File(path.clone()),
            max_size: 2000,
            keep: 2,
            stall: DEFAULT_STALL,
            resume_file: None,
        };
        let (status, _t) = start(&store, opts.clone()).unwrap();
        wait(|| status.exported().is_some_and(|(id, _)| id == 5));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let db = store.audit_after(0, 10).unwrap();
        assert_eq!(lines.len(), 5);
        for (l, c) in lines.iter().zip(&db) {
            assert_eq!(l["id"], c.entry.id);
            assert_eq!(l["chain"], hex::encode(c.chain.as_ref().unwrap()));
            assert_eq!(l["prev"], hex::encode(&c.prev));
        }
        // Many more: rotated, two old files kept, nothing lost in between.
        for i in 0..60 {
            store.append_audit(&[entry(i)]).unwrap();
        }
        wait(|| status.exported().is_some_and(|(id, _)| id == 65));
        assert!(rotated(&path, 2).exists() && !rotated(&path, 3).exists());
        let mut ids = Vec::new();
        for p in [rotated(&path, 2), rotated(&path, 1), path.clone()] {
            assert!(std::fs::metadata(&p).unwrap().len() <= 2000);
            for l in std::fs::read_to_string(&p).unwrap().lines() {
                ids.push(
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                        .as_u64()
                        .unwrap(),
                );
            }
        }
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        assert_eq!(*ids.last().unwrap(), 65);
        // Resumes after its last line; a partial line is cut off.
        drop(_t);
        let before = std::fs::read_to_string(&path).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"id\":")
            .unwrap();
        assert_eq!(last_line(&path).unwrap().unwrap().0, 65);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    }

    #[test]
    fn a_sink_ahead_of_the_database_or_another_chain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
        store.append_audit(&[entry(1)]).unwrap();
        let opts = SinkOptions {
            target: SinkTarget::File(path.clone()),
            max_size: DEFAULT_MAX_SIZE,
            keep: 1,
            stall: DEFAULT_STALL,
            resume_file: None,
        };
        std::fs::write(&path, "{\"id\":7,\"chain\":\"00\"}\n").unwrap();
        let err = start(&store, opts.clone()).unwrap_err().to_string();
        assert!(
            err.contains("entry 7") && err.contains("tail was deleted"),
            "{err}"
        );
        std::fs::write(&path, "{\"id\":1,\"chain\":\"00\"}\n").unwrap();
        let err = start(&store, opts.clone()).unwrap_err().to_string();
        assert!(err.contains("rewritten"), "{err}");
        std::os::unix::fs::symlink("/dev/null", dir.path().join("link")).unwrap();
        let err = start(
            &store,
            SinkOptions {
                target: SinkTarget::File(dir.path().join("link")),
                ..opts
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_sink_that_cannot_write_fails_and_catches_up() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
        let opts = SinkOptions {
            target: SinkTarget::File("/dev/full".into()),
            max_size: DEFAULT_MAX_SIZE,
            keep: 1,
            stall: DEFAULT_STALL,
            resume_file: None,
        };
        let (status, _t) = start(&store, opts).unwrap();
        let mut serving = status.serving();
        assert!(status.refusal().is_none());
        store.append_audit(&[entry(1)]).unwrap();
        wait(|| status.refusal().is_some());
        let why = status.refusal().unwrap();
        assert!(
            why.contains("/dev/full") && why.contains("refused"),
            "{why}"
        );
        assert!(!*serving.borrow_and_update());
    }
}
