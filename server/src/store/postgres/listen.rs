//! The feed of a database shared by replicas: this replica's own changes,
//! published at once, and every other replica's, heard through PostgreSQL's
//! `LISTEN` on [`notify::CHANNEL`].
//!
//! Revisions are one gapless sequence across replicas and notifications
//! arrive in commit order, so the listener knows its position: the last
//! revision it delivered. A notification at the next revision is delivered
//! (unless this replica already published it itself: the local fast path
//! comes first, and subscribers must not see a change twice); one further
//! on means something was missed, and so does a payload this version does
//! not know or a connection that dropped: subscribers then get
//! [`Change::Resync`], which voids every cache and makes every Watch
//! recompute its view, so a missed notification can never lose a change.
//!
//! A local publish can overtake another replica's notification (this
//! replica's revision 10 published before 9 from elsewhere is heard), so the
//! position is not a high-water mark alone: the revisions published here
//! above it are kept until the listener passes them.
//!
//! The listener is a thread with a blocking client of its own (it never
//! runs on the async threads). It reconnects by itself with a bounded
//! backoff, logs the drop once and the recovery once, and ends when the
//! feed is dropped.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::broadcast;

use super::{notify, PgConfig};
use crate::store::{Change, ChangeFeed, Result, StoreError};

/// The `application_name` of the listener's connection (what an operator
/// sees in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "secretfs-listen";

/// First wait before reconnecting, doubled after each failure up to
/// [`BACKOFF_CAP`].
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// How often the listener looks whether the feed was dropped.
const TICK: Duration = Duration::from_millis(200);
/// After this long without a word from the server, the connection is
/// checked with a round trip (a silently dead peer sends no error).
const PING_AFTER: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Revisions published here and not yet heard back are few (the listener
/// is normally milliseconds behind); past this many, something is wrong
/// with the listener and the oldest are forgotten (a later gap or
/// reconnection resyncs anyway).
const MAX_LOCAL: usize = 100_000;

/// Where the listener connects.
pub struct Source {
    /// A new connection to the database (the store's own connect, with its
    /// TLS and password).
    pub connect: Box<dyn Fn() -> Result<postgres::Client> + Send>,
    /// What to call the database in logs (the URL without its password).
    pub describe: String,
}

/// The [`ChangeFeed`] of a PostgreSQL store.
pub struct PgFeed {
    shared: Arc<Shared>,
}

struct Shared {
    changes: broadcast::Sender<Change>,
    position: Mutex<Position>,
    connected: AtomicBool,
}

impl std::fmt::Debug for PgFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgFeed")
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

impl PgFeed {
    /// Connects the listener (an error here is an error at start: the
    /// store cannot follow other replicas without it), then keeps it
    /// listening on a thread of its own. `revision_now` is the revision the
    /// store read when it opened: if the database moved on before the
    /// listener was in place, subscribers get a Resync.
    pub fn start(source: Source, revision_now: u64) -> Result<Arc<PgFeed>> {
        // Large enough to ride out bursts; a watcher further behind resyncs.
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            changes,
            position: Mutex::new(Position::new(revision_now)),
            connected: AtomicBool::new(false),
        });
        let (client, current) = session(&source)?;
        shared.send(|p| p.connected(current, false));
        shared.connected.store(true, Ordering::SeqCst);
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("secretfs-pg-listen".into())
            .spawn(move || listen(weak, source, client))
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        Ok(Arc::new(PgFeed { shared }))
    }

    /// The feed of the store on `cfg` (its connections, TLS and password),
    /// whose revision was `revision_now` when it opened.
    pub fn for_store(cfg: &PgConfig, revision_now: u64) -> Result<Arc<PgFeed>> {
        let conn_cfg = cfg.clone();
        PgFeed::start(
            Source {
                connect: Box::new(move || super::conn::connect(&conn_cfg)),
                describe: cfg.redacted().to_string(),
            },
            revision_now,
        )
    }
}

impl ChangeFeed for PgFeed {
    fn publish(&self, change: Change) {
        self.shared.send(|p| p.published(change));
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.shared.changes.subscribe()
    }

    /// Whether the listener is connected now: while it is not, other
    /// replicas' changes are not heard here (they are caught up with a
    /// Resync when it is back).
    fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }
}

impl Shared {
    /// Decides under the lock and sends under it too, so the two paths
    /// (local publish, listener) never decide on a stale position.
    fn send(&self, decide: impl FnOnce(&mut Position) -> Option<Change>) {
        let mut position = self.position.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(change) = decide(&mut position) {
            // No receivers is fine: nobody is watching.
            let _ = self.changes.send(change);
        }
    }
}

/// What has been delivered: every revision up to `heard`, and those in
/// `local` above it.
#[derive(Debug)]
struct Position {
    heard: u64,
    local: BTreeSet<u64>,
}

impl Position {
    fn new(revision: u64) -> Position {
        Position {
            heard: revision,
            local: BTreeSet::new(),
        }
    }

    /// This replica committed `change`: deliver it now, unless the
    /// listener already did.
    fn published(&mut self, change: Change) -> Option<Change> {
        let revision = change.revision();
        if matches!(change, Change::Resync { .. }) {
            return Some(change);
        }
        if revision <= self.heard || !self.local.insert(revision) {
            return None;
        }
        if self.local.len() > MAX_LOCAL {
            self.local.pop_first();
        }
        Some(change)
    }

    /// The listener heard `payload`.
    fn heard(&mut self, payload: &str) -> Option<Change> {
        let Some(change) = notify::parse(payload) else {
            // A newer replica's kind of change: its revision, when it can
            // be read, still counts.
            let revision = payload
                .split(' ')
                .next()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            return Some(self.resync(revision.max(self.heard)));
        };
        let revision = change.revision();
        match change {
            Change::Resync { .. } => Some(self.resync(revision.max(self.heard))),
            _ if revision <= self.heard => None,
            _ if revision == self.heard + 1 => {
                self.heard = revision;
                (!self.local.remove(&revision)).then_some(change)
            }
            // A gap: a notification was missed.
            _ => Some(self.resync(revision)),
        }
    }

    /// The listener (re)connected and read the database's revision,
    /// `current`. After a dropped connection anything may have been
    /// missed; on the first connection, what committed before it.
    fn connected(&mut self, current: u64, after_drop: bool) -> Option<Change> {
        if after_drop || current != self.heard {
            if current < self.heard {
                // The database went back (restored): what was published
                // here above it means nothing now.
                self.local.clear();
            }
            Some(self.resync(current))
        } else {
            None
        }
    }

    fn resync(&mut self, revision: u64) -> Change {
        self.heard = revision;
        self.local.retain(|r| *r > revision);
        Change::Resync { revision }
    }
}

/// Connects, listens, and reads the revision, in that order: a change
/// committed after the read is notified, one before it is in the revision.
fn session(source: &Source) -> Result<(postgres::Client, u64)> {
    let mut client = (source.connect)()?;
    client
        .batch_execute(&format!(
            "SET application_name = '{APPLICATION_NAME}'; LISTEN {}",
            notify::CHANNEL
        ))
        .map_err(|e| unavailable("cannot listen for changes", &e))?;
    let current = client
        .query_one("SELECT value FROM revision WHERE id = 1", &[])
        .map(|r| r.get::<_, i64>(0) as u64)
        .map_err(|e| unavailable("cannot read the database's revision", &e))?;
    Ok((client, current))
}

fn unavailable(what: &str, e: &postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("{what}: {}", super::conn::describe(e)))
}

/// Why a listening session ended.
enum End {
    /// The feed was dropped.
    Stopped,
    /// The connection failed; the listener reconnects.
    Lost(String),
}

/// The listener thread: listens on `client`, and on a new connection
/// whenever that one is lost, until the feed is dropped.
fn listen(feed: Weak<Shared>, source: Source, mut client: postgres::Client) {
    loop {
        let why = match serve(&feed, &mut client) {
            End::Stopped => return,
            End::Lost(why) => why,
        };
        drop(client);
        match feed.upgrade() {
            Some(shared) => shared.connected.store(false, Ordering::SeqCst),
            None => return,
        }
        tracing::warn!(
            database = %source.describe,
            cause = %why,
            "lost the connection that hears other replicas' changes; reconnecting"
        );
        let mut backoff = BACKOFF_START;
        let mut last_error = String::new();
        client = loop {
            if !wait(&feed, backoff) {
                return;
            }
            match session(&source) {
                Ok((client, current)) => {
                    let Some(shared) = feed.upgrade() else {
                        return;
                    };
                    shared.send(|p| p.connected(current, true));
                    shared.connected.store(true, Ordering::SeqCst);
                    tracing::info!(
                        database = %source.describe,
                        revision = current,
                        "hearing other replicas' changes again (caches and watches resynced)"
                    );
                    break client;
                }
                Err(e) => {
                    let e = e.to_string();
                    if e != last_error {
                        tracing::debug!(database = %source.describe, error = %e, "listener reconnect failed");
                        last_error = e;
                    }
                    backoff = (backoff * 2).min(BACKOFF_CAP);
                }
            }
        };
    }
}

/// Delivers what `client` hears until the feed is dropped or the
/// connection fails.
fn serve(feed: &Weak<Shared>, client: &mut postgres::Client) -> End {
    let mut last_word = Instant::now();
    loop {
        let next = client.notifications().timeout_iter(TICK).next();
        match next {
            Ok(Some(n)) => {
                last_word = Instant::now();
                if n.channel() != notify::CHANNEL {
                    continue;
                }
                let Some(shared) = feed.upgrade() else {
                    return End::Stopped;
                };
                shared.send(|p| p.heard(n.payload()));
            }
            Ok(None) => {
                if feed.strong_count() == 0 {
                    return End::Stopped;
                }
                // The iterator also ends when the connection closed.
                if client.is_closed() {
                    return End::Lost("the server closed the connection".into());
                }
                if last_word.elapsed() >= PING_AFTER {
                    if let Err(e) = client.is_valid(PING_TIMEOUT) {
                        return End::Lost(format!("no answer: {}", super::conn::describe(&e)));
                    }
                    last_word = Instant::now();
                }
            }
            Err(e) => return End::Lost(super::conn::describe(&e)),
        }
    }
}

/// Sleeps `d` in ticks; false when the feed was dropped meanwhile.
fn wait(feed: &Weak<Shared>, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if feed.strong_count() == 0 {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(TICK));
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod replicas;
