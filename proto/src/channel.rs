//! A mutual-TLS gRPC channel to a secretfs server.
//!
//! The CLI and the mount both connect with a CA bundle (to check the server)
//! and a client certificate + key (the caller's identity). Errors name the
//! file or the server and say what to check, because "transport error" is
//! all tonic says on its own.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where and as whom to connect. PEM contents, already read from files.
#[derive(Clone)]
pub struct ConnectConfig {
    /// `https://host:port` or `host:port`.
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

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    #[error(
        "invalid server address {0:?}: use https://HOST:PORT (for example https://127.0.0.1:7443)"
    )]
    BadAddress(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
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

fn endpoint(config: &ConnectConfig) -> Result<Endpoint, ChannelError> {
    let url = server_url(&config.server)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.ca_pem))
        .identity(Identity::from_pem(&config.cert_pem, &config.key_pem));
    Endpoint::from_shared(url)
        .map_err(|_| ChannelError::BadAddress(config.server.clone()))?
        .tls_config(tls)
        .map_err(|e| ChannelError::Tls(error_chain(&e)))
        .map(|ep| {
            ep.connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        })
}

/// Connects now, so a bad address, CA or certificate shows up here with a
/// clear message rather than on the first call.
pub async fn connect(config: &ConnectConfig) -> Result<Channel, ChannelError> {
    let ep = endpoint(config)?;
    ep.connect().await.map_err(|e| ChannelError::Connect {
        server: config.server.clone(),
        reason: explain_connect_error(&error_chain(&e)),
    })
}

/// A channel that connects on first use and reconnects by itself: for
/// long-running clients such as the mount.
pub fn connect_lazy(config: &ConnectConfig) -> Result<Channel, ChannelError> {
    Ok(endpoint(config)?.connect_lazy())
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

/// Turns rustls/hyper wording into advice an operator can act on.
pub fn explain_connect_error(chain: &str) -> String {
    let lower = chain.to_ascii_lowercase();
    let hint = if lower.contains("connection refused") {
        "nothing listens there; is `secretfs server run` up, and is the address right?"
    } else if lower.contains("unknownissuer")
        || lower.contains("unknown issuer")
        || lower.contains("badsignature")
    {
        "the server's certificate is not signed by the CA given with --ca/SECRETFS_CA"
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        "the server's certificate does not name this host; use the host it was issued for, or re-run `server init --san HOST`"
    } else if lower.contains("certificate required") || lower.contains("certificaterequired") {
        "the server wants a client certificate: give --cert/--key or SECRETFS_CERT/SECRETFS_KEY"
    } else if lower.contains("bad certificate")
        || lower.contains("badcertificate")
        || lower.contains("unknown ca")
    {
        "the server refused the client certificate: is it issued by this server's CA?"
    } else if lower.contains("timed out") || lower.contains("deadline") {
        "no answer in time; check the address and any firewall"
    } else if lower.contains("private key")
        || lower.contains("no certificates")
        || lower.contains("pem")
    {
        "the client certificate or key could not be read; check --cert/--key"
    } else {
        ""
    };
    if hint.is_empty() {
        chain.to_owned()
    } else {
        format!("{chain} ({hint})")
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

    #[test]
    fn hints_name_the_fix() {
        assert!(
            explain_connect_error("tcp connect error: Connection refused").contains("server run")
        );
        assert!(explain_connect_error("invalid peer certificate: UnknownIssuer").contains("--ca"));
    }
}
