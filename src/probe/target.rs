//! Where a check goes: a connection's url and its kind's [`Check`] turned
//! into a [`Target`] (a host and port, the urls to GET, a gRPC endpoint).
//! Pure: no I/O, no credentials.

use super::Check;
use std::fmt;
use url::{Host, Url};

/// A host and port to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostPort {
    /// The host without brackets, as a resolver takes it.
    pub(crate) host: String,
    pub(crate) port: u16,
    ipv6: bool,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ipv6 {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What to contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Tcp(HostPort),
    /// GET each in turn.
    Http(Vec<Url>),
    Grpc {
        endpoint: HostPort,
        service: String,
        /// `grpcs://` or `https://`: TLS, else plaintext HTTP/2.
        tls: bool,
    },
}

/// `None` when there is nothing to check: [`Check::None`], or [`Check::Url`]
/// with an empty or unparsable url or a scheme other than tcp/http/https.
/// `Some(Err(why))` when the kind has a check this url cannot serve; `why`
/// never holds the url's user-info.
pub(crate) fn plan(url: &str, check: &Check) -> Option<Result<Target, String>> {
    match check {
        Check::None => None,
        Check::Url => {
            let url = Url::parse(url).ok()?;
            match url.scheme() {
                "tcp" => Some(
                    host_port(&url)
                        .ok_or_else(|| "tcp url needs a host and a port".into())
                        .map(Target::Tcp),
                ),
                "http" | "https" => Some(Ok(Target::Http(vec![url]))),
                _ => None,
            }
        }
        Check::Tcp => Some(parse(url).and_then(|url| {
            host_port(&url)
                .map(Target::Tcp)
                .ok_or_else(|| "tcp check needs a host and a port in the url".into())
        })),
        Check::Http { paths } => Some(parse(url).and_then(|url| {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!(
                    "http check needs an http:// or https:// url, not {}://",
                    url.scheme()
                ));
            }
            if paths.is_empty() {
                return Ok(Target::Http(vec![url]));
            }
            Ok(Target::Http(paths.iter().map(|p| join(&url, p)).collect()))
        })),
        Check::Grpc { service } => Some(parse(url).and_then(|url| {
            let tls = match url.scheme() {
                "grpc" | "http" => false,
                "grpcs" | "https" => true,
                other => {
                    return Err(format!(
                        "grpc check needs a grpc://, grpcs://, http:// or https:// url, not {other}://"
                    ));
                }
            };
            host_port(&url)
                .map(|endpoint| Target::Grpc {
                    endpoint,
                    service: service.clone(),
                    tls,
                })
                .ok_or_else(|| "grpc check needs a host and a port in the url".into())
        })),
    }
}

fn parse(url: &str) -> Result<Url, String> {
    if url.is_empty() {
        return Err("the connection has no url to check".into());
    }
    // `url`'s parse errors name the problem, never the input.
    Url::parse(url).map_err(|e| format!("the url cannot be parsed: {e}"))
}

/// The url's host and port; the scheme's default port when the url gives
/// none (a normalised `http://h:80` has lost its explicit port).
fn host_port(url: &Url) -> Option<HostPort> {
    let port = url.port_or_known_default()?;
    let (host, ipv6) = match url.host()? {
        Host::Domain("") => return None,
        Host::Domain(d) => (d.to_owned(), false),
        Host::Ipv4(a) => (a.to_string(), false),
        Host::Ipv6(a) => (a.to_string(), true),
    };
    Some(HostPort { host, port, ipv6 })
}

/// `path` under the url's own path: `http://h/prom` + `/-/ready` is
/// `http://h/prom/-/ready`. The path's query, if any, replaces the url's;
/// the url's fragment is dropped. Always the url's host: a path is never
/// read as a url of its own.
fn join(base: &Url, path: &str) -> Url {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut url = base.clone();
    url.set_path(&format!(
        "{}/{}",
        base.path().trim_end_matches('/'),
        path.trim_start_matches('/')
    ));
    url.set_query(query);
    url.set_fragment(None);
    url
}

/// The url without any user name or password, fit for messages and logs.
pub(crate) fn redacted(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(paths: &[&str]) -> Check {
        Check::Http {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn urls(url: &str, check: &Check) -> Vec<String> {
        match plan(url, check) {
            Some(Ok(Target::Http(urls))) => urls.iter().map(Url::to_string).collect(),
            other => panic!("not an http target: {other:?}"),
        }
    }

    #[test]
    fn paths_join_under_the_urls_own_path() {
        let ready = http(&["/-/ready"]);
        assert_eq!(urls("http://h:9090", &ready), ["http://h:9090/-/ready"]);
        assert_eq!(urls("http://h/prom", &ready), ["http://h/prom/-/ready"]);
        assert_eq!(urls("http://h/prom/", &ready), ["http://h/prom/-/ready"]);
        assert_eq!(
            urls("https://h/prom?x=1#f", &http(&["-/ready", "/api?full=1"])),
            ["https://h/prom/-/ready", "https://h/prom/api?full=1"]
        );
        // A path that looks like a url stays on the connection's host.
        assert_eq!(
            urls("http://h", &http(&["http://elsewhere/"])),
            ["http://h/http://elsewhere/"]
        );
        assert_eq!(urls("http://h/x", &http(&[])), ["http://h/x"]);
    }

    #[test]
    fn nothing_to_check() {
        assert_eq!(plan("http://h", &Check::None), None);
        assert_eq!(plan("", &Check::Url), None);
        assert_eq!(plan("postgres://h:5432", &Check::Url), None);
        assert_eq!(plan("not a url", &Check::Url), None);
    }

    #[test]
    fn tcp_targets_take_any_scheme_with_a_port() {
        let tcp = |url| match plan(url, &Check::Tcp) {
            Some(Ok(Target::Tcp(hp))) => Ok(hp.to_string()),
            Some(Err(e)) => Err(e),
            other => panic!("{other:?}"),
        };
        assert_eq!(tcp("tcp://db:5432"), Ok("db:5432".into()));
        assert_eq!(tcp("http://h:8080/x"), Ok("h:8080".into()));
        assert_eq!(tcp("http://h"), Ok("h:80".into()));
        assert_eq!(tcp("tcp://[::1]:7"), Ok("[::1]:7".into()));
        assert!(tcp("tcp://db").is_err());
        assert!(tcp("").is_err());
        assert!(matches!(plan("tcp://db", &Check::Url), Some(Err(_))));
    }

    #[test]
    fn grpc_targets_say_whether_they_use_tls() {
        let grpc = Check::Grpc {
            service: "s".into(),
        };
        let target = |url| match plan(url, &grpc) {
            Some(Ok(Target::Grpc {
                endpoint,
                service,
                tls,
            })) => Ok((endpoint.to_string(), service, tls)),
            Some(Err(e)) => Err(e),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            target("grpc://h:50051"),
            Ok(("h:50051".into(), "s".into(), false))
        );
        assert_eq!(
            target("http://h:80"),
            Ok(("h:80".into(), "s".into(), false))
        );
        assert_eq!(
            target("grpcs://h:443"),
            Ok(("h:443".into(), "s".into(), true))
        );
        assert_eq!(target("https://h"), Ok(("h:443".into(), "s".into(), true)));
        assert!(target("grpc://h").is_err());
        assert!(target("grpcs://h").is_err());
        assert!(target("tcp://h:1").is_err());
    }

    #[test]
    fn http_checks_refuse_other_schemes_without_showing_the_url() {
        let Some(Err(why)) = plan("tcp://user:pw@h:1", &http(&["/"])) else {
            panic!("accepted a tcp url")
        };
        assert!(!why.contains("pw"), "{why}");
    }

    #[test]
    fn redaction_drops_user_info() {
        let u = Url::parse("http://alice:pw@h/x").unwrap();
        assert_eq!(redacted(&u), "http://h/x");
    }
}
