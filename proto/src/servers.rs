//! Several servers: the list a client is given (`--server A,B`, repeated
//! flags joined with commas), each name resolved to its addresses, and
//! where a long-running client goes when the server it uses fails.
//!
//! Every address a name resolves to is an endpoint of its own (a replica
//! behind a DNS name with several records), dialled by IP while TLS still
//! checks the *name* (see [`Target`]). Endpoints are tried in the order
//! given (a name's addresses in the resolver's order); names are resolved
//! again once every endpoint has failed, so a replica that moved is found.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::channel::{server_url, ChannelError};

/// The servers of a client, in order of preference, without duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerList {
    servers: Vec<Server>,
}

/// One item of the list: `https://HOST:PORT` as given (normalised).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    /// `https://host:port`, as shown to people.
    pub url: String,
    /// The host without brackets: a name or an IP address.
    pub host: String,
    pub port: u16,
}

impl ServerList {
    /// Parses one address or a comma-separated list. An empty item or a bad
    /// address is refused, named.
    pub fn parse(text: &str) -> Result<ServerList, ChannelError> {
        let mut servers: Vec<Server> = Vec::new();
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(ChannelError::EmptyServer(text.to_owned()));
            }
            let server = Server::parse(item)?;
            if !servers.contains(&server) {
                servers.push(server);
            }
        }
        Ok(ServerList { servers })
    }

    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Every endpoint, and the servers whose name did not resolve (with
    /// why). Each name's lookup is bounded by `limit`: a resolver that does
    /// not answer is that name's failure.
    pub async fn resolve(&self, limit: Duration) -> (Vec<Target>, Vec<Unresolved>) {
        self.resolve_with(
            |host, port| async move {
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map(Iterator::collect)
            },
            limit,
        )
        .await
    }

    /// As [`ServerList::resolve`] with the resolver given (tests).
    pub async fn resolve_with<F, Fut>(
        &self,
        lookup: F,
        limit: Duration,
    ) -> (Vec<Target>, Vec<Unresolved>)
    where
        F: Fn(String, u16) -> Fut,
        Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
    {
        let mut targets: Vec<Target> = Vec::new();
        let mut failed = Vec::new();
        for server in &self.servers {
            let addrs = match server.host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, server.port)],
                Err(_) => {
                    let why =
                        match tokio::time::timeout(limit, lookup(server.host.clone(), server.port))
                            .await
                        {
                            Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
                            Ok(Ok(_)) => Err("the name has no address".to_owned()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!(
                                "no answer from the resolver within {}",
                                humantime_secs(limit)
                            )),
                        };
                    match why {
                        Ok(addrs) => addrs,
                        Err(why) => {
                            failed.push(Unresolved::new(server, why));
                            continue;
                        }
                    }
                }
            };
            for addr in addrs {
                let target = Target {
                    server: server.clone(),
                    addr,
                };
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
        }
        (targets, failed)
    }
}

fn humantime_secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A server whose name did not resolve, and why (as a connection error
/// naming it, for the list of failures).
#[derive(Clone, Debug)]
pub struct Unresolved {
    pub server: Server,
    pub error: ChannelError,
}

impl Unresolved {
    fn new(server: &Server, why: String) -> Unresolved {
        Unresolved {
            server: server.clone(),
            error: ChannelError::Connect {
                server: server.url.clone(),
                reason: format!(
                    "cannot resolve {}: {why} (check the name, or give the address)",
                    server.host
                ),
                failure: crate::channel::ConnectFailure::Other,
            },
        }
    }
}

impl Server {
    fn parse(item: &str) -> Result<Server, ChannelError> {
        let url = server_url(item)?;
        let bad = || ChannelError::BadAddress(item.to_owned());
        let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| bad())?;
        let host = uri.host().ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_ascii_lowercase();
        if host.is_empty() || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(bad());
        }
        let port = uri.port_u16().unwrap_or(443);
        let shown = if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        };
        Ok(Server {
            url: shown,
            host,
            port,
        })
    }

    /// The host is an IP address (no name to resolve or to check in TLS).
    pub fn is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }
}

/// One endpoint: an address to dial, and the server (name) it stands for.
/// TLS checks the server's name, not the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub server: Server,
    pub addr: SocketAddr,
}

impl Target {
    /// `https://IP:PORT`: what is dialled.
    pub fn dial_url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.server.is_ip() {
            f.write_str(&self.server.url)
        } else {
            write!(f, "{} ({})", self.server.url, self.addr)
        }
    }
}

/// Where a long-running client (the mount) is connected, and where it
/// goes next when that fails: the next endpoint, in order, that has not
/// failed since the last success. When every one has, the caller backs off
/// and calls [`Endpoints::reresolve`], which starts again from the top.
#[derive(Clone, Debug)]
pub struct Endpoints {
    list: ServerList,
    targets: Vec<Target>,
    current: usize,
    /// Failed since the last success (same indices as `targets`).
    failed: Vec<bool>,
}

impl Endpoints {
    /// Starts on `current` (found by the first connection), which need not
    /// be the first of `targets`.
    pub fn new(list: ServerList, targets: Vec<Target>, current: &Target) -> Endpoints {
        let mut targets = targets;
        let at = match targets.iter().position(|t| t == current) {
            Some(i) => i,
            None => {
                targets.push(current.clone());
                targets.len() - 1
            }
        };
        let failed = vec![false; targets.len()];
        Endpoints {
            list,
            targets,
            current: at,
            failed,
        }
    }

    /// The endpoint in use.
    pub fn current(&self) -> &Target {
        &self.targets[self.current]
    }

    /// How many endpoints there are now.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The endpoint in use worked: every endpoint may be tried again.
    pub fn succeeded(&mut self) {
        self.failed.iter_mut().for_each(|f| *f = false);
    }

    /// The endpoint in use failed: moves to the first one (in order of
    /// preference) that has not failed since the last success, and returns
    /// it; `None` when every one has (the current one is kept).
    pub fn failed(&mut self) -> Option<&Target> {
        self.failed[self.current] = true;
        let next = self.failed.iter().position(|f| !f)?;
        self.current = next;
        Some(&self.targets[next])
    }

    /// Resolves the names again (each lookup bounded by `limit`) and
    /// starts from the first endpoint. A name that no longer resolves keeps
    /// its old addresses (a resolver hiccup must not leave the client with
    /// nothing to try).
    pub async fn reresolve(&mut self, limit: Duration) {
        let (fresh, failed) = self.list.resolve(limit).await;
        self.replace(fresh, &failed);
    }

    fn replace(&mut self, fresh: Vec<Target>, failed: &[Unresolved]) {
        let mut targets = Vec::new();
        for server in self.list.servers() {
            let unresolved = failed.iter().any(|u| u.server == *server);
            let source = if unresolved { &self.targets } else { &fresh };
            targets.extend(source.iter().filter(|t| t.server == *server).cloned());
        }
        if targets.is_empty() {
            // Nothing resolved at all: keep what we had.
            targets = self.targets.clone();
        }
        self.targets = targets;
        self.current = 0;
        self.failed = vec![false; self.targets.len()];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &ServerList) -> Vec<&str> {
        list.servers().iter().map(|s| s.url.as_str()).collect()
    }

    #[test]
    fn lists_parse_in_order_without_duplicates() {
        let list =
            ServerList::parse("a.example:7443, https://b.example:7443,A.example:7443,[::1]:9")
                .unwrap();
        assert_eq!(
            names(&list),
            [
                "https://a.example:7443",
                "https://b.example:7443",
                "https://[::1]:9"
            ]
        );
        assert_eq!(list.servers()[2].host, "::1");
        assert_eq!(ServerList::parse("h").unwrap().servers()[0].port, 443);
    }

    #[test]
    fn empty_items_and_bad_addresses_are_named() {
        let err = ServerList::parse("a:1,,b:2").unwrap_err();
        assert!(matches!(err, ChannelError::EmptyServer(_)), "{err}");
        assert!(err.to_string().contains("a:1,,b:2"), "{err}");
        let err = ServerList::parse("a:1,http://b:2").unwrap_err();
        assert!(err.to_string().contains("http://b:2"), "{err}");
        let err = ServerList::parse("a:1,").unwrap_err();
        assert!(matches!(err, ChannelError::EmptyServer(_)), "{err}");
        let err = ServerList::parse("a:1,h:2/path").unwrap_err();
        assert!(err.to_string().contains("h:2/path"), "{err}");
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// A resolver that never answers is that name's failure, in time; the
    /// other servers are still endpoints.
    #[tokio::test]
    async fn a_lookup_that_never_answers_is_bounded() {
        let list = ServerList::parse("slow.example:7443,127.0.0.1:1").unwrap();
        let never = |_: String, _: u16| std::future::pending::<std::io::Result<Vec<SocketAddr>>>();
        let resolved = tokio::time::timeout(
            Duration::from_secs(30),
            list.resolve_with(never, Duration::from_millis(50)),
        )
        .await
        .expect("resolution is bounded");
        let (targets, failed) = resolved;
        assert_eq!(targets.len(), 1);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].server.host, "slow.example");
        let why = failed[0].error.to_string();
        assert!(
            why.contains("slow.example") && why.contains("resolver"),
            "{why}"
        );
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A resolver that answers from a table: `db.example` has two replicas.
    async fn table(host: String, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        match host.as_str() {
            "db.example" => Ok(vec![
                SocketAddr::new([10, 0, 0, 1].into(), port),
                SocketAddr::new([10, 0, 0, 2].into(), port),
            ]),
            "one.example" => Ok(vec![SocketAddr::new([10, 0, 0, 2].into(), port)]),
            _ => Err(std::io::Error::other("no such host")),
        }
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_is_several_endpoints() {
        let list = ServerList::parse("db.example:7443,127.0.0.1:1,gone.example:7443").unwrap();
        let (targets, failed) = list.resolve_with(table, SECOND).await;
        let dialled: Vec<String> = targets.iter().map(Target::dial_url).collect();
        assert_eq!(
            dialled,
            [
                "https://10.0.0.1:7443",
                "https://10.0.0.2:7443",
                "https://127.0.0.1:1"
            ]
        );
        // TLS checks the name, not the address.
        assert_eq!(targets[1].server.host, "db.example");
        assert_eq!(
            targets[1].to_string(),
            "https://db.example:7443 (10.0.0.2:7443)"
        );
        assert_eq!(targets[2].to_string(), "https://127.0.0.1:1");
        assert_eq!(failed.len(), 1);
        let why = failed[0].error.to_string();
        assert!(
            why.contains("gone.example") && why.contains("no such host"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn two_names_on_one_address_stay_two_endpoints() {
        // One address, two names: TLS checks each name, so both are kept.
        let list = ServerList::parse("db.example:7443,one.example:7443").unwrap();
        let (targets, _) = list.resolve_with(table, SECOND).await;
        assert_eq!(targets.len(), 3);
        let list = ServerList::parse("127.0.0.1:5,127.0.0.1:5").unwrap();
        let (targets, _) = list.resolve_with(table, SECOND).await;
        assert_eq!(targets.len(), 1);
    }

    #[tokio::test]
    async fn failover_tries_each_endpoint_in_order_once_per_round() {
        let list = ServerList::parse("db.example:7443,127.0.0.1:1").unwrap();
        let (targets, _) = list.resolve_with(table, SECOND).await;
        let mut eps = Endpoints::new(list, targets.clone(), &targets[1]);
        assert_eq!(eps.current().addr, addr("10.0.0.2:7443"));
        // The one in use fails: the first in order that has not failed.
        assert_eq!(eps.failed().unwrap().addr, addr("10.0.0.1:7443"));
        assert_eq!(eps.failed().unwrap().addr, addr("127.0.0.1:1"));
        assert!(eps.failed().is_none(), "every endpoint failed this round");
        // A success starts a new round.
        eps.succeeded();
        assert_eq!(eps.failed().unwrap().addr, addr("10.0.0.1:7443"));
    }

    #[tokio::test]
    async fn resolving_again_finds_moved_replicas_and_keeps_unresolvable_ones() {
        let list = ServerList::parse("db.example:7443,127.0.0.1:1").unwrap();
        let (targets, _) = list.resolve_with(table, SECOND).await;
        let mut eps = Endpoints::new(list.clone(), targets.clone(), &targets[2]);
        // db.example moved to a third address.
        let moved = vec![
            Target {
                server: list.servers()[0].clone(),
                addr: addr("10.0.0.3:7443"),
            },
            targets[2].clone(),
        ];
        eps.replace(moved, &[]);
        assert_eq!(eps.len(), 2);
        assert_eq!(eps.current().addr, addr("10.0.0.3:7443"), "from the top");
        // db.example does not resolve now: its last addresses are kept.
        let failed = vec![Unresolved::new(&list.servers()[0], "timeout".into())];
        eps.replace(vec![targets[2].clone()], &failed);
        assert_eq!(eps.current().addr, addr("10.0.0.3:7443"));
        assert_eq!(eps.len(), 2);
    }
}
