//! A sandbox VM's network on the host: the guest's packets (PACKET frames from its `kiln0`) go
//! into a user-space TCP/IP stack (`kiln_netstack`) that terminates every connection and opens
//! the allowed ones from here, under the sandbox's egress policy — its function's `allowed_hosts`
//! and connectors, and its own connectors.
//!
//! Raw TCP carries no host name, so a destination is judged by its address and port:
//! - an address an entry names literally (`http://203.0.113.7:8080`), on the entry's port;
//! - an address Kiln's resolver gave this guest for a name an entry names, on that entry's port
//!   (the guest resolves only through Kiln: DNS to 10.0.2.3, answered here), and internal
//!   addresses only as the wasm tier allows them (literal, or a connector's `allow_private` range);
//! - a datagram goes by the same rules, to an entry of a connector with `"udp": true` only;
//! - the gateway, 10.0.2.2, stands for the host's own loopback (as in QEMU's user networking):
//!   `10.0.2.2:P` reaches `127.0.0.1:P` only when an entry names `127.0.0.1:P` literally;
//! - `kiln.internal` always resolves, to 10.0.2.4, whose port 80 Kiln serves in-process — HTTP/1.1,
//!   `GET /identity?aud=…` as on the Wasm tier (`crate::identity::endpoint`), tokens naming this
//!   VM's sandbox. Nothing is dialled; other ports there are refused.
//!
//! The scheme of an entry does not matter here (an `https://` entry's port is 443): the policy
//! is about where bytes may go, and the guest speaks what it likes over an allowed connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use kiln_netstack::{Config, Decision, Network, Protocol, Service};
use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use tokio::sync::mpsc;

use crate::identity::{endpoint, Identity};
use crate::tier::wasm::egress::Rule;

/// Where `kiln.internal` is in every guest's network.
pub const KILN_INTERNAL: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 4);
/// The port Kiln serves there.
const KILN_INTERNAL_PORT: u16 = 80;

/// Time Kiln's resolver gets for one name.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a guest may cache an answer.
const TTL_S: u32 = 60;
/// Packets queued between the guest and the stack, each way.
const QUEUE: usize = 1024;

/// A VM's network: the stack, and what feeds it.
pub struct GuestNetwork {
    pub network: Network,
    /// The guest's packets, for the stack.
    pub from_guest: mpsc::Sender<Vec<u8>>,
    /// The stack's packets, for the guest (the VM's pump sends them as PACKET frames).
    pub to_guest: mpsc::Receiver<Vec<u8>>,
}

/// Starts the network of a VM whose egress is `rules`, and whose tokens from `kiln.internal` say
/// it is `identity`.
pub fn start(rules: Vec<Rule>, sandbox: &str, identity: Option<Identity>) -> Result<GuestNetwork, String> {
    let policy = Arc::new(Policy {
        rules,
        resolved: Mutex::new(HashMap::new()),
        sandbox: sandbox.to_owned(),
        internal: kiln_internal(identity),
    });
    let (from_guest, stack_in) = mpsc::channel(QUEUE);
    let (stack_out, to_guest) = mpsc::channel(QUEUE);
    let config = Config::default();
    let gateway = config.gateway;
    let decide = {
        let policy = policy.clone();
        move |protocol, destination: SocketAddrV4| policy.decide(protocol, destination, gateway)
    };
    let dns = move |query: Vec<u8>| {
        let policy = policy.clone();
        async move { policy.answer(&query).await }
    };
    let network = Network::spawn(config, decide, dns, stack_in, stack_out).map_err(|e| e.to_string())?;
    Ok(GuestNetwork {
        network,
        from_guest,
        to_guest,
    })
}

/// `kiln.internal` for one VM: an HTTP/1.1 server on each connection, answering as
/// [`endpoint::respond`] does.
fn kiln_internal(identity: Option<Identity>) -> Service {
    let identity = Arc::new(identity);
    Service::new(move |stream| {
        let identity = identity.clone();
        async move {
            let answer = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (status, body) = endpoint::respond(identity.as_ref().as_ref(), request.method(), request.uri());
                let response = hyper::Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header(http::header::CACHE_CONTROL, "no-store")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("static headers are valid");
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), answer)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "a kiln.internal connection ended badly");
            }
        }
    })
}

struct Policy {
    rules: Vec<Rule>,
    /// The names each address was given out for by this VM's resolver.
    resolved: Mutex<HashMap<Ipv4Addr, Vec<String>>>,
    sandbox: String,
    /// Serves `kiln.internal`.
    internal: Service,
}

impl Policy {
    fn decide(&self, protocol: Protocol, destination: SocketAddrV4, gateway: Ipv4Addr) -> Decision {
        let (ip, port) = (*destination.ip(), destination.port());
        let allows = |rule: &Rule, host: &str| match protocol {
            Protocol::Tcp => rule.allows_tcp(host, port),
            Protocol::Udp => rule.allows_udp(host, port),
        };
        if ip == KILN_INTERNAL {
            return if protocol == Protocol::Tcp && port == KILN_INTERNAL_PORT {
                Decision::Serve(self.internal.clone())
            } else {
                self.denied(destination)
            };
        }
        if ip == gateway {
            let loopback = Ipv4Addr::LOCALHOST.to_string();
            return if self.rules.iter().any(|rule| allows(rule, &loopback)) {
                Decision::Allow(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            } else {
                self.denied(destination)
            };
        }
        let literal = self.rules.iter().any(|rule| allows(rule, &ip.to_string()));
        let by_name = || {
            let resolved = self.resolved.lock().expect("resolved lock poisoned");
            resolved.get(&ip).is_some_and(|names| {
                names.iter().any(|name| {
                    self.rules
                        .iter()
                        .any(|rule| allows(rule, name) && rule.may_reach(IpAddr::V4(ip)))
                })
            })
        };
        if literal || by_name() {
            Decision::Allow(SocketAddr::V4(destination))
        } else {
            self.denied(destination)
        }
    }

    fn denied(&self, destination: SocketAddrV4) -> Decision {
        tracing::debug!(sandbox = %self.sandbox, %destination, "a guest connection its egress policy does not allow");
        Decision::Deny
    }

    /// Answers a guest's DNS query: A records for a name some entry names (resolved by the
    /// host), no records for other types, NXDOMAIN for names no entry names. `None` for what is
    /// not a query.
    async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let query = Packet::parse(query).ok()?;
        if query.has_flags(PacketFlag::RESPONSE) || query.questions.len() != 1 {
            return None;
        }
        let question = &query.questions[0];
        let name = question.qname.to_string().trim_end_matches('.').to_ascii_lowercase();
        let mut reply = Packet::new_reply(query.id());
        reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
        if query.has_flags(PacketFlag::RECURSION_DESIRED) {
            reply.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        reply.questions.push(question.clone());
        let internal = name == endpoint::HOST;
        let allowed = internal || (!name.is_empty() && self.rules.iter().any(|rule| rule.names_host(&name)));
        if !allowed {
            *reply.rcode_mut() = RCODE::NameError;
        } else if question.qtype == QTYPE::TYPE(TYPE::A) && question.qclass == QCLASS::CLASS(CLASS::IN) {
            let found = if internal {
                Some(vec![KILN_INTERNAL])
            } else {
                self.lookup(&name).await
            };
            match found {
                Some(addresses) => {
                    for address in addresses {
                        reply.answers.push(ResourceRecord::new(
                            question.qname.clone(),
                            CLASS::IN,
                            TTL_S,
                            RData::A(A::from(address)),
                        ));
                    }
                }
                None => *reply.rcode_mut() = RCODE::ServerFailure,
            }
        }
        // Any other type of an allowed name (AAAA: the guest network is IPv4): no records.
        reply.build_bytes_vec_compressed().ok()
    }

    /// The IPv4 addresses of `name`, remembered as given out for it.
    async fn lookup(&self, name: &str) -> Option<Vec<Ipv4Addr>> {
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0)))
            .await
            .ok()?
            .ok()?;
        let addresses: Vec<Ipv4Addr> = found
            .filter_map(|address| match address.ip() {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })
            .collect();
        let mut resolved = self.resolved.lock().expect("resolved lock poisoned");
        for ip in &addresses {
            let names = resolved.entry(*ip).or_default();
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        Some(addresses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> Policy {
        Policy {
            rules: entries.iter().map(|e| Rule::parse(e).unwrap()).collect(),
            resolved: Mutex::new(HashMap::new()),
            sandbox: "sbx_test".into(),
            internal: kiln_internal(None),
        }
    }

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut packet = Packet::new_query(7);
        packet.set_flags(PacketFlag::RECURSION_DESIRED);
        packet.questions.push(simple_dns::Question::new(
            simple_dns::Name::new_unchecked(name),
            qtype.into(),
            CLASS::IN.into(),
            false,
        ));
        packet.build_bytes_vec().unwrap()
    }

    fn gateway() -> Ipv4Addr {
        Config::default().gateway
    }

    #[test]
    fn the_gateway_is_the_hosts_loopback_only_where_an_entry_names_it() {
        let policy = policy(&["http://127.0.0.1:8080"]);
        let to = |ip: Ipv4Addr, port| policy.decide(Protocol::Tcp, SocketAddrV4::new(ip, port), gateway());
        assert_eq!(
            to(gateway(), 8080),
            Decision::Allow(SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)))
        );
        assert_eq!(to(gateway(), 8081), Decision::Deny);
        assert_eq!(
            to(Ipv4Addr::LOCALHOST, 8080),
            Decision::Allow("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(to(Ipv4Addr::new(10, 0, 2, 9), 8080), Decision::Deny);
    }

    #[tokio::test]
    async fn names_resolve_only_under_the_policy_and_open_only_their_ports() {
        let policy = policy(&["http://localhost:9000"]);
        let answer = policy.answer(&query("localhost", TYPE::A)).await.unwrap();
        let answer = Packet::parse(&answer).unwrap();
        assert_eq!(answer.id(), 7);
        assert_eq!(answer.rcode(), RCODE::NoError);
        let addresses: Vec<Ipv4Addr> = answer
            .answers
            .iter()
            .filter_map(|record| match &record.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        assert!(addresses.contains(&Ipv4Addr::LOCALHOST), "{addresses:?}");
        // Resolved through Kiln: reachable on the entry's port only, and (loopback being
        // internal, named by name not literally) refused all the same.
        let to = |port| policy.decide(Protocol::Tcp, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), gateway());
        assert_eq!(
            to(9000),
            Decision::Deny,
            "an internal address needs a literal entry or a range"
        );
        let nowhere = Packet::parse(&policy.answer(&query("example.org", TYPE::A)).await.unwrap())
            .unwrap()
            .rcode();
        assert_eq!(nowhere, RCODE::NameError);
        let six = policy.answer(&query("localhost", TYPE::AAAA)).await.unwrap();
        let six = Packet::parse(&six).unwrap();
        assert_eq!((six.rcode(), six.answers.len()), (RCODE::NoError, 0));
        assert!(policy.answer(b"not dns").await.is_none());
    }

    #[tokio::test]
    async fn a_connectors_range_lets_a_resolved_internal_address_through() {
        let private: Arc<[ipnet::IpNet]> = vec!["127.0.0.0/8".parse().unwrap()].into();
        let policy = Policy {
            rules: vec![Rule::parse("http://localhost:9000").unwrap().reaching(private)],
            resolved: Mutex::new(HashMap::new()),
            sandbox: "sbx_test".into(),
            internal: kiln_internal(None),
        };
        let to = |port| policy.decide(Protocol::Tcp, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), gateway());
        assert_eq!(to(9000), Decision::Deny, "not resolved through Kiln yet");
        policy.answer(&query("localhost", TYPE::A)).await.unwrap();
        assert_eq!(to(9000), Decision::Allow("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(to(9001), Decision::Deny);
    }

    #[test]
    fn datagrams_go_only_where_a_udp_entry_allows_them() {
        let udp = Rule::parse("http://127.0.0.1:5353").unwrap().with_udp(true);
        let tcp_only = Rule::parse("http://198.51.100.7:443").unwrap();
        let policy = Policy {
            rules: vec![udp, tcp_only],
            resolved: Mutex::new(HashMap::new()),
            sandbox: "sbx_test".into(),
            internal: kiln_internal(None),
        };
        let to = |protocol, ip, port| policy.decide(protocol, SocketAddrV4::new(ip, port), gateway());
        let loopback = Decision::Allow(SocketAddr::from((Ipv4Addr::LOCALHOST, 5353)));
        assert_eq!(to(Protocol::Udp, gateway(), 5353), loopback);
        assert_eq!(
            to(Protocol::Tcp, gateway(), 5353),
            loopback,
            "a UDP entry is a TCP one too"
        );
        assert_eq!(to(Protocol::Udp, gateway(), 5354), Decision::Deny);
        let public = Ipv4Addr::new(198, 51, 100, 7);
        assert_eq!(to(Protocol::Udp, public, 443), Decision::Deny, "no udp on that entry");
        assert_eq!(
            to(Protocol::Tcp, public, 443),
            Decision::Allow(SocketAddr::from((public, 443)))
        );
        assert_eq!(to(Protocol::Udp, KILN_INTERNAL, 80), Decision::Deny);
    }

    #[tokio::test]
    async fn kiln_internal_resolves_and_is_served_whatever_the_rules() {
        let policy = policy(&[]);
        let answer = Packet::parse(&policy.answer(&query("KILN.internal.", TYPE::A)).await.unwrap())
            .unwrap()
            .answers
            .iter()
            .map(|record| record.rdata.clone().into_owned())
            .collect::<Vec<_>>();
        assert_eq!(answer, vec![RData::A(A::from(KILN_INTERNAL))]);
        let to = |port| policy.decide(Protocol::Tcp, SocketAddrV4::new(KILN_INTERNAL, port), gateway());
        assert_eq!(to(80), Decision::Serve(policy.internal.clone()));
        assert_eq!(to(443), Decision::Deny);
        assert_eq!(to(8080), Decision::Deny);
    }

    /// One HTTP/1.1 exchange with a `kiln.internal` service, as a guest's `wget` makes it.
    async fn get(service: &Service, target: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut guest, host) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(service.serve(host));
        let request = format!("GET {target} HTTP/1.1\r\nHost: kiln.internal\r\nConnection: close\r\n\r\n");
        guest.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        guest.read_to_string(&mut response).await.unwrap();
        served.await.unwrap();
        response
    }

    #[tokio::test]
    async fn kiln_internal_issues_tokens_naming_the_vms_sandbox() {
        use crate::clock::ManualClock;
        use crate::identity::{Issuer, Subject, Workload};
        let dir = tempfile::tempdir().unwrap();
        let issuer = Issuer::open("http://kiln.test", dir.path(), ManualClock::at(1_800_000_000_000)).unwrap();
        let workload = Workload {
            subject: Subject::Sandbox("sbx_42".to_owned()),
            function: "vm".to_owned(),
            version: 3,
            digest: "sha256:00".to_owned(),
        };
        let service = kiln_internal(Some(Identity::new(Arc::new(issuer), workload)));

        let response = get(&service, "/identity?aud=payments").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("content-type: application/json"), "{response}");
        let body: serde_json::Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let claims = body["token"].as_str().unwrap().split('.').nth(1).unwrap().to_owned();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (
                claims["sub"].as_str(),
                claims["aud"].as_str(),
                claims["version"].as_u64()
            ),
            (Some("sandbox:sbx_42"), Some("payments"), Some(3))
        );
        assert!(get(&service, "/identity").await.starts_with("HTTP/1.1 400 "));
        assert!(get(&service, "/metadata").await.starts_with("HTTP/1.1 404 "));
        let nobody = kiln_internal(None);
        assert!(get(&nobody, "/identity?aud=a").await.starts_with("HTTP/1.1 503 "));
    }
}
