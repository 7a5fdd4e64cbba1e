//! Outbound HTTP for guests (`wasi:http/outgoing-handler`): denied unless the destination matches
//! the function's `allowed_hosts`. Requests to `kiln.internal` never leave the host: they are
//! answered in-process by [`crate::identity::endpoint`], whatever the policy.
//!
//! The check is made on the request's own scheme, host and port — never on a `Host` header the
//! guest may have set — and then again on the addresses the host name resolves to: private,
//! loopback, link-local and other non-public addresses are refused unless the matching entry
//! names that address literally (`http://127.0.0.1:8080`). Kiln connects to the address it
//! checked, not to a second lookup of the name, so a DNS answer that changes between check and
//! connect (rebinding) cannot redirect the request.
//!
//! Entries are `scheme://host[:port]`; `host` may start with `*.` to match any subdomain; without
//! a port, the scheme's default port (80 or 443) is the only one allowed.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http_body_util::{BodyExt, Full};
use ipnet::IpNet;
use tokio::sync::Semaphore;
use wasmtime_wasi_http::{Error, ForbiddenHeaderFilter, RequestOptions, WasiBody, WasiHttpHooks};

use crate::identity::{endpoint, Identity};

/// Time to resolve and connect, unless the guest's request options ask for less.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to the response's headers, unless the guest asks for less. The function's own timeout
/// bounds the whole invocation anyway.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);

/// One `allowed_hosts` entry (a function's own, or an egress connector's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    https: bool,
    host: HostPattern,
    port: u16,
    /// Internal ranges the host may resolve into and still be reached (a connector's
    /// `allow_private`); empty for a function's own entries.
    private: Arc<[IpNet]>,
    /// Datagrams to the same host and port may go too (a connector's `udp`; microVMs only).
    udp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com`.
    Subdomains(String),
    Ip(IpAddr),
}

impl Rule {
    pub fn parse(entry: &str) -> Result<Rule, String> {
        let bad = |why: &str| format!("allowed_hosts entry {entry:?} {why}");
        let (https, rest) = if let Some(rest) = entry.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = entry.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad("must be scheme://host[:port], without a path, query or user"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = split_host_port(authority, default_port).ok_or_else(|| bad("has an invalid port"))?;
        let host = if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            HostPattern::Ip(ip)
        } else {
            let host = host.to_ascii_lowercase();
            let (pattern, name) = match host.strip_prefix("*.") {
                Some(suffix) => (HostPattern::Subdomains(suffix.to_owned()), suffix),
                None => (HostPattern::Exact(host.clone()), host.as_str()),
            };
            let valid = !name.is_empty()
                && name
                    .split('.')
                    .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            if !valid {
                return Err(bad("has an invalid host name"));
            }
            pattern
        };
        Ok(Rule {
            https,
            host,
            port,
            private: Arc::new([]),
            udp: false,
        })
    }

    /// The same entry, also reaching the internal addresses in `private`.
    pub fn reaching(self, private: Arc<[IpNet]>) -> Rule {
        Rule { private, ..self }
    }

    /// The same entry, for UDP as well as TCP.
    pub fn with_udp(self, udp: bool) -> Rule {
        Rule { udp, ..self }
    }

    /// Whether a request this rule matched may go to `ip`: a public address, one the entry names
    /// literally, or one in the ranges it was given.
    pub fn may_reach(&self, ip: IpAddr) -> bool {
        matches!(self.host, HostPattern::Ip(_)) || !is_internal(ip) || crate::connectors::in_ranges(&self.private, ip)
    }

    /// Whether a request to `https`, `host` (as a URI gives it) and `port` matches, as the policy
    /// decides it: for the fuzz targets in `fuzz/`; not an API.
    #[doc(hidden)]
    pub fn allows(&self, https: bool, host: &str, port: u16) -> bool {
        self.matches(https, &Host::of(host), port)
    }

    fn matches(&self, https: bool, host: &Host, port: u16) -> bool {
        self.https == https && self.port == port && self.names(host)
    }

    /// Whether a raw TCP connection (a microVM's: no scheme) to `host` — an address, or a name
    /// the guest resolved through Kiln — on `port` matches this entry.
    pub fn allows_tcp(&self, host: &str, port: u16) -> bool {
        self.port == port && self.names(&Host::of(host))
    }

    /// Whether a datagram (a microVM's) to `host` on `port` matches: as [`Rule::allows_tcp`], for
    /// an entry that allows UDP.
    pub fn allows_udp(&self, host: &str, port: u16) -> bool {
        self.udp && self.allows_tcp(host, port)
    }

    /// Whether this entry names `name` (on any port): a name the guest may resolve.
    pub fn names_host(&self, name: &str) -> bool {
        self.names(&Host::of(name))
    }

    fn names(&self, host: &Host) -> bool {
        match (&self.host, host) {
            (HostPattern::Exact(rule), Host::Name(name)) => rule == name,
            (HostPattern::Subdomains(suffix), Host::Name(name)) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (HostPattern::Ip(rule), Host::Ip(ip)) => rule == ip,
            _ => false,
        }
    }
}

/// The canonical form of an entry (lowercase, explicit port), which parses back to the same rule.
impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        match &self.host {
            HostPattern::Exact(name) => write!(f, "{scheme}://{name}:{}", self.port),
            HostPattern::Subdomains(suffix) => write!(f, "{scheme}://*.{suffix}:{}", self.port),
            HostPattern::Ip(ip) => write!(f, "{scheme}://{}", SocketAddr::new(*ip, self.port)),
        }
    }
}

/// `host[:port]` with IPv6 in brackets.
fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    let port_at = if authority.starts_with('[') {
        authority.find(']').map(|end| end + 1)?
    } else {
        authority.rfind(':').unwrap_or(authority.len())
    };
    let (host, port) = authority.split_at(port_at);
    let port = match port.strip_prefix(':') {
        None if port.is_empty() => default_port,
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => digits.parse().ok()?,
        _ => return None,
    };
    (!host.is_empty()).then_some((host, port))
}

/// A request's destination host.
#[derive(Debug, PartialEq, Eq)]
enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    fn of(host: &str) -> Host {
        let trimmed = host.trim_start_matches('[').trim_end_matches(']');
        match trimmed.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.trim_end_matches('.').to_ascii_lowercase()),
        }
    }
}

/// True for addresses that are not on the public internet: loopback, private ranges, link-local,
/// carrier-grade NAT, multicast, unspecified and reserved, including IPv4 inside IPv6 forms.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (b == 18 || b == 19))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| is_internal(IpAddr::V4(Ipv4Addr::from(((hi as u32) << 16) | lo as u32)));
            // IPv4-compatible (::a.b.c.d, which includes :: and ::1) and IPv4-translated
            // (::ffff:0:a.b.c.d) forms have no public use.
            if s[..6] == [0; 6] || s[..6] == [0, 0, 0, 0, 0xffff, 0] {
                return true;
            }
            // The well-known NAT64 prefix (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4
            // address: judge that one.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded(s[6], s[7]);
            }
            if s[0] == 0x2002 {
                return embedded(s[1], s[2]);
            }
            // Only global unicast (2000::/3) is public, minus documentation (2001:db8::/32) and
            // Teredo (2001::/32). Everything else — ULA, link- and site-local, multicast, local
            // NAT64 prefixes — is internal.
            let global = (s[0] & 0xe000) == 0x2000;
            !global || (s[0] == 0x2001 && (s[1] == 0x0db8 || s[1] == 0))
        }
    }
}

/// Outbound requests one instance may have open at once (connecting, or with a response body
/// still open); past it the guest gets `ConnectionLimitReached`.
const MAX_OUTBOUND_PER_INSTANCE: usize = 32;
/// Name lookups in flight at once, server-wide: each holds a thread of the blocking pool.
const MAX_LOOKUPS: usize = 64;
/// Name lookups one instance may have in flight: its share of the server's, so one tenant's slow
/// names cannot take every slot.
const MAX_LOOKUPS_PER_INSTANCE: usize = 4;

/// What completes an outbound exchange after its response headers arrived (the connection
/// still carrying the body).
pub type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;
/// A sent request's response, and the rest of its exchange.
pub type Sent = Result<(http::Response<WasiBody>, IoFuture), Error>;

/// Where an allowed request goes: the addresses the policy checked (and only those), and how to
/// speak to them.
#[derive(Debug, Clone)]
pub struct Destination {
    pub addresses: Vec<SocketAddr>,
    pub https: bool,
    /// The name to verify the server's certificate against (the request's host).
    pub server_name: String,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
}

/// Opens the connection for an allowed request and sends it. The core decides *whether* and
/// *where*; the connector (the server crate's, on hyper and rustls) speaks HTTP.
pub trait Connector: Send + Sync + 'static {
    fn send(
        &self,
        destination: Destination,
        request: http::Request<WasiBody>,
    ) -> Pin<Box<dyn Future<Output = Sent> + Send>>;
}

/// A connector that sends nothing: what a core without a server (benchmarks, tests) gives its
/// functions. Every request is refused as if no entry allowed it.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoConnector;

impl Connector for NoConnector {
    fn send(&self, _: Destination, _: http::Request<WasiBody>) -> Pin<Box<dyn Future<Output = Sent> + Send>> {
        Box::pin(async { Err(Error::HttpRequestDenied) })
    }
}

/// Checks `allowed_hosts` entries (a deploy's config).
pub fn check_allowed_hosts(entries: &[String]) -> Result<(), String> {
    entries.iter().try_for_each(|entry| Rule::parse(entry).map(drop))
}

/// A function's outbound policy: the `WasiHttpHooks` of its instances.
#[derive(Clone)]
pub struct Egress {
    rules: Arc<[Rule]>,
    outbound: Arc<Semaphore>,
    /// This instance's share of the server's name-lookup slots.
    lookups: Arc<Semaphore>,
    connector: Arc<dyn Connector>,
    /// Who the instance is, for `http://kiln.internal/identity` (`crate::identity::endpoint`).
    identity: Option<Identity>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Egress {
    /// The policy of `allowed_hosts` and the `extra` rules of the connectors a config names.
    pub fn new(allowed_hosts: &[String], extra: Vec<Rule>, connector: Arc<dyn Connector>) -> Result<Egress, String> {
        let mut rules = allowed_hosts
            .iter()
            .map(|entry| Rule::parse(entry))
            .collect::<Result<Vec<_>, _>>()?;
        rules.extend(extra);
        Ok(Egress {
            rules: rules.into(),
            outbound: Arc::new(Semaphore::new(MAX_OUTBOUND_PER_INSTANCE)),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS_PER_INSTANCE)),
            connector,
            identity: None,
        })
    }

    /// A policy that allows nothing.
    pub fn deny_all(connector: Arc<dyn Connector>) -> Egress {
        Egress::new(&[], Vec::new(), connector).expect("no entries parse")
    }

    /// These rules and `extra` (a sandbox's own connectors).
    pub fn with_rules(&self, extra: Vec<Rule>) -> Egress {
        if extra.is_empty() {
            return self.clone();
        }
        let mut rules = self.rules.to_vec();
        rules.extend(extra);
        Egress {
            rules: rules.into(),
            ..self.for_instance()
        }
    }

    /// The same rules with this instance's own cap on open requests.
    pub fn for_instance(&self) -> Egress {
        Egress {
            rules: self.rules.clone(),
            outbound: Arc::new(Semaphore::new(MAX_OUTBOUND_PER_INSTANCE)),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS_PER_INSTANCE)),
            connector: self.connector.clone(),
            identity: None,
        }
    }

    /// The same policy for an instance that is `identity`.
    pub fn with_identity(mut self, identity: Option<Identity>) -> Egress {
        self.identity = identity;
        self
    }

    /// Decides where a request may go: the addresses to connect to, or why not.
    async fn destination(&self, uri: &http::Uri) -> Result<(Vec<SocketAddr>, bool, String), Error> {
        let https = match uri.scheme() {
            Some(s) if *s == Scheme::HTTPS => true,
            Some(s) if *s == Scheme::HTTP => false,
            _ => return Err(Error::HttpRequestDenied),
        };
        let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
        // Credentials in the authority would travel in the Host header; refuse them outright.
        if authority.as_str().contains('@') {
            return Err(Error::HttpRequestUriInvalid);
        }
        let host = Host::of(authority.host());
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let matching: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|rule| rule.matches(https, &host, port))
            .collect();
        if matching.is_empty() {
            return Err(Error::HttpRequestDenied);
        }
        let (addresses, name) = match &host {
            Host::Ip(ip) => (vec![SocketAddr::new(*ip, port)], ip.to_string()),
            Host::Name(name) => {
                static LOOKUPS: Semaphore = Semaphore::const_new(MAX_LOOKUPS);
                // Waiting for a slot counts against the same deadline as the lookup itself: a
                // slot held by someone's slow name is never waited on for longer.
                let lookup = async {
                    let _mine = self.lookups.acquire().await.map_err(|_| Error::DnsTimeout)?;
                    let _server_wide = LOOKUPS.acquire().await.map_err(|_| Error::DnsTimeout)?;
                    tokio::net::lookup_host((name.as_str(), port))
                        .await
                        .map_err(|_| Error::DnsError {
                            rcode: Some("name not resolved".to_owned()),
                            info_code: None,
                        })
                };
                let found = tokio::time::timeout(CONNECT_TIMEOUT, lookup)
                    .await
                    .map_err(|_| Error::DnsTimeout)??;
                (found.collect(), name.clone())
            }
        };
        // An internal address is reachable only through an entry that names it literally, or a
        // connector's entry that allows its range.
        let allowed: Vec<SocketAddr> = addresses
            .into_iter()
            .filter(|addr| matching.iter().any(|rule| rule.may_reach(addr.ip())))
            .collect();
        if allowed.is_empty() {
            return Err(Error::DestinationIpProhibited);
        }
        Ok((allowed, https, name))
    }
}

/// Sends a request the policy allowed, to one of the checked addresses.
async fn send(egress: Egress, request: http::Request<WasiBody>, options: Option<RequestOptions>) -> Sent {
    // Held until the exchange is done with (it moves into the I/O future below).
    let slot = egress
        .outbound
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::ConnectionLimitReached)?;
    let (addresses, https, server_name) = egress.destination(request.uri()).await?;
    let destination = Destination {
        addresses,
        https,
        server_name,
        connect_timeout: options
            .and_then(|o| o.connect_timeout)
            .unwrap_or(CONNECT_TIMEOUT)
            .min(CONNECT_TIMEOUT),
        first_byte_timeout: options
            .and_then(|o| o.first_byte_timeout)
            .unwrap_or(FIRST_BYTE_TIMEOUT)
            .min(FIRST_BYTE_TIMEOUT),
    };
    let (response, io) = egress.connector.send(destination, request).await?;
    let io: IoFuture = Box::new(async move {
        let _slot = slot;
        Box::into_pin(io).await
    });
    Ok((response, io))
}

/// Kiln's answer to a request for `kiln.internal`, as `wasi:http` takes a response.
fn internal(identity: Option<&Identity>, method: &http::Method, uri: &http::Uri) -> Sent {
    let (status, body) = endpoint::respond(identity, method, uri);
    let response = http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static headers are valid");
    let done: IoFuture = Box::new(async { Ok(()) });
    Ok((response, done))
}

impl WasiHttpHooks for Egress {
    fn forbidden_header_filter(&mut self) -> ForbiddenHeaderFilter {
        Arc::new(|name| wasmtime_wasi_http::DEFAULT_FORBIDDEN_HEADERS.contains(name))
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        drop(fut);
        // Kiln's own host is answered here, before any policy, name lookup or connection.
        if endpoint::is_internal(request.uri()) {
            let answer = internal(self.identity.as_ref(), request.method(), request.uri());
            return Box::new(async move { answer });
        }
        let egress = self.clone();
        Box::new(async move { send(egress, request, options).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup waits for a slot no longer than the lookup deadline: an instance whose share of
    /// the slots is taken (its own slow names) gets `DnsTimeout`, and never resolves anything.
    #[tokio::test(start_paused = true)]
    async fn a_lookup_waits_for_its_slot_no_longer_than_the_deadline() {
        let egress = Egress::new(&["http://slow.example".to_owned()], Vec::new(), Arc::new(NoConnector))
            .unwrap()
            .for_instance();
        let _taken = egress
            .lookups
            .clone()
            .acquire_many_owned(MAX_LOOKUPS_PER_INSTANCE as u32)
            .await
            .unwrap();
        let uri: http::Uri = "http://slow.example/".parse().unwrap();
        let started = tokio::time::Instant::now();
        let refused = egress.destination(&uri).await.unwrap_err();
        assert!(matches!(refused, Error::DnsTimeout), "{refused:?}");
        assert_eq!(started.elapsed(), CONNECT_TIMEOUT);
        // Another instance of the same function has its own share.
        assert_eq!(
            egress.for_instance().lookups.available_permits(),
            MAX_LOOKUPS_PER_INSTANCE
        );
    }

    #[test]
    fn entries_parse_strictly() {
        assert!(Rule::parse("https://api.example.com").is_ok());
        assert!(Rule::parse("http://127.0.0.1:8080/").is_ok());
        assert!(Rule::parse("https://*.example.com:8443").is_ok());
        assert!(Rule::parse("http://[::1]:9000").is_ok());
        for bad in [
            "ftp://x",
            "example.com",
            "https://",
            "https://a.com/path",
            "https://user@a.com",
            "https://a.com:",
            "https://a.com:99999",
            "https://a..com",
            "https://*.",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn rules_print_in_canonical_form() {
        for (entry, canonical) in [
            ("https://API.example.com/", "https://api.example.com:443"),
            ("https://*.example.com:8443", "https://*.example.com:8443"),
            ("http://[::1]:9000", "http://[::1]:9000"),
            ("http://127.0.0.1", "http://127.0.0.1:80"),
        ] {
            let rule = Rule::parse(entry).unwrap();
            assert_eq!(rule.to_string(), canonical);
            assert_eq!(Rule::parse(canonical), Ok(rule));
        }
    }

    #[test]
    fn matching_is_on_scheme_host_and_port() {
        let exact = Rule::parse("https://api.example.com").unwrap();
        assert!(exact.matches(true, &Host::of("API.example.com."), 443));
        assert!(!exact.matches(false, &Host::of("api.example.com"), 443));
        assert!(!exact.matches(true, &Host::of("api.example.com"), 8443));
        assert!(!exact.matches(true, &Host::of("api.example.com.evil.net"), 443));
        let wild = Rule::parse("https://*.example.com").unwrap();
        assert!(wild.matches(true, &Host::of("a.b.example.com"), 443));
        assert!(!wild.matches(true, &Host::of("example.com"), 443));
        assert!(!wild.matches(true, &Host::of("evilexample.com"), 443));
        let ip = Rule::parse("http://[::1]:9000").unwrap();
        assert!(ip.matches(false, &Host::of("[::1]"), 9000));
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "::7f00:1",
            "64:ff9b:1::a00:1",
            "2002:a00:1::",
            "fec0::1",
            "2001:db8::1",
            "2001:0:4136:e378::1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "2002:101:101::",
        ] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }
}
