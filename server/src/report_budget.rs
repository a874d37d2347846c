//! How much a client may write into the audit log of its own accord.
//!
//! `Secrets.ReportRefusals` lets any workload identity add audit entries (a
//! mount reports the callers its check refused). Unbounded, that is a way to
//! flood the log and the disk. Each client gets a budget per minute and per
//! hour, and all clients together one per hour; what goes over is counted,
//! and the count is recorded once the client is back within its budget, so
//! the log still says that something was dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One client's entries per minute and per hour; all clients' per hour.
pub const PER_MINUTE: u32 = 120;
pub const PER_HOUR: u32 = 1_200;
pub const ALL_PER_HOUR: u32 = 20_000;

/// A fixed window: `used` of `limit` since `start`.
#[derive(Clone, Copy)]
struct Window {
    length: Duration,
    limit: u32,
    start: Instant,
    used: u32,
}

impl Window {
    fn new(length: Duration, limit: u32, now: Instant) -> Window {
        Window {
            length,
            limit,
            start: now,
            used: 0,
        }
    }

    /// Starts a new window when this one is over; true when it did.
    fn roll(&mut self, now: Instant) -> bool {
        let over = self.is_over(now);
        if over {
            self.start = now;
            self.used = 0;
        }
        over
    }

    fn is_over(&self, now: Instant) -> bool {
        now.duration_since(self.start) >= self.length
    }

    fn left(&mut self, now: Instant) -> u32 {
        self.roll(now);
        self.limit - self.used
    }
}

/// How often a map of per-client windows is swept for clients whose hour
/// is over: a sweep walks every remembered client under the budget's one
/// lock, so it is not done on every call.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// When a map was last swept.
struct Sweep {
    last: Instant,
}

impl Sweep {
    fn new(now: Instant) -> Sweep {
        Sweep { last: now }
    }

    /// Whether to sweep now (at most once a [`SWEEP_EVERY`]).
    fn due(&mut self, now: Instant) -> bool {
        let due = now.duration_since(self.last) >= SWEEP_EVERY;
        if due {
            self.last = now;
        }
        due
    }
}

struct ClientBudget {
    minute: Window,
    hour: Window,
    /// Entries refused since the last accepted report.
    dropped: u64,
}

/// What a report may record.
#[derive(Debug, PartialEq, Eq)]
pub struct Grant {
    /// How many of the report's entries to record (the first ones).
    pub accept: usize,
    /// Entries dropped earlier for this client and not yet mentioned in
    /// the log (recorded now, as one entry, when `accept > 0`).
    pub dropped_before: u64,
}

pub struct ReportBudget {
    inner: Mutex<ReportState>,
}

struct ReportState {
    clients: HashMap<String, ClientBudget>,
    all: Window,
    sweep: Sweep,
}

impl Default for ReportBudget {
    fn default() -> Self {
        let now = Instant::now();
        ReportBudget {
            inner: Mutex::new(ReportState {
                clients: HashMap::new(),
                all: Window::new(Duration::from_secs(3600), ALL_PER_HOUR, now),
                sweep: Sweep::new(now),
            }),
        }
    }
}

impl ReportBudget {
    /// Takes up to `wanted` entries from `client`'s budget.
    pub fn take(&self, client: &str, wanted: usize) -> Grant {
        self.take_at(client, wanted, Instant::now())
    }

    fn take_at(&self, client: &str, wanted: usize, now: Instant) -> Grant {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let ReportState {
            clients,
            all,
            sweep,
        } = &mut *guard;
        // A client that has not reported for an hour starts afresh (its
        // windows roll over when it next reports); forgetting it keeps the
        // map from growing with every client ever seen.
        if sweep.due(now) {
            clients.retain(|_, b| !b.hour.is_over(now) || b.dropped > 0);
        }
        let b = clients
            .entry(client.to_owned())
            .or_insert_with(|| ClientBudget {
                minute: Window::new(Duration::from_secs(60), PER_MINUTE, now),
                hour: Window::new(Duration::from_secs(3600), PER_HOUR, now),
                dropped: 0,
            });
        let room = b.minute.left(now).min(b.hour.left(now)).min(all.left(now)) as usize;
        let accept = wanted.min(room);
        b.minute.used += accept as u32;
        b.hour.used += accept as u32;
        all.used += accept as u32;
        let dropped_before = if accept > 0 {
            std::mem::take(&mut b.dropped)
        } else {
            0
        };
        b.dropped += (wanted - accept) as u64;
        Grant {
            accept,
            dropped_before,
        }
    }
}

/// Certificates a client may issue itself (`RenewCertificate`) per hour.
/// Each renewal adds a pinned serial and an audit entry, so a client (or
/// a stolen certificate) must not be able to renew in a loop; a mount
/// renews about once per two thirds of a lifetime of at least a day.
pub const RENEW_PER_HOUR: u32 = 10;

pub struct RenewBudget {
    inner: Mutex<RenewState>,
}

struct RenewState {
    /// Each client's hour, and whether a refusal in it was recorded.
    clients: HashMap<String, (Window, bool)>,
    sweep: Sweep,
}

impl Default for RenewBudget {
    fn default() -> Self {
        RenewBudget {
            inner: Mutex::new(RenewState {
                clients: HashMap::new(),
                sweep: Sweep::new(Instant::now()),
            }),
        }
    }
}

/// What taking a renewal from a client's budget gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    Granted,
    /// None left, and the first refusal of this hour: record it.
    RefusedFirst,
    /// None left, and a refusal of this hour was already recorded.
    Refused,
}

impl RenewBudget {
    /// Takes one renewal from `client`'s hour.
    pub fn take(&self, client: &str) -> Take {
        self.take_at(client, Instant::now())
    }

    fn take_at(&self, client: &str, now: Instant) -> Take {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let RenewState { clients, sweep } = &mut *guard;
        // Only clients that renewed within the hour need remembering.
        if sweep.due(now) {
            clients.retain(|_, (w, _)| !w.is_over(now));
        }
        let (w, noted) = clients.entry(client.to_owned()).or_insert_with(|| {
            (
                Window::new(Duration::from_secs(3600), RENEW_PER_HOUR, now),
                false,
            )
        });
        if w.roll(now) {
            // A new hour: its first refusal is recorded again.
            *noted = false;
        }
        if w.left(now) == 0 {
            return if std::mem::replace(noted, true) {
                Take::Refused
            } else {
                Take::RefusedFirst
            };
        }
        w.used += 1;
        Take::Granted
    }
}

/// Refused TLS handshakes recorded per peer address per minute, and from
/// all peers per minute and per hour. A handshake refusal comes from
/// anyone who can reach the port, so the budget is small and its memory
/// bounded: the per-peer counts are forgotten every minute (at most
/// `TLS_PER_MINUTE` peers are remembered), and what goes over is one
/// counter, recorded as one entry once there is room again.
pub const TLS_PER_PEER_MINUTE: u32 = 10;
pub const TLS_PER_MINUTE: u32 = 60;
pub const TLS_PER_HOUR: u32 = 600;

pub struct HandshakeBudget {
    inner: Mutex<HandshakeState>,
}

struct HandshakeState {
    minute: Window,
    hour: Window,
    peers: HashMap<std::net::IpAddr, u32>,
    dropped: u64,
}

impl Default for HandshakeBudget {
    fn default() -> Self {
        let now = Instant::now();
        HandshakeBudget {
            inner: Mutex::new(HandshakeState {
                minute: Window::new(Duration::from_secs(60), TLS_PER_MINUTE, now),
                hour: Window::new(Duration::from_secs(3600), TLS_PER_HOUR, now),
                peers: HashMap::new(),
                dropped: 0,
            }),
        }
    }
}

impl HandshakeBudget {
    /// Whether a refusal from `peer` may be recorded; when it may, also
    /// how many earlier ones were not (to be recorded with it).
    pub fn take(&self, peer: std::net::IpAddr) -> Option<u64> {
        self.take_at(peer, Instant::now())
    }

    fn take_at(&self, peer: std::net::IpAddr, now: Instant) -> Option<u64> {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let minute_start = s.minute.start;
        let room = s.minute.left(now).min(s.hour.left(now));
        if s.minute.start != minute_start {
            s.peers.clear();
        }
        let from_peer = s.peers.get(&peer).copied().unwrap_or(0);
        if room == 0 || from_peer >= TLS_PER_PEER_MINUTE {
            s.dropped += 1;
            return None;
        }
        s.minute.used += 1;
        s.hour.used += 1;
        *s.peers.entry(peer).or_insert(0) += 1;
        Some(std::mem::take(&mut s.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_are_bounded_per_client_and_hour() {
        let b = RenewBudget::default();
        let t0 = Instant::now();
        for _ in 0..RENEW_PER_HOUR {
            assert_eq!(b.take_at("web", t0), Take::Granted);
        }
        assert_eq!(b.take_at("web", t0), Take::RefusedFirst);
        assert_eq!(b.take_at("web", t0), Take::Refused, "recorded once an hour");
        assert_eq!(
            b.take_at("api", t0),
            Take::Granted,
            "each client has its own"
        );
        assert_eq!(
            b.take_at("web", t0 + Duration::from_secs(3601)),
            Take::Granted
        );
    }

    #[test]
    fn a_refusal_is_recorded_again_in_the_next_hour_between_sweeps() {
        let b = RenewBudget::default();
        let t0 = Instant::now();
        for _ in 0..RENEW_PER_HOUR {
            assert_eq!(b.take_at("web", t0), Take::Granted);
        }
        assert_eq!(b.take_at("web", t0), Take::RefusedFirst);
        // A sweep just before web's hour ends keeps it; the next hour
        // begins before the next sweep.
        let swept = t0 + Duration::from_secs(3600) - SWEEP_EVERY / 2;
        assert_eq!(b.take_at("api", swept), Take::Granted);
        let t1 = t0 + Duration::from_secs(3601);
        for _ in 0..RENEW_PER_HOUR {
            assert_eq!(b.take_at("web", t1), Take::Granted);
        }
        assert_eq!(b.take_at("web", t1), Take::RefusedFirst);
    }

    #[test]
    fn idle_clients_are_forgotten_by_a_sweep_not_on_every_call() {
        let renew = RenewBudget::default();
        let report = ReportBudget::default();
        let t0 = Instant::now();
        for c in 0..100 {
            renew.take_at(&format!("c{c}"), t0);
            report.take_at(&format!("c{c}"), 1, t0);
        }
        let sizes = || {
            (
                renew.inner.lock().unwrap().clients.len(),
                report.inner.lock().unwrap().clients.len(),
            )
        };
        let t1 = t0 + Duration::from_secs(3601);
        renew.take_at("web", t1);
        report.take_at("web", 1, t1);
        assert_eq!(sizes(), (1, 1), "swept once their hour was over");
        for c in 0..100 {
            renew.take_at(&format!("d{c}"), t1);
            report.take_at(&format!("d{c}"), 1, t1);
        }
        let t2 = t1 + Duration::from_secs(3601);
        renew.take_at("web", t2);
        report.take_at("web", 1, t2);
        let t3 = t2 + SWEEP_EVERY / 2;
        renew.take_at("web", t3);
        report.take_at("web", 1, t3);
        assert_eq!(sizes(), (1, 1));
        renew.take_at("x", t3);
        report.take_at("x", 1, t3);
        assert_eq!(sizes(), (2, 2), "no sweep within a minute of the last");
    }

    #[test]
    fn handshake_refusals_are_bounded_per_peer_and_in_all() {
        let b = HandshakeBudget::default();
        let t0 = Instant::now();
        let ip = |n: u8| std::net::IpAddr::from([10, 0, 0, n]);
        for _ in 0..TLS_PER_PEER_MINUTE {
            assert_eq!(b.take_at(ip(1), t0), Some(0));
        }
        assert_eq!(b.take_at(ip(1), t0), None, "one peer's minute is spent");
        // Another peer records, and owns up to the one dropped before.
        assert_eq!(b.take_at(ip(2), t0), Some(1));
        let mut recorded = TLS_PER_PEER_MINUTE + 1;
        for n in 3..=250 {
            recorded += b.take_at(ip(n), t0).is_some() as u32;
        }
        assert_eq!(recorded, TLS_PER_MINUTE, "all peers share one minute");
        assert!(b.inner.lock().unwrap().peers.len() <= TLS_PER_MINUTE as usize);
        // The next minute, the first peer may record again.
        let t1 = t0 + Duration::from_secs(61);
        assert!(b.take_at(ip(1), t1).unwrap() > 0);
        let mut hour = 0;
        for m in 1..60u64 {
            for n in 0..=255 {
                hour += b
                    .take_at(ip(n), t0 + Duration::from_secs(60 * m + 1))
                    .is_some() as u32;
            }
        }
        assert!(hour < TLS_PER_HOUR, "the hour bounds them all: {hour}");
    }

    #[test]
    fn a_client_gets_its_minute_then_is_counted_not_recorded() {
        let budget = ReportBudget::default();
        let t0 = Instant::now();
        let g = budget.take_at("web", 100, t0);
        assert_eq!(g.accept, 100);
        let g = budget.take_at("web", 100, t0);
        assert_eq!(g.accept, (PER_MINUTE - 100) as usize);
        assert_eq!(budget.take_at("web", 10, t0).accept, 0);
        // Another client has its own budget.
        assert_eq!(budget.take_at("api", 5, t0).accept, 5);
        // A minute later: room again, and the drops are owned up to once.
        let t1 = t0 + Duration::from_secs(61);
        let g = budget.take_at("web", 1, t1);
        assert_eq!(
            g,
            Grant {
                accept: 1,
                dropped_before: 100 - (PER_MINUTE as u64 - 100) + 10
            }
        );
        assert_eq!(budget.take_at("web", 1, t1).dropped_before, 0);
    }

    #[test]
    fn the_hour_bounds_a_client_that_keeps_to_its_minutes() {
        let budget = ReportBudget::default();
        let t0 = Instant::now();
        let mut total = 0;
        for minute in 0..60 {
            let at = t0 + Duration::from_secs(60 * minute + 1);
            total += budget.take_at("web", 1_000, at).accept;
        }
        assert_eq!(total, PER_HOUR as usize);
    }

    #[test]
    fn all_clients_together_are_bounded() {
        let budget = ReportBudget::default();
        let t0 = Instant::now();
        let mut total = 0;
        for c in 0..1_000 {
            total += budget.take_at(&format!("c{c}"), 1_000, t0).accept;
        }
        assert_eq!(total, ALL_PER_HOUR as usize);
    }
}
