//! A mutual-TLS gRPC channel to a secretfs server.
//!
//! The CLI and the mount both connect with a CA bundle (to check the server)
//! and a client certificate + key (the caller's identity). Errors name the
//! file or the server and say what to check, because "transport error" is
//! all tonic says on its own.
//!
//! `ConnectConfig::server` may list several servers (`A,B`, see
//! [`crate::servers`]): [`connect`] tries their endpoints in order until one
//! answers, and names every one and why when none does. Only a failure to
//! connect moves on to the next: once a channel is up, its calls stay on
//! that server (a call is never sent twice by this layer).

use std::future::Future;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::servers::{ServerList, Target};

/// Where and as whom to connect. PEM contents, already read from files.
#[derive(Clone)]
pub struct ConnectConfig {
    /// `https://host:port` or `host:port`; or several, comma-separated, in
    /// order of preference.
    pub server: String,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    /// Wiped when the config is dropped (every clone too).
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
    pub connect_timeout: Duration,
}

// The key is secret: never print it.
impl std::fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    #[error(
        "invalid server address {0:?}: use https://HOST:PORT (for example https://127.0.0.1:7443)"
    )]
    BadAddress(String),
    #[error(
        "empty item in the server list {0:?}: give addresses separated by single commas, such as https://a:7443,https://b:7443"
    )]
    EmptyServer(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot connect to {server}: {reason}")]
    Connect {
        server: String,
        /// What went wrong, with the hint for `failure`.
        reason: String,
        failure: ConnectFailure,
    },
    /// Every server of a list failed: each one's `Connect` error, in order.
    #[error("cannot connect to any of the servers: {}", list_failures(.0))]
    AllFailed(Vec<ChannelError>),
}

/// Each failure as `SERVER: why`, joined with `; ` (for logs that name the
/// addresses passed over).
pub fn list_failures(all: &[ChannelError]) -> String {
    let each: Vec<String> = all
        .iter()
        .map(|e| match e {
            ChannelError::Connect { server, reason, .. } => format!("{server}: {reason}"),
            other => other.to_string(),
        })
        .collect();
    each.join("; ")
}

impl ChannelError {
    /// Certificate trouble on every server: waiting will not fix it.
    pub fn is_tls(&self) -> bool {
        match self {
            ChannelError::Connect { failure, .. } => failure.is_tls(),
            ChannelError::AllFailed(all) => !all.is_empty() && all.iter().all(Self::is_tls),
            _ => false,
        }
    }
}

/// Normalises `host:port` to `https://host:port`; refuses plain http.
pub fn server_url(server: &str) -> Result<String, ChannelError> {
    let server = server.trim();
    if server.starts_with("http://") {
        return Err(ChannelError::BadAddress(server.to_owned()));
    }
    let url = if server.starts_with("https://") {
        server.to_owned()
    } else {
        format!("https://{server}")
    };
    let rest = &url["https://".len()..];
    if rest.is_empty() || rest.starts_with(':') || rest.contains(char::is_whitespace) {
        return Err(ChannelError::BadAddress(server.to_owned()));
    }
    Ok(url)
}

/// HTTP/2 keep-alive pings: how soon a server that vanished without a word
/// (host powered off, network cut) is noticed on an open connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAlive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl KeepAlive {
    /// A command: its calls are bounded by `--timeout` anyway.
    pub const COMMAND: KeepAlive = KeepAlive {
        interval: Duration::from_secs(20),
        timeout: Duration::from_secs(10),
    };
    /// A mount's long-lived Watch: a replica that dies silently is noticed
    /// within about 3 s (a ping every second, 2 s for its answer), so the
    /// mount moves to the next one.
    pub const MOUNT: KeepAlive = KeepAlive {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
    };
}

fn endpoint(
    config: &ConnectConfig,
    target: &Target,
    keep_alive: KeepAlive,
) -> Result<Endpoint, ChannelError> {
    // The TCP connect timeout alone lets a server that accepts but never
    // answers (stopped, overloaded) hold a client in the TLS handshake
    // forever: bound that too.
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.ca_pem))
        .identity(Identity::from_pem(&config.cert_pem, &config.key_pem))
        .timeout(config.connect_timeout);
    if !target.server.is_ip() {
        // Dialled by address (one of the name's), checked by name.
        tls = tls.domain_name(target.server.host.clone());
    }
    Endpoint::from_shared(target.dial_url())
        .map_err(|_| ChannelError::BadAddress(target.server.url.clone()))?
        .tls_config(tls)
        .map_err(|e| ChannelError::Tls(ConnectFailure::classify(&e).explain(&error_chain(&e))))
        .map(|ep| {
            ep.connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(keep_alive.interval)
                .keep_alive_timeout(keep_alive.timeout)
                .keep_alive_while_idle(true)
        })
}

/// Connects now, so a bad address, CA or certificate shows up here with a
/// clear message rather than on the first call.
pub async fn connect(config: &ConnectConfig) -> Result<Channel, ChannelError> {
    Ok(connect_any(config, None).await?.0)
}

/// As [`connect`], and every call on the channel fails with a timeout
/// (`Cancelled`, classified [`ConnectFailure::Timeout`]) when the server
/// has not begun its answer within `call_timeout`. A stream's messages
/// after the first answer are not bounded: a Watch may stay open.
pub async fn connect_with_call_timeout(
    config: &ConnectConfig,
    call_timeout: Duration,
) -> Result<Channel, ChannelError> {
    Ok(connect_any(config, Some(call_timeout)).await?.0)
}

/// A connection to the first endpoint of `config.server` that answers, in
/// order; the endpoints, and which one answered. Each name's lookup and
/// each address's attempt is bounded by `config.connect_timeout` (a timeout
/// is that address's failure, named with the others). A single server's
/// failure is its own `Connect` error; several are
/// [`ChannelError::AllFailed`].
pub async fn connect_any(
    config: &ConnectConfig,
    call_timeout: Option<Duration>,
) -> Result<(Channel, Connected), ChannelError> {
    let list = ServerList::parse(&config.server)?;
    let (targets, unresolved) = list.resolve(config.connect_timeout).await;
    let failed = unresolved.into_iter().map(|u| u.error).collect();
    let found: Result<_, NoneAnswered<std::convert::Infallible>> =
        try_in_order(&targets, failed, |target| async move {
            match connect_to(config, &target, call_timeout, KeepAlive::COMMAND).await {
                Ok(channel) => Tried::Done(channel),
                Err(e) => Tried::Next(e),
            }
        })
        .await;
    match found {
        Ok(found) => Ok((
            found.value,
            Connected {
                list,
                at: found.at,
                targets,
                passed_over: found.passed_over,
            },
        )),
        Err(NoneAnswered::Failed(failed)) => Err(collapse(failed)),
        Err(NoneAnswered::Stopped(never)) => match never {},
    }
}

/// What one endpoint's attempt came to (see [`try_in_order`]).
pub enum Tried<T, E> {
    Done(T),
    /// That endpoint's failure: try the next.
    Next(ChannelError),
    /// An answer that moving on would not change: stop here.
    Stop(E),
}

/// The first endpoint whose attempt succeeded.
pub struct Found<T> {
    pub value: T,
    /// Its index in the targets.
    pub at: usize,
    /// The failures before it (unresolved names first), in order.
    pub passed_over: Vec<ChannelError>,
}

/// Why [`try_in_order`] found nothing.
pub enum NoneAnswered<E> {
    /// An attempt said stop.
    Stopped(E),
    /// Every endpoint failed: each failure, in order (`failed` given first).
    Failed(Vec<ChannelError>),
}

/// Runs `attempt` on each endpoint in order until one is done or says
/// stop; `failed` holds failures already known (names that did not
/// resolve). The one loop the CLI's connect and the mount's first sync share.
pub async fn try_in_order<T, E, F, Fut>(
    targets: &[Target],
    mut failed: Vec<ChannelError>,
    mut attempt: F,
) -> Result<Found<T>, NoneAnswered<E>>
where
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = Tried<T, E>>,
{
    for (at, target) in targets.iter().enumerate() {
        match attempt(target.clone()).await {
            Tried::Done(value) => {
                return Ok(Found {
                    value,
                    at,
                    passed_over: failed,
                })
            }
            Tried::Next(e) => failed.push(e),
            Tried::Stop(e) => return Err(NoneAnswered::Stopped(e)),
        }
    }
    Err(NoneAnswered::Failed(failed))
}

/// One failure as itself, several as [`ChannelError::AllFailed`].
pub fn collapse(mut failed: Vec<ChannelError>) -> ChannelError {
    if failed.len() == 1 {
        failed.remove(0)
    } else {
        ChannelError::AllFailed(failed)
    }
}

/// Where [`connect_any`] got through.
#[derive(Clone, Debug)]
pub struct Connected {
    pub list: ServerList,
    pub targets: Vec<Target>,
    at: usize,
    /// Why the endpoints before it did not answer (proto logs nothing: the
    /// caller may).
    pub passed_over: Vec<ChannelError>,
}

impl Connected {
    /// The endpoint that answered.
    pub fn target(&self) -> &Target {
        &self.targets[self.at]
    }
}

/// Connects to one endpoint now, within `config.connect_timeout` (TCP, TLS
/// and HTTP/2 set-up together): a timeout is a `Connect` error naming it.
pub async fn connect_to(
    config: &ConnectConfig,
    target: &Target,
    call_timeout: Option<Duration>,
    keep_alive: KeepAlive,
) -> Result<Channel, ChannelError> {
    let mut ep = endpoint(config, target, keep_alive)?;
    if let Some(limit) = call_timeout {
        ep = ep.timeout(limit);
    }
    let connected = match tokio::time::timeout(config.connect_timeout, ep.connect()).await {
        Ok(connected) => connected,
        Err(_) => {
            let failure = ConnectFailure::Timeout;
            return Err(ChannelError::Connect {
                server: target.to_string(),
                reason: failure.explain(&format!(
                    "no answer within {:.1} s",
                    config.connect_timeout.as_secs_f64()
                )),
                failure,
            });
        }
    };
    connected.map_err(|e| {
        let failure = ConnectFailure::classify(&e);
        ChannelError::Connect {
            server: target.to_string(),
            reason: failure.explain(&error_chain(&e)),
            failure,
        }
    })
}

/// A channel to one endpoint that connects on first use and reconnects by
/// itself: for long-running clients such as the mount, which choose the
/// endpoint ([`crate::servers::Endpoints`]). Calls time out as with
/// [`connect_with_call_timeout`].
pub fn connect_lazy_to(
    config: &ConnectConfig,
    target: &Target,
    call_timeout: Duration,
    keep_alive: KeepAlive,
) -> Result<Channel, ChannelError> {
    Ok(endpoint(config, target, keep_alive)?
        .timeout(call_timeout)
        .connect_lazy())
}

/// Joins an error and its sources into one line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Why a connection (or a call on a new connection) failed, decided once
/// from the types in the error's source chain. The CLI and the mount act on
/// this; [`ConnectFailure::hint`] is the advice an operator reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// Nothing listens at the address.
    Refused,
    /// The server's certificate is not signed by the CA we were given.
    UnknownIssuer,
    /// The server's certificate does not name the host we dialled.
    NameMismatch,
    /// The server wants a client certificate and got none.
    CertificateRequired,
    /// The server refused our client certificate.
    BadCertificate,
    /// No answer in time.
    Timeout,
    /// Our own certificate or key cannot be used.
    ClientFiles,
    /// The connection was closed or reset while being set up: with TLS
    /// 1.3 that is most often the server refusing the client certificate
    /// after the client already thought the handshake done.
    Closed,
    Other,
}

impl ConnectFailure {
    /// Walks `err` and its sources and classifies by the first error whose
    /// type says what went wrong.
    pub fn classify(err: &(dyn std::error::Error + 'static)) -> ConnectFailure {
        let mut closed = false;
        let mut next = Some(err);
        while let Some(e) = next {
            next = e.source();
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Self::from_rustls(tls);
            }
            if e.is::<tonic::TimeoutExpired>() {
                return ConnectFailure::Timeout;
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_timeout() {
                    return ConnectFailure::Timeout;
                }
                // "connection was not ready", "connection closed": the
                // server hung up before answering.
                closed |= h.is_canceled() || h.is_closed() || h.is_incomplete_message();
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return ConnectFailure::Refused,
                    std::io::ErrorKind::TimedOut => return ConnectFailure::Timeout,
                    std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof => closed = true,
                    _ => {}
                }
                // io::Error::source() skips the error it wraps (a
                // rustls::Error from tokio-rustls): look at that one next.
                if let Some(inner) = io.get_ref() {
                    next = Some(inner);
                }
            }
        }
        match Self::from_text(&error_chain(err)) {
            ConnectFailure::Other if closed => ConnectFailure::Closed,
            found => found,
        }
    }

    fn from_rustls(err: &rustls::Error) -> ConnectFailure {
        use rustls::{AlertDescription as Alert, CertificateError as Cert};
        match err {
            rustls::Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
                ConnectFailure::UnknownIssuer
            }
            rustls::Error::InvalidCertificate(
                Cert::NotValidForName | Cert::NotValidForNameContext { .. },
            ) => ConnectFailure::NameMismatch,
            rustls::Error::AlertReceived(Alert::CertificateRequired) => {
                ConnectFailure::CertificateRequired
            }
            rustls::Error::AlertReceived(
                Alert::BadCertificate
                | Alert::UnknownCA
                | Alert::DecryptError
                | Alert::CertificateUnknown
                | Alert::CertificateExpired
                | Alert::CertificateRevoked
                | Alert::UnsupportedCertificate
                | Alert::AccessDenied,
            ) => ConnectFailure::BadCertificate,
            rustls::Error::InconsistentKeys(_) | rustls::Error::NoCertificatesPresented => {
                ConnectFailure::ClientFiles
            }
            _ => ConnectFailure::Other,
        }
    }

    /// The fallback where the libraries keep no type: h2 stores an I/O
    /// error as its kind and message only (so a TLS alert read after the
    /// handshake reaches us as text), and tonic's TLS setup errors (PEM
    /// parsing, handshake timeout) are a private type.
    fn from_text(chain: &str) -> ConnectFailure {
        let lower = chain.to_ascii_lowercase();
        let alert = |names: &[&str]| {
            names
                .iter()
                .any(|n| lower.contains(&format!("alert: {}", n.to_ascii_lowercase())))
        };
        if alert(&["CertificateRequired"]) {
            ConnectFailure::CertificateRequired
        } else if alert(&[
            "BadCertificate",
            "UnknownCA",
            "DecryptError",
            "CertificateUnknown",
            "CertificateExpired",
            "CertificateRevoked",
            "UnsupportedCertificate",
            "AccessDenied",
        ]) {
            ConnectFailure::BadCertificate
        } else if lower.contains("timed out") || lower.contains("handshake timeout") {
            ConnectFailure::Timeout
        } else if lower.contains("parsing tls certificate") || lower.contains("private key") {
            ConnectFailure::ClientFiles
        } else {
            ConnectFailure::Other
        }
    }

    /// Certificate trouble: trying again will not help.
    pub fn is_tls(self) -> bool {
        matches!(
            self,
            ConnectFailure::UnknownIssuer
                | ConnectFailure::NameMismatch
                | ConnectFailure::CertificateRequired
                | ConnectFailure::BadCertificate
                | ConnectFailure::ClientFiles
        )
    }

    /// What to check or do, for an operator.
    pub fn hint(self) -> Option<&'static str> {
        Some(match self {
            ConnectFailure::Refused => {
                "nothing listens there; is `secretfs server run` up, and is the address right?"
            }
            ConnectFailure::UnknownIssuer => {
                "the server's certificate is not signed by the CA given with --ca/SECRETFS_CA"
            }
            ConnectFailure::NameMismatch => {
                "the server's certificate does not name this host; use a host it was issued for, or give it this name on the server's host with `secretfs server reissue-cert --state-dir DIR --san HOST ...` (list every name; the running server takes it up without a restart)"
            }
            ConnectFailure::CertificateRequired => {
                "the server wants a client certificate: give --cert/--key or SECRETFS_CERT/SECRETFS_KEY"
            }
            ConnectFailure::BadCertificate => {
                "the server refused the client certificate: check that --cert/--key (SECRETFS_CERT/SECRETFS_KEY) \
                 name a certificate issued by this server's CA"
            }
            ConnectFailure::Timeout => {
                "no answer in time: the server may be stopped, stuck or overloaded, or a firewall drops the packets; \
                 check that `secretfs server run` is up and answering at that address"
            }
            ConnectFailure::ClientFiles => {
                "the client certificate or key could not be read, or they do not match; check --cert/--key"
            }
            ConnectFailure::Closed => {
                "the connection was closed during setup; most often the server refused the client certificate: \
                 check that --cert/--key name a certificate issued by this server's CA"
            }
            ConnectFailure::Other => return None,
        })
    }

    /// `chain` with the hint, if any, after it.
    pub fn explain(self, chain: &str) -> String {
        match self.hint() {
            Some(hint) => format!("{chain} ({hint})"),
            None => chain.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_url_forms() {
        assert_eq!(
            server_url("127.0.0.1:7443").unwrap(),
            "https://127.0.0.1:7443"
        );
        assert_eq!(server_url("https://h:1").unwrap(), "https://h:1");
        assert!(server_url("http://h:1").is_err());
        assert!(server_url("").is_err());
        assert!(server_url(":80").is_err());
    }

    fn classify(err: &(dyn std::error::Error + 'static)) -> ConnectFailure {
        ConnectFailure::classify(err)
    }

    /// An error that wraps another, as tonic's and hyper's do.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn tls_io(err: rustls::Error) -> Wrapped {
        // How tokio-rustls reports a TLS failure.
        Wrapped(std::io::Error::new(std::io::ErrorKind::InvalidData, err))
    }

    fn closed_port() -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    #[test]
    fn hints_name_the_fix() {
        let refused = std::net::TcpStream::connect(closed_port()).unwrap_err();
        let failure = classify(&refused);
        assert_eq!(failure, ConnectFailure::Refused);
        assert!(failure.explain("x").contains("server run"));
        let unknown = tls_io(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let failure = classify(&unknown);
        assert_eq!(failure, ConnectFailure::UnknownIssuer);
        assert!(failure.explain("x").contains("--ca"));
    }

    #[test]
    fn rustls_errors_inside_io_errors_are_classified_by_type() {
        use rustls::{AlertDescription as Alert, CertificateError as Cert};
        let cases = [
            (
                rustls::Error::InvalidCertificate(Cert::BadSignature),
                ConnectFailure::UnknownIssuer,
            ),
            (
                rustls::Error::InvalidCertificate(Cert::NotValidForName),
                ConnectFailure::NameMismatch,
            ),
            (
                rustls::Error::AlertReceived(Alert::CertificateRequired),
                ConnectFailure::CertificateRequired,
            ),
            (
                rustls::Error::AlertReceived(Alert::BadCertificate),
                ConnectFailure::BadCertificate,
            ),
            (
                rustls::Error::AlertReceived(Alert::UnknownCA),
                ConnectFailure::BadCertificate,
            ),
            (
                rustls::Error::InvalidCertificate(Cert::Expired),
                ConnectFailure::Other,
            ),
        ];
        for (err, want) in cases {
            let text = err.to_string();
            assert_eq!(classify(&tls_io(err)), want, "{text}");
        }
    }

    #[test]
    fn timeouts_and_hang_ups_are_classified_by_type() {
        let timed_out = Wrapped(std::io::ErrorKind::TimedOut.into());
        assert_eq!(classify(&timed_out), ConnectFailure::Timeout);
        assert_eq!(
            classify(&tonic::TimeoutExpired(())),
            ConnectFailure::Timeout
        );
        let reset = Wrapped(std::io::ErrorKind::ConnectionReset.into());
        assert_eq!(classify(&reset), ConnectFailure::Closed);
        assert!(!ConnectFailure::Closed.is_tls());
        assert!(ConnectFailure::BadCertificate.is_tls());
    }

    /// h2 keeps an I/O error's kind and message only: a TLS alert read
    /// after the handshake arrives as text (the one place text is read).
    #[test]
    fn an_alert_flattened_to_text_by_h2_is_still_recognised() {
        let flat = Wrapped(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::DecryptError).to_string(),
        ));
        assert_eq!(classify(&flat), ConnectFailure::BadCertificate);
        let flat = Wrapped(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired).to_string(),
        ));
        assert_eq!(classify(&flat), ConnectFailure::CertificateRequired);
    }

    /// A server that accepts the TCP connection but never answers (a
    /// stopped process: the kernel still completes the TCP handshake) is
    /// a timeout, not a hang.
    #[tokio::test]
    async fn a_server_that_never_answers_the_tls_handshake_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = ConnectConfig {
            server: format!("https://{}", listener.local_addr().unwrap()),
            ca_pem: cert.pem().into_bytes(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem().into_bytes()),
            connect_timeout: Duration::from_millis(300),
        };
        let attempt = connect_with_call_timeout(&config, Duration::from_millis(300));
        match tokio::time::timeout(Duration::from_secs(60), attempt).await {
            Ok(Err(ChannelError::Connect {
                failure, reason, ..
            })) => {
                assert_eq!(failure, ConnectFailure::Timeout, "{reason}");
                assert!(reason.contains("server run"), "{reason}");
            }
            Ok(other) => panic!("expected a timeout, got {other:?}"),
            Err(_) => panic!("connecting hung on a server that never answers"),
        }
        drop(listener);
    }

    /// The whole path: tonic's error for a port nobody listens on.
    #[tokio::test]
    async fn connecting_to_a_closed_port_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = ConnectConfig {
            server: format!("https://{}", closed_port()),
            ca_pem: cert.pem().into_bytes(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem().into_bytes()),
            connect_timeout: Duration::from_secs(5),
        };
        match connect(&config).await {
            Err(ChannelError::Connect {
                failure, reason, ..
            }) => {
                assert_eq!(failure, ConnectFailure::Refused, "{reason}");
                assert!(reason.contains("server run"), "{reason}");
            }
            other => panic!("expected a refused connection, got {other:?}"),
        }
    }

    /// Two servers down: the error names both, each with why.
    #[tokio::test]
    async fn every_failed_server_is_named() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (a, b) = (closed_port(), closed_port());
        let config = ConnectConfig {
            server: format!("{a},https://{b}"),
            ca_pem: cert.pem().into_bytes(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem().into_bytes()),
            connect_timeout: Duration::from_secs(5),
        };
        let err = connect(&config).await.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ChannelError::AllFailed(ref all) if all.len() == 2),
            "{text}"
        );
        assert!(
            text.contains(&a.to_string()) && text.contains(&b.to_string()),
            "{text}"
        );
        let ChannelError::AllFailed(all) = &err else {
            unreachable!()
        };
        assert!(
            all.iter().all(|e| matches!(
                e,
                ChannelError::Connect {
                    failure: ConnectFailure::Refused,
                    ..
                }
            )),
            "{text}"
        );
        assert!(!err.is_tls());
    }

    fn self_signed(server: String, timeout: Duration) -> ConnectConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        ConnectConfig {
            server,
            ca_pem: cert.pem().into_bytes(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem().into_bytes()),
            connect_timeout: timeout,
        }
    }

    /// Each address is bounded on its own: one that never answers is a
    /// timeout named in the list, and the next is still tried.
    #[tokio::test]
    async fn an_address_that_never_answers_is_a_timeout_and_the_next_is_tried() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = closed_port();
        let config = self_signed(
            format!("{},{closed}", silent.local_addr().unwrap()),
            Duration::from_millis(300),
        );
        let attempt = connect(&config);
        let err = match tokio::time::timeout(Duration::from_secs(60), attempt).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => panic!("nothing answers"),
            Err(_) => panic!("connecting hung"),
        };
        let ChannelError::AllFailed(all) = &err else {
            panic!("{err}")
        };
        assert!(
            matches!(
                all.as_slice(),
                [
                    ChannelError::Connect {
                        failure: ConnectFailure::Timeout,
                        ..
                    },
                    ChannelError::Connect {
                        failure: ConnectFailure::Refused,
                        ..
                    }
                ]
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&closed.to_string()), "{err}");
        drop(silent);
    }

    /// An address that cannot be dialled (`BadAddress` from building its
    /// endpoint) is that address's failure, not the end of the list.
    #[tokio::test]
    async fn an_unusable_address_is_passed_over() {
        let closed = closed_port();
        let config = self_signed(format!("{closed}"), Duration::from_secs(5));
        let list = ServerList::parse(&config.server).unwrap();
        let live = Target {
            server: list.servers()[0].clone(),
            addr: closed,
        };
        let unusable = Target {
            server: list.servers()[0].clone(),
            addr: "[fe80::1]:443".parse().unwrap(),
        };
        let found: Result<Found<Channel>, NoneAnswered<()>> =
            try_in_order(&[unusable.clone(), live], Vec::new(), |target| {
                let config = config.clone();
                let unusable = unusable.clone();
                async move {
                    if target == unusable {
                        return Tried::Next(ChannelError::BadAddress(target.dial_url()));
                    }
                    match connect_to(&config, &target, None, KeepAlive::COMMAND).await {
                        Ok(c) => Tried::Done(c),
                        Err(e) => Tried::Next(e),
                    }
                }
            })
            .await;
        let Err(NoneAnswered::Failed(failed)) = found else {
            panic!("nothing answers")
        };
        assert!(
            matches!(
                failed.as_slice(),
                [
                    ChannelError::BadAddress(_),
                    ChannelError::Connect {
                        failure: ConnectFailure::Refused,
                        ..
                    }
                ]
            ),
            "{}",
            list_failures(&failed)
        );
    }
}
