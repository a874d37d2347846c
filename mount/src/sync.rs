//! The gRPC side: one `Secrets.Watch` stream kept open, its events checked
//! and applied to the [`Mirror`], each result sent on as a [`SyncEvent`] for
//! the updater.
//!
//! [`live_loop`] owns the connection after the first sync:
//! - a broken stream, an unreachable server (a transport failure, or
//!   UNAVAILABLE), a server error (INTERNAL, RESOURCE_EXHAUSTED, ...: any
//!   code but the four below) or a refused event (out of order, malformed;
//!   nothing of it was applied): that endpoint's failure. Move at once to
//!   the next endpoint that has not failed since the last success
//!   ([`Endpoints`]: several `--server`s, a name's several addresses) and
//!   tell the updater a move is under way ([`SyncEvent::Moving`]: the
//!   `--max-stale` clock starts; the outage is reported if no server serves
//!   within [`crate::updater::MOVE_GRACE`]). When every one has failed,
//!   report the outage, resolve the names again (bounded) and reconnect
//!   from the first after a jittered backoff (first retry 50-100 ms,
//!   doubling, capped at 3 s). Either way the new stream resumes from what
//!   is held (the server sends only what changed meanwhile), and the files
//!   stay as they are until it has;
//! - NOT_FOUND or INVALID_ARGUMENT: reported, retried on the same endpoint
//!   (another replica would answer the same);
//! - the server refuses the client (removed, disabled): report it (the mount
//!   empties), forget everything, retry slowly;
//! - every `refresh`: a from-scratch stream (the whole view again), the
//!   safety net against any drift between what the server thinks we hold
//!   and what we hold;
//! - the certificate or key files change: a new channel, a new stream;
//! - the certificate is at 2/3 of its life: renew it ([`crate::renewal`]),
//!   then a new channel and a new stream as above.

use std::path::Path;
use std::time::Duration;

use secretfs_proto::channel::{error_chain, ConnectFailure, KeepAlive};
use secretfs_proto::credentials::{key_matches, FileContents};
use secretfs_proto::files::ReplaceError;
use secretfs_proto::servers::{Endpoints, Target};
use secretfs_proto::v1::secrets_client::SecretsClient;
use secretfs_proto::v1::{
    Empty, RenewCertificateRequest, ReportRefusalsRequest, WatchEvent, WatchRequest,
};
use secretfs_proto::ConnectConfig;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::backoff::Backoff;
use crate::credentials::{CredentialWatch, Pair};
use crate::renewal::{self, Schedule};
use crate::snapshot::Snapshot;
use crate::watch::{EventError, Mirror};
use secretfs_proto::cert::{rfc3339, CertInfo};

/// How long one RPC (or a stream's first event) may take before we call the
/// server unreachable: the channel's call timeout
/// ([`secretfs_proto::connect_with_call_timeout`]), and the wait for a
/// Watch's initial event.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// One message: a server that does not split changes sends a client's
/// whole view in its initial event (the parts of a split one are bounded
/// together by `MAX_CHANGE`).
const MAX_REPLY: usize = crate::watch::MAX_CHANGE;
/// Reconnect delays while the server is unreachable.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_CAP: Duration = Duration::from_secs(3);
/// Reconnect delays while the server refuses this client: it may be added
/// back or get a new certificate, but not within milliseconds.
const REFUSED_FIRST: Duration = Duration::from_secs(10);
const REFUSED_CAP: Duration = Duration::from_secs(30);
/// How often the certificate and key files are read for changes.
const CREDENTIAL_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncError {
    /// No answer: network, TLS or server down. Keep serving; retry later.
    Unreachable(String),
    /// As `Unreachable`, with certificate trouble as the cause: at start,
    /// waiting will not fix it.
    TlsRefused(String),
    /// The server answered that this client may not read (unknown,
    /// disabled or removed). Its message is passed through.
    Refused(String),
    /// NOT_FOUND or INVALID_ARGUMENT: another replica would answer the same.
    Failed(String),
    /// The server failed (INTERNAL, RESOURCE_EXHAUSTED, ...): that server's
    /// trouble, another may serve.
    Faulty(String),
    /// The server sent an event we could not accept; nothing of it was
    /// applied.
    BadEvent(EventError),
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Unreachable(r) | SyncError::TlsRefused(r) => {
                write!(f, "server unreachable: {r}")
            }
            SyncError::Refused(m) => write!(f, "server refused this client: {m}"),
            SyncError::Failed(m) => write!(f, "sync failed: {m}"),
            SyncError::Faulty(m) => write!(f, "server error: {m}"),
            SyncError::BadEvent(e) => {
                write!(f, "refused an event from the server ({e}); resyncing")
            }
        }
    }
}

fn classify(status: tonic::Status) -> SyncError {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            SyncError::Refused(status.message().to_owned())
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            if ConnectFailure::classify(&status).is_tls() {
                SyncError::TlsRefused(error_chain(&status))
            } else {
                SyncError::Unreachable(error_chain(&status))
            }
        }
        Code::NotFound | Code::InvalidArgument => {
            SyncError::Failed(format!("{:?}: {}", status.code(), status.message()))
        }
        _ => SyncError::Faulty(format!("{:?}: {}", status.code(), status.message())),
    }
}

impl SyncError {
    /// That endpoint's failure: another may do better, so move on. Never
    /// for an answer every replica would give (the client refused, not
    /// found, a bad request).
    pub fn moves_on(&self) -> bool {
        matches!(
            self,
            SyncError::Unreachable(_)
                | SyncError::TlsRefused(_)
                | SyncError::Faulty(_)
                | SyncError::BadEvent(_)
        )
    }
}

/// What the sync task reports.
pub enum SyncEvent {
    /// An event was applied: show this snapshot.
    Synced {
        snapshot: Snapshot,
        revision: u64,
    },
    Error(SyncError),
    /// The server in use failed (why) and the loop is moving to the next:
    /// not yet an outage, but the `--max-stale` clock starts.
    Moving(SyncError),
    /// Events now come from this endpoint (at start, and after a move).
    Serving(String),
    /// A new client certificate is in use (renewed, or new files).
    Certificate(CertInfo),
}

#[derive(Clone)]
pub struct SecretsSource {
    client: SecretsClient<Channel>,
}

impl SecretsSource {
    pub fn new(channel: Channel) -> SecretsSource {
        SecretsSource {
            client: SecretsClient::new(channel).max_decoding_message_size(MAX_REPLY),
        }
    }

    /// The client's name as the server sees it.
    pub async fn whoami(&mut self) -> Result<String, SyncError> {
        let resp = self.client.who_am_i(Empty {}).await.map_err(classify)?;
        Ok(resp.into_inner().client)
    }

    /// Asks for a new certificate for the key behind `csr_pem`.
    pub async fn renew_certificate(
        &mut self,
        csr_pem: String,
        days: u32,
    ) -> Result<secretfs_proto::v1::RenewCertificateResponse, tonic::Status> {
        let req = RenewCertificateRequest { csr_pem, days };
        Ok(self.client.renew_certificate(req).await?.into_inner())
    }

    /// Sends the caller check's refusals to the server's audit log.
    pub async fn report_refusals(
        &mut self,
        refusals: Vec<secretfs_proto::v1::Refusal>,
    ) -> Result<(), tonic::Status> {
        let req = ReportRefusalsRequest { refusals };
        self.client.report_refusals(req).await.map(drop)
    }

    /// Opens a Watch stream. The channel's call timeout bounds the wait
    /// for the answer, not the stream after it.
    pub async fn watch(&mut self, req: WatchRequest) -> Result<Streaming<WatchEvent>, SyncError> {
        self.client
            .watch(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(classify)
    }

    /// Opens a from-scratch stream and applies its initial event: the first
    /// sync. Returns the open stream for [`live_loop`].
    pub async fn first_sync(
        &mut self,
        mirror: &mut Mirror,
    ) -> Result<(Streaming<WatchEvent>, Snapshot), SyncError> {
        let mut stream = self.watch(mirror.request(true)).await?;
        let mut initial = InitialEvent::awaited();
        loop {
            let step = match initial.next(&mut stream).await {
                Ok(msg) => step(mirror, msg),
                Err(e) => Step::Stop(e),
            };
            match step {
                Step::Applied(snapshot, _) => return Ok((stream, snapshot)),
                Step::Part => initial.progress(),
                Step::Stop(e) => {
                    mirror.closed();
                    return Err(e);
                }
            }
        }
    }
}

/// The deadline for a stream's initial event: a stream that opened but
/// never brings it is as good as a dead server. It runs per message: each
/// part of a split initial event is progress. (An idle stream after its
/// initial event is fine: HTTP/2 keep-alive notices a dead connection.)
struct InitialEvent {
    by: Option<Instant>,
}

impl InitialEvent {
    fn awaited() -> InitialEvent {
        InitialEvent {
            by: Some(Instant::now() + RPC_TIMEOUT),
        }
    }

    fn received() -> InitialEvent {
        InitialEvent { by: None }
    }

    /// The stream's next message, or `Unreachable` once the deadline passed.
    async fn next(
        &self,
        stream: &mut Streaming<WatchEvent>,
    ) -> Result<Result<Option<WatchEvent>, tonic::Status>, SyncError> {
        match self.by {
            Some(by) => tokio::time::timeout_at(by, stream.message())
                .await
                .map_err(|_| SyncError::Unreachable("no initial event in time".into())),
            None => Ok(stream.message().await),
        }
    }

    /// A part of the initial event came: the next one has time again.
    fn progress(&mut self) {
        if self.by.is_some() {
            *self = InitialEvent::awaited();
        }
    }
}

/// The outcome of one message from the stream.
enum Step {
    Applied(Snapshot, u64),
    /// A part of a change: more must come before anything is applied.
    Part,
    Stop(SyncError),
}

/// Gives one message to `mirror`: a whole change is applied or nothing.
fn step(mirror: &mut Mirror, msg: Result<Option<WatchEvent>, tonic::Status>) -> Step {
    match msg {
        Ok(Some(event)) => {
            let revision = event.revision;
            match mirror.receive(event) {
                Ok(None) => Step::Part,
                Ok(Some((snapshot, applied))) => {
                    tracing::debug!(
                        revision,
                        upserts = applied.upserts,
                        removals = applied.removals,
                        "applied a watch event"
                    );
                    Step::Applied(snapshot, mirror.revision())
                }
                Err(e) => Step::Stop(SyncError::BadEvent(e)),
            }
        }
        Ok(None) => Step::Stop(SyncError::Unreachable(
            "the server ended the watch stream".into(),
        )),
        Err(status) => Step::Stop(classify(status)),
    }
}

/// Everything the live loop owns.
pub struct Live {
    pub source: SecretsSource,
    pub mirror: Mirror,
    /// The stream the first sync opened.
    pub stream: Option<Streaming<WatchEvent>>,
    /// What the channel was built from; the certificate and key are swapped
    /// when their files change.
    pub connect: ConnectConfig,
    /// The endpoint in use and where to go when it fails.
    pub endpoints: Endpoints,
    /// The endpoint `source` is connected to.
    pub in_use: Target,
    /// The endpoint the last applied event came from (a move is logged once).
    pub serving: Target,
    pub credentials: Option<CredentialWatch>,
    /// Interval of the from-scratch safety-net resync.
    pub refresh: Duration,
    /// The certificate in use and when to renew it (and warn of its
    /// expiry); `None` while no certificate could be read (never renewed).
    /// A new one for every certificate put in use.
    pub renewal: Option<Schedule>,
    /// `--no-renew` not given.
    pub renew: bool,
    /// A renewal in flight: a task of its own, so the Watch stream is read
    /// (rotations applied) while the server answers.
    pub renewing: Option<tokio::task::JoinHandle<Result<Pair, Failure>>>,
    /// The connection in use, for others that call as this client (the
    /// refusal reporter): a clone shares the channel.
    pub connection: tokio::sync::watch::Sender<SecretsSource>,
}

impl Live {
    /// The endpoint in use failed: moves to the next one not tried since
    /// the last success, if any. False when every one has failed.
    fn fail_over(&mut self) -> bool {
        if self.endpoints.failed().is_none() {
            return false;
        }
        self.use_endpoint()
    }

    /// A channel to the endpoint now current, unless it is the one in use
    /// (a lazy channel reconnects by itself). One that cannot be used is
    /// that endpoint's failure: the next is taken. False when every one
    /// has failed.
    fn use_endpoint(&mut self) -> bool {
        loop {
            if *self.endpoints.current() == self.in_use {
                return true;
            }
            match secretfs_proto::connect_lazy_to(
                &self.connect,
                self.endpoints.current(),
                RPC_TIMEOUT,
                KeepAlive::MOUNT,
            ) {
                Ok(channel) => {
                    self.source = SecretsSource::new(channel);
                    self.in_use = self.endpoints.current().clone();
                    let _ = self.connection.send(self.source.clone());
                    return true;
                }
                Err(error) => {
                    tracing::warn!(%error, server = %self.endpoints.current(), "cannot use this server; passing over it");
                    if self.endpoints.failed().is_none() {
                        return false;
                    }
                }
            }
        }
    }

    /// An event from the endpoint in use was applied: every endpoint may
    /// be tried again, and a move is logged (once). True after a move.
    fn serving(&mut self) -> bool {
        self.endpoints.succeeded();
        if self.serving == self.in_use {
            return false;
        }
        tracing::info!(
            server = %self.in_use,
            previous = %self.serving,
            "moved to another server; the secrets are resynced from it"
        );
        self.serving = self.in_use.clone();
        true
    }
}

/// Why a stream was left.
enum Stop {
    /// The updater is gone: shut down.
    Gone,
    /// Reconnect at once (safety-net resync, new credentials).
    Now,
    Failed(SyncError),
}

/// Keeps a Watch open until the receiver goes away (see the module docs).
pub async fn live_loop(mut live: Live, events: mpsc::Sender<SyncEvent>) {
    let mut retry = Backoff::new(RETRY_FIRST, RETRY_CAP);
    let mut refused = Backoff::new(REFUSED_FIRST, REFUSED_CAP);
    let mut next_full = Instant::now() + live.refresh;
    let mut creds = tokio::time::interval(CREDENTIAL_POLL);
    creds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    creds.tick().await; // the first tick is immediate
    loop {
        // The first sync's stream has delivered its initial event already.
        let initial_done = live.stream.is_some();
        let opened = match live.stream.take() {
            Some(s) => Ok(s),
            None => {
                let full = Instant::now() >= next_full;
                if full {
                    tracing::debug!("periodic full resync");
                    next_full = Instant::now() + live.refresh;
                }
                let req = live.mirror.request(full);
                live.source.watch(req).await
            }
        };
        let stop = match opened {
            Ok(mut stream) => {
                follow(
                    &mut live,
                    &mut stream,
                    &events,
                    next_full,
                    initial_done,
                    &mut creds,
                    || {
                        retry.reset();
                        refused.reset();
                    },
                )
                .await
            }
            Err(e) => Stop::Failed(e),
        };
        live.mirror.closed();
        let delay = match stop {
            Stop::Gone => return,
            Stop::Now => continue,
            Stop::Failed(e) if e.moves_on() && live.fail_over() => {
                // Another endpoint is left to try: at once. The files stay;
                // the updater starts the stale clock and reports an outage
                // only if no server serves within the grace.
                tracing::debug!(error = %e, next = %live.endpoints.current(), "server lost; trying the next one");
                if events.send(SyncEvent::Moving(e)).await.is_err() {
                    return;
                }
                continue;
            }
            Stop::Failed(e) => {
                let moves_on = e.moves_on();
                let delay = if matches!(e, SyncError::Refused(_)) {
                    // The mount empties; what we held no longer counts.
                    live.mirror.clear();
                    retry.reset();
                    refused.next_delay()
                } else {
                    retry.next_delay()
                };
                tracing::debug!(error = %e, ?delay, "watch stream lost; reconnecting");
                // The outage is reported before anything else can take time.
                if events.send(SyncEvent::Error(e)).await.is_err() {
                    return;
                }
                if moves_on {
                    // Every endpoint failed: a replica may have moved.
                    live.endpoints.reresolve(live.connect.connect_timeout).await;
                    live.use_endpoint();
                }
                delay
            }
        };
        pause(&mut live, delay, &mut creds, &events).await;
    }
}

/// Applies the stream's events until it ends or must be replaced.
async fn follow(
    live: &mut Live,
    stream: &mut Streaming<WatchEvent>,
    events: &mpsc::Sender<SyncEvent>,
    next_full: Instant,
    initial_done: bool,
    creds: &mut Interval,
    mut on_success: impl FnMut(),
) -> Stop {
    let full = tokio::time::sleep_until(next_full);
    tokio::pin!(full);
    let mut initial = if initial_done {
        InitialEvent::received()
    } else {
        InitialEvent::awaited()
    };
    loop {
        tokio::select! {
            biased;
            msg = initial.next(stream) => match msg.map(|msg| step(&mut live.mirror, msg)) {
                Ok(Step::Applied(snapshot, revision)) => {
                    initial = InitialEvent::received();
                    on_success();
                    if live.serving()
                        && events.send(SyncEvent::Serving(live.in_use.to_string())).await.is_err()
                    {
                        return Stop::Gone;
                    }
                    if events.send(SyncEvent::Synced { snapshot, revision }).await.is_err() {
                        return Stop::Gone;
                    }
                }
                Ok(Step::Part) => initial.progress(),
                Ok(Step::Stop(e)) | Err(e) => return Stop::Failed(e),
            },
            () = &mut full => return Stop::Now,
            chore = next_chore(creds, &mut live.renewing) => {
                if chore.run(live, events).await {
                    return Stop::Now;
                }
            }
        }
    }
}

/// Sleeps `delay`, cut short when new credentials arrive.
async fn pause(
    live: &mut Live,
    delay: Duration,
    creds: &mut Interval,
    events: &mpsc::Sender<SyncEvent>,
) {
    let until = tokio::time::sleep(delay);
    tokio::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => return,
            chore = next_chore(creds, &mut live.renewing) => {
                if chore.run(live, events).await {
                    return;
                }
            }
        }
    }
}

/// What the loop does beside the stream, followed or not.
enum Chore {
    /// Time to read the credential files.
    Poll,
    /// A renewal in flight ended.
    Renewed(Result<Pair, Failure>),
}

/// The next chore. Only waits (cancel-safe): the chore itself runs in the
/// select's handler, so a stream message cannot cut it short.
async fn next_chore(
    creds: &mut Interval,
    renewing: &mut Option<tokio::task::JoinHandle<Result<Pair, Failure>>>,
) -> Chore {
    tokio::select! {
        biased;
        _ = creds.tick() => Chore::Poll,
        outcome = renewal_done(renewing) => {
            *renewing = None;
            Chore::Renewed(outcome)
        }
    }
}

impl Chore {
    /// True when a new certificate is in use.
    async fn run(self, live: &mut Live, events: &mpsc::Sender<SyncEvent>) -> bool {
        match self {
            Chore::Poll => credentials_tick(live, events).await,
            Chore::Renewed(outcome) => finish_renewal(live, outcome, events).await,
        }
    }
}

/// New certificate files, the expiry warning, a renewal started when due.
/// True when a new certificate is in use: the stream must be reopened with
/// it.
async fn credentials_tick(live: &mut Live, events: &mpsc::Sender<SyncEvent>) -> bool {
    if let Some(pair) = live.credentials.as_mut().and_then(CredentialWatch::poll) {
        tracing::info!("the client certificate or key changed; reconnecting with the new one");
        if let Some(task) = live.renewing.take() {
            // For the pair just replaced: the new one wins.
            task.abort();
        }
        if use_credentials(live, pair, events).await {
            return true;
        }
    }
    let Some(schedule) = &mut live.renewal else {
        return false;
    };
    schedule.warn_if_expiring();
    if live.renewing.is_none() && schedule.due() {
        live.renewing = Some(tokio::spawn(renewal_attempt(
            live.source.clone(),
            schedule.cert().clone(),
        )));
    }
    false
}

/// A renewal's outcome, when one is in flight (else never).
async fn renewal_done(
    task: &mut Option<tokio::task::JoinHandle<Result<Pair, Failure>>>,
) -> Result<Pair, Failure> {
    match task {
        Some(task) => task
            .await
            .unwrap_or_else(|e| Err(Failure::Retry(format!("the renewal stopped: {e}")))),
        None => std::future::pending().await,
    }
}

/// Asks the server to renew `info` (see [`crate::renewal`]): a new key of
/// its key's kind, a CSR, the RPC.
async fn renewal_attempt(mut source: SecretsSource, info: CertInfo) -> Result<Pair, Failure> {
    let name = info.common_name.as_deref().unwrap_or("secretfs-mount");
    let req = renewal::new_request(info.key_kind, name).map_err(Failure::Retry)?;
    let resp = source
        .renew_certificate(req.csr_pem.clone(), renewal::days_like(&info))
        .await
        .map_err(|status| match status.code() {
            Code::Unimplemented => Failure::Retry(
                "the server does not offer certificate renewal (it is older than this \
                 mount): upgrade it, or issue a new certificate with `secretfs client renew`"
                    .to_owned(),
            ),
            // An external client (its own CA): this server never can.
            Code::FailedPrecondition => Failure::Never(status.message().to_owned()),
            _ => Failure::Retry(classify(status).to_string()),
        })?;
    let cert_pem = resp.cert_pem.into_bytes();
    let unusable =
        |e: String| Failure::Retry(format!("the server's new certificate cannot be used: {e}"));
    key_matches(
        FileContents {
            path: Path::new("the renewed certificate"),
            pem: &cert_pem,
        },
        FileContents {
            path: Path::new("the new key"),
            pem: &req.key_pem,
        },
    )
    .map_err(|e| unusable(e.to_string()))?;
    let info = CertInfo::parse(&cert_pem).map_err(|e| unusable(e.to_string()))?;
    Ok(Pair {
        cert_pem,
        key_pem: req.key_pem,
        info,
    })
}

/// Puts a renewal's outcome to use: the files replaced, the channel
/// rebuilt; or the next attempt scheduled. True when a new certificate is
/// in use.
async fn finish_renewal(
    live: &mut Live,
    outcome: Result<Pair, Failure>,
    events: &mpsc::Sender<SyncEvent>,
) -> bool {
    let pair = match outcome {
        Ok(r) => r,
        Err(Failure::Never(error)) => {
            // The expiry warning stays; a new pair written over the files
            // brings a new schedule.
            live.renewal = live.renewal.take().map(Schedule::never);
            tracing::warn!(
                %error,
                not_after = live.renewal.as_ref().map(|s| rfc3339(s.cert().not_after)),
                "the server cannot renew this client's certificate; the mount will not try again: \
                 renew it where it was issued and write it over the files (the mount picks it up)"
            );
            return false;
        }
        Err(Failure::Retry(error)) => {
            let retry = live
                .renewal
                .as_mut()
                .map(Schedule::failed)
                .unwrap_or_default();
            tracing::warn!(
                %error,
                retry_in = %humantime::format_duration(Duration::from_secs(retry.as_secs())),
                not_after = live.renewal.as_ref().map(|s| rfc3339(s.cert().not_after)),
                "could not renew the client certificate; the mount keeps serving with the current one"
            );
            return false;
        }
    };
    if let Some(watch) = &mut live.credentials {
        let files = watch.files().clone();
        // The RPC took a while: if an operator wrote a pair since the last
        // poll, theirs wins (the next poll takes it up).
        match secretfs_proto::files::replace_pair(
            &files.cert,
            &pair.cert_pem,
            &files.key,
            &pair.key_pem,
            || watch.unchanged_on_disk(),
        ) {
            Ok(()) => {
                watch.written(&pair.cert_pem, &pair.key_pem);
                tracing::info!(
                    serial = %pair.info.serial,
                    not_after = %rfc3339(pair.info.not_after),
                    cert = %files.cert.display(),
                    key = %files.key.display(),
                    "renewed the client certificate and replaced its files"
                );
            }
            Err(ReplaceError::ChangedMeanwhile { .. }) => tracing::info!(
                serial = %pair.info.serial,
                cert = %files.cert.display(),
                key = %files.key.display(),
                "renewed the client certificate, but its files changed meanwhile: left them as they \
                 are; using the renewed one until the next check of the files takes up theirs"
            ),
            Err(error) => tracing::warn!(
                serial = %pair.info.serial,
                not_after = %rfc3339(pair.info.not_after),
                cert = %files.cert.display(),
                key = %files.key.display(),
                %error,
                "renewed the client certificate, but cannot write its files: using it from memory \
                 only; after a restart the mount uses the old files again"
            ),
        }
    } else {
        tracing::info!(
            serial = %pair.info.serial,
            not_after = %rfc3339(pair.info.not_after),
            "renewed the client certificate (kept in memory: no files given)"
        );
    }
    use_credentials(live, pair, events).await
}

/// Why a renewal failed.
pub enum Failure {
    /// Maybe better later: retry after a backoff.
    Retry(String),
    /// Never for this client (its certificates come from another CA).
    Never(String),
}

/// Rebuilds the channel with a new (checked) certificate and key.
async fn use_credentials(live: &mut Live, pair: Pair, events: &mpsc::Sender<SyncEvent>) -> bool {
    let mut cfg = live.connect.clone();
    cfg.cert_pem = pair.cert_pem;
    cfg.key_pem = pair.key_pem;
    match secretfs_proto::connect_lazy_to(&cfg, &live.in_use, RPC_TIMEOUT, KeepAlive::MOUNT) {
        Ok(channel) => {
            live.source = SecretsSource::new(channel);
            let _ = events.send(SyncEvent::Certificate(pair.info.clone())).await;
            // A new schedule for every certificate in use: one that was
            // off (not readable at start, or refused by the server as an
            // external client's) comes back with new files.
            live.renewal = Some(Schedule::with_renewal(pair.info, None, live.renew));
            // The old key is wiped as it is dropped.
            live.connect = cfg;
            let _ = live.connection.send(live.source.clone());
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "the new client certificate or key cannot be used; keeping the old one");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::tests::{ev, up};

    #[test]
    fn steps_apply_whole_events_or_stop() {
        let mut m = Mirror::new();
        m.request(true);
        let Step::Applied(snap, rev) = step(
            &mut m,
            Ok(Some(ev(4, true, vec![up(1, 1, "a", b"x")], &[]))),
        ) else {
            panic!("initial event applies");
        };
        assert_eq!((snap.files().len(), rev), (1, 4));

        let bad = ev(5, false, vec![up(2, 1, "b", b"y")], &["b"]);
        assert!(matches!(
            step(&mut m, Ok(Some(bad))),
            Step::Stop(SyncError::BadEvent(EventError::UpsertAndRemove { .. }))
        ));
        assert_eq!(m.snapshot().files().len(), 1, "nothing of it applied");

        // A part waits for the rest; the stream ending then applies nothing.
        let part = WatchEvent {
            continued: true,
            ..ev(5, false, vec![up(2, 1, "b", b"y")], &[])
        };
        assert!(matches!(step(&mut m, Ok(Some(part))), Step::Part));
        assert_eq!(m.snapshot().files().len(), 1);

        assert!(matches!(
            step(&mut m, Ok(None)),
            Step::Stop(SyncError::Unreachable(_))
        ));
        m.closed();
        assert_eq!(
            m.snapshot().files().len(),
            1,
            "the cut-off change applied nothing"
        );
        assert!(matches!(
            step(
                &mut m,
                Err(tonic::Status::permission_denied("client was removed"))
            ),
            Step::Stop(SyncError::Refused(_))
        ));
    }

    #[test]
    fn status_codes_are_classified() {
        assert_eq!(
            classify(tonic::Status::permission_denied("client web-1 was removed")),
            SyncError::Refused("client web-1 was removed".into())
        );
        assert!(matches!(
            classify(tonic::Status::unauthenticated("unknown client")),
            SyncError::Refused(_)
        ));
        assert!(matches!(
            classify(tonic::Status::unavailable("down")),
            SyncError::Unreachable(_)
        ));
        // A server's own failure moves on; an answer every replica would
        // give does not.
        for status in [
            tonic::Status::internal("db"),
            tonic::Status::resource_exhausted("busy"),
            tonic::Status::unavailable("down"),
        ] {
            assert!(classify(status.clone()).moves_on(), "{status:?}");
        }
        for status in [
            tonic::Status::permission_denied("removed"),
            tonic::Status::unauthenticated("unknown"),
            tonic::Status::not_found("x"),
            tonic::Status::invalid_argument("x"),
        ] {
            assert!(!classify(status.clone()).moves_on(), "{status:?}");
        }
        assert!(SyncError::BadEvent(EventError::MissingInitial).moves_on());
    }
}
