//! The egress policy: which hosts and addresses a probe or verification may
//! contact, and the name resolution every check goes through so the policy
//! is applied to the address actually connected to (a name that resolves to
//! a denied address is refused, whatever the name looked like).
//!
//! [`EgressPolicy`] is pure (rules, classes of addresses, matching);
//! [`Egress`] pairs it with a [`Resolve`] and is what the checks ask for
//! addresses. Nothing here connects anywhere.

use ipnet::IpNet;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

/// A host name rule: an exact name (`db.example.com`) or every subdomain of
/// one (`*.example.com`, which does not match `example.com` itself).
/// Matching is case-insensitive and ignores a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostPattern {
    /// Lowercased, without a trailing dot; for a wildcard, the suffix with
    /// its leading dot (`.example.com`).
    name: String,
    wildcard: bool,
}

impl HostPattern {
    /// `Err` says what is wrong with the pattern.
    pub(crate) fn parse(s: &str) -> Result<HostPattern, String> {
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is not a host name, a *.suffix pattern, an IP address or a CIDR"
            ));
        }
        Ok(HostPattern {
            name: if wildcard {
                format!(".{name}")
            } else {
                name.to_owned()
            },
            wildcard,
        })
    }

    /// Whether `host` (a name as written in a url) matches.
    pub(crate) fn matches(&self, host: &str) -> bool {
        let host = normalise_name(host);
        if self.wildcard {
            host.len() > self.name.len() && host.ends_with(&self.name)
        } else {
            host == self.name
        }
    }
}

fn normalise_name(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// One `--egress-allow` or `--egress-deny` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Rule {
    /// A CIDR, or a single address as a /32 or /128.
    Net(IpNet),
    Host(HostPattern),
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Rule::Net(normalise_net(net)));
        }
        if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(Rule::Net(IpNet::from(canonical(ip))));
        }
        if s.contains('/') {
            return Err(format!("{s:?} is not a valid CIDR"));
        }
        HostPattern::parse(s).map(Rule::Host)
    }
}

/// An IPv4-mapped CIDR (`::ffff:10.0.0.0/104`) as the IPv4 one it means.
fn normalise_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net.trunc(),
    }
}

/// The address as the policy sees it: an IPv4 address written as IPv6
/// (`::ffff:a.b.c.d`, or the deprecated `::a.b.c.d`) is that IPv4 address.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // `::a.b.c.d`, but not `::` or `::1`.
            if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
                return IpAddr::V4(Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7])));
            }
            ip
        }
        IpAddr::V4(_) => ip,
    }
}

/// Whether loopback or private addresses may be contacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Access {
    Allow,
    Deny,
}

/// Names of cloud metadata services, never contacted.
const METADATA_NAMES: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Never contacted, whatever the flags: link-local (which holds the
/// 169.254.169.254 metadata service), other metadata addresses, unspecified,
/// multicast and broadcast.
const ALWAYS_DENIED: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "100.100.100.200/32",
    "fd00:ec2::254/128",
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
    "255.255.255.255/32",
];

const LOOPBACK: &[&str] = &["127.0.0.0/8", "::1/128"];

const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter()
        .map(|n| n.parse().expect("a built-in CIDR"))
        .collect()
}

/// Why a destination is not contacted; the text is what clients see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blocked {
    Denied,
    NotResolved,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Blocked::Denied => "denied by egress policy",
            Blocked::NotResolved => "name did not resolve",
        })
    }
}

impl std::error::Error for Blocked {}

/// Allow and deny rules plus the built-in classes. Deny wins: a deny rule
/// or an always-denied address is never contacted, whatever allows it.
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    loopback: Access,
    private: Access,
    always: Vec<IpNet>,
    loopback_nets: Vec<IpNet>,
    private_nets: Vec<IpNet>,
}

impl Default for EgressPolicy {
    /// Only the always-denied addresses and names are refused.
    fn default() -> Self {
        EgressPolicy::new(&[], &[], Access::Allow, Access::Allow).expect("no rules to refuse")
    }
}

impl EgressPolicy {
    /// `Err` names the first rule that cannot be parsed.
    pub(crate) fn new(
        allow: &[String],
        deny: &[String],
        loopback: Access,
        private: Access,
    ) -> Result<EgressPolicy, String> {
        let parse = |rules: &[String]| -> Result<Vec<Rule>, String> {
            rules
                .iter()
                .filter(|r| !r.trim().is_empty())
                .map(|r| r.parse())
                .collect()
        };
        Ok(EgressPolicy {
            allow: parse(allow)?,
            deny: parse(deny)?,
            loopback,
            private,
            always: nets(ALWAYS_DENIED),
            loopback_nets: nets(LOOPBACK),
            private_nets: nets(PRIVATE),
        })
    }

    /// Whether a host name as written may be contacted at all (its
    /// addresses are checked too, once resolved).
    pub(crate) fn permits_name(&self, name: &str) -> bool {
        let name = normalise_name(name);
        if METADATA_NAMES.contains(&name.as_str()) {
            return false;
        }
        let hits = |r: &Rule| matches!(r, Rule::Host(p) if p.matches(&name));
        if self.deny.iter().any(hits) {
            return false;
        }
        // With only host rules to allow by, a name none matches could not
        // reach any address: it is not even resolved.
        self.allow.is_empty()
            || self.allow.iter().any(|r| matches!(r, Rule::Net(_)))
            || self.allow.iter().any(hits)
    }

    /// Whether `ip` may be connected to, reached by the name `via` (`None`
    /// for an address written as one). In allow-list mode either the name
    /// or the address must match an allow rule. An allow CIDR covering a
    /// loopback or private address lets it through when its class is denied.
    pub(crate) fn permits_ip(&self, ip: IpAddr, via: Option<&str>) -> bool {
        let ip = canonical(ip);
        let in_any = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
        let net_hit = |r: &Rule| matches!(r, Rule::Net(n) if n.contains(&ip));
        if in_any(&self.always) || self.deny.iter().any(net_hit) {
            return false;
        }
        let allowed_by_cidr = self.allow.iter().any(net_hit);
        let class_denied = (self.loopback == Access::Deny && in_any(&self.loopback_nets))
            || (self.private == Access::Deny && in_any(&self.private_nets));
        if class_denied && !allowed_by_cidr {
            return false;
        }
        if self.allow.is_empty() || allowed_by_cidr {
            return true;
        }
        via.is_some_and(|name| {
            self.allow
                .iter()
                .any(|r| matches!(r, Rule::Host(p) if p.matches(name)))
        })
    }
}

/// A host as written in a url, read as an address when it is one in any
/// form the url standard accepts (`2852039166`, `0xa9fea9fe`, `[::1]`).
fn as_ip(host: &str) -> Option<IpAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(ip);
    }
    match url::Host::parse(host) {
        Ok(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Ok(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Turns a host name into addresses. The system resolver in production; a
/// table in tests, so a name can be made to resolve to a denied address.
pub trait Resolve: Send + Sync {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a>;
}

/// The operating system's resolver (`getaddrinfo`, via tokio).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// A fixed table of names and their addresses; any other name does not
/// resolve. For tests.
#[derive(Clone, Debug, Default)]
pub struct StubResolver(HashMap<String, Vec<IpAddr>>);

impl StubResolver {
    pub fn new() -> StubResolver {
        StubResolver::default()
    }

    /// `name` (case-insensitive) resolves to `addresses`.
    pub fn with(mut self, name: &str, addresses: &[IpAddr]) -> StubResolver {
        self.0.insert(normalise_name(name), addresses.to_vec());
        self
    }
}

impl Resolve for StubResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        let found = self.0.get(&normalise_name(host)).cloned();
        Box::pin(async move {
            found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such name"))
        })
    }
}

/// The policy and the resolver together: where a check may connect.
#[derive(Clone)]
pub(crate) struct Egress {
    policy: Arc<EgressPolicy>,
    resolver: Arc<dyn Resolve>,
}

impl Egress {
    pub(crate) fn new(policy: EgressPolicy, resolver: Arc<dyn Resolve>) -> Egress {
        Egress {
            policy: Arc::new(policy),
            resolver,
        }
    }

    /// The addresses of `host` the policy allows, in resolver order, each
    /// with `port`. `Err` when the name is denied, does not resolve, or
    /// every address it resolves to is denied.
    pub(crate) async fn addresses(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, Blocked> {
        if let Some(ip) = as_ip(host) {
            return if self.policy.permits_ip(ip, None) {
                Ok(vec![SocketAddr::new(ip, port)])
            } else {
                tracing::debug!(%host, "probe denied by egress policy");
                Err(Blocked::Denied)
            };
        }
        if !self.policy.permits_name(host) {
            tracing::debug!(%host, "probe denied by egress policy (name)");
            return Err(Blocked::Denied);
        }
        let resolved = self.resolver.resolve(host).await.map_err(|e| {
            tracing::debug!(%host, error = %e, "probe target did not resolve");
            Blocked::NotResolved
        })?;
        if resolved.is_empty() {
            return Err(Blocked::NotResolved);
        }
        let allowed: Vec<SocketAddr> = resolved
            .iter()
            .filter(|ip| self.policy.permits_ip(**ip, Some(host)))
            .map(|ip| SocketAddr::new(*ip, port))
            .collect();
        if allowed.is_empty() {
            tracing::debug!(%host, ?resolved, "probe denied by egress policy (resolved addresses)");
            return Err(Blocked::Denied);
        }
        Ok(allowed)
    }

    /// Whether an address written in a url may be contacted.
    pub(crate) fn permits_literal(&self, host: &str) -> Option<bool> {
        as_ip(host).map(|ip| self.policy.permits_ip(ip, None))
    }
}

/// Name resolution for reqwest through the policy: a request is only ever
/// sent to an address the policy allowed.
pub(crate) struct EgressDns(pub Egress);

impl reqwest::dns::Resolve for EgressDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.0.clone();
        Box::pin(async move {
            // reqwest puts the url's port on every address it is given.
            let addrs = egress.addresses(name.as_str(), 0).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The newest [`Blocked`] in an error's chain, if any.
pub(crate) fn blocked_in(e: &(dyn std::error::Error + 'static)) -> Option<Blocked> {
    super::prober::causes(e).find_map(|err| err.downcast_ref::<Blocked>().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], loopback: Access, private: Access) -> EgressPolicy {
        let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        EgressPolicy::new(&own(allow), &own(deny), loopback, private).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_patterns_match_exact_names_and_subdomains() {
        let exact = HostPattern::parse("DB.Example.com.").unwrap();
        assert!(exact.matches("db.example.com"));
        assert!(exact.matches("DB.EXAMPLE.COM."));
        assert!(!exact.matches("x.db.example.com"));
        let any = HostPattern::parse("*.example.com").unwrap();
        assert!(any.matches("a.example.com") && any.matches("a.b.Example.com"));
        assert!(!any.matches("example.com"));
        assert!(!any.matches("badexample.com"));
        for bad in ["", "*.", "a..b", "a b", "*x.com", "a.*.com", "http://a"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_parse_cidrs_addresses_and_names() {
        assert_eq!(
            "10.1.2.3/8".parse::<Rule>(),
            Ok(Rule::Net("10.0.0.0/8".parse().unwrap()))
        );
        assert_eq!(
            "fd00::/8".parse::<Rule>(),
            Ok(Rule::Net("fd00::/8".parse().unwrap()))
        );
        assert_eq!(
            "127.0.0.2".parse::<Rule>(),
            Ok(Rule::Net("127.0.0.2/32".parse().unwrap()))
        );
        assert_eq!(
            "::ffff:10.0.0.0/104".parse::<Rule>(),
            Ok(Rule::Net("10.0.0.0/8".parse().unwrap()))
        );
        assert!(matches!("*.corp.example".parse(), Ok(Rule::Host(_))));
        let e = "10.0.0.0/33".parse::<Rule>().unwrap_err();
        assert!(e.contains("CIDR"), "{e}");
        assert!(
            EgressPolicy::new(&["bad rule!".into()], &[], Access::Allow, Access::Allow).is_err()
        );
    }

    #[test]
    fn metadata_and_link_local_are_always_denied() {
        let open = policy(
            &["0.0.0.0/0", "::/0", "*.internal"],
            &[],
            Access::Allow,
            Access::Allow,
        );
        for a in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "100.100.100.200",
            "fd00:ec2::254",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
        ] {
            assert!(!open.permits_ip(ip(a), None), "{a}");
        }
        for n in [
            "metadata.google.internal",
            "METADATA.GOOGLE.INTERNAL.",
            "metadata.goog",
            "metadata",
            "instance-data",
            "instance-data.ec2.internal",
        ] {
            assert!(!open.permits_name(n), "{n}");
        }
        let default = EgressPolicy::default();
        assert!(!default.permits_ip(ip("169.254.169.254"), None));
        assert!(!default.permits_name("metadata.google.internal"));
        assert!(default.permits_ip(ip("8.8.8.8"), None));
        assert!(default.permits_ip(ip("127.0.0.1"), None));
        assert!(default.permits_ip(ip("10.1.2.3"), None));
        assert!(default.permits_name("db.example.com"));
    }

    #[test]
    fn decimal_and_hex_forms_are_the_address_they_spell() {
        let p = EgressPolicy::default();
        for written in [
            "2852039166",
            "0xa9fea9fe",
            "0251.0376.0251.0376",
            "169.254.43518",
        ] {
            let parsed = url::Url::parse(&format!("http://{written}/")).unwrap();
            let host = parsed.host_str().unwrap();
            assert_eq!(as_ip(host), Some(ip("169.254.169.254")), "{written}");
            assert_eq!(as_ip(written), Some(ip("169.254.169.254")), "{written}");
            assert!(!p.permits_ip(as_ip(written).unwrap(), None));
        }
        assert_eq!(
            as_ip("[::ffff:a9fe:a9fe]"),
            Some(ip("::ffff:169.254.169.254"))
        );
        assert_eq!(canonical(ip("::ffff:a9fe:a9fe")), ip("169.254.169.254"));
        assert_eq!(canonical(ip("::1")), ip("::1"));
    }

    #[test]
    fn loopback_and_private_ranges_follow_their_flags() {
        let closed = policy(&[], &[], Access::Deny, Access::Deny);
        for a in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "fd12::1",
        ] {
            assert!(!closed.permits_ip(ip(a), None), "{a}");
        }
        assert!(closed.permits_ip(ip("8.8.8.8"), None));
        assert!(closed.permits_ip(ip("172.32.0.1"), None));
        // A narrower allow CIDR opens part of a denied class.
        let some = policy(
            &["10.1.0.0/16", "*.example.com"],
            &[],
            Access::Allow,
            Access::Deny,
        );
        assert!(some.permits_ip(ip("10.1.2.3"), None));
        assert!(!some.permits_ip(ip("10.2.0.1"), Some("db.example.com")));
    }

    #[test]
    fn an_allow_list_admits_only_what_it_names_and_deny_wins() {
        let p = policy(
            &["10.0.0.0/8", "*.example.com", "db.other.test"],
            &["10.9.0.0/16", "secret.example.com"],
            Access::Allow,
            Access::Allow,
        );
        assert!(p.permits_ip(ip("10.1.1.1"), None));
        assert!(!p.permits_ip(ip("10.9.1.1"), None), "deny beats allow");
        assert!(
            !p.permits_ip(ip("127.0.0.1"), None),
            "loopback is not on the list"
        );
        assert!(!p.permits_ip(ip("8.8.8.8"), None));
        assert!(p.permits_ip(ip("8.8.8.8"), Some("api.example.com")));
        assert!(p.permits_ip(ip("8.8.8.8"), Some("DB.other.test")));
        assert!(!p.permits_ip(ip("8.8.8.8"), Some("example.com")));
        assert!(!p.permits_name("secret.example.com"));
        // A denied name's address stays denied whatever name it is reached by.
        assert!(!p.permits_ip(ip("10.9.0.5"), Some("api.example.com")));
        // With host rules alone, other names are refused before resolution.
        let names_only = policy(&["*.example.com"], &[], Access::Allow, Access::Allow);
        assert!(names_only.permits_name("api.example.com"));
        assert!(!names_only.permits_name("api.example.org"));
        assert!(
            p.permits_name("api.example.org"),
            "a CIDR may still allow its address"
        );
        // And an allowed name never reaches an always-denied address.
        assert!(!p.permits_ip(ip("169.254.169.254"), Some("api.example.com")));
    }

    #[tokio::test]
    async fn names_are_checked_as_written_and_as_resolved() {
        let resolver = StubResolver::new()
            .with("ok.test", &[ip("127.0.0.1")])
            .with("rebind.test", &[ip("127.0.0.2")])
            .with("mixed.test", &[ip("127.0.0.2"), ip("127.0.0.1")])
            .with("metadata", &[ip("127.0.0.1")]);
        let deny = policy(&[], &["127.0.0.2/32"], Access::Allow, Access::Allow);
        let e = Egress::new(deny, Arc::new(resolver));
        assert_eq!(
            e.addresses("ok.test", 80).await,
            Ok(vec!["127.0.0.1:80".parse().unwrap()])
        );
        assert_eq!(e.addresses("rebind.test", 80).await, Err(Blocked::Denied));
        assert_eq!(
            e.addresses("mixed.test", 80).await,
            Ok(vec!["127.0.0.1:80".parse().unwrap()])
        );
        assert_eq!(e.addresses("metadata", 80).await, Err(Blocked::Denied));
        assert_eq!(
            e.addresses("nowhere.test", 80).await,
            Err(Blocked::NotResolved)
        );
        assert_eq!(e.addresses("127.0.0.2", 80).await, Err(Blocked::Denied));
        assert_eq!(e.addresses("2130706434", 80).await, Err(Blocked::Denied));
        assert_eq!(
            e.addresses("[::ffff:127.0.0.2]", 80).await,
            Err(Blocked::Denied)
        );
    }
}
