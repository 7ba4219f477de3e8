//! A credential's secret turned into what a check sends: an `Authorization`
//! value and TLS material (client identity, the CA to trust), plus the
//! [`Scrubber`] that keeps secret values out of text a peer controls.
//!
//! Nothing here prints a secret: the types holding one have no `Debug` that
//! shows it, and every error names the field, never its value.

use super::Secret;
use super::egress::{Egress, EgressDns};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::HeaderValue;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What a check may send, parsed from a [`Secret`].
#[derive(Default)]
pub(crate) struct ClientAuth {
    pub(crate) auth: Option<AuthHeader>,
    pub(crate) tls: Option<TlsMaterial>,
}

/// A whole `Authorization` value (`Bearer ...` or `Basic ...`), printable
/// ASCII by construction so it fits an HTTP header and gRPC metadata alike.
pub(crate) struct AuthHeader(String);

impl fmt::Debug for AuthHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthHeader(<redacted>)")
    }
}

impl AuthHeader {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Marked sensitive, so HTTP/2 never indexes it and `Debug` hides it.
    pub(crate) fn header_value(&self) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_str(&self.0).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

/// TLS settings for a client of its own. The PEM is kept as given too, for
/// the gRPC check's TLS, which takes it in that form.
pub(crate) struct TlsMaterial {
    identity: Option<reqwest::Identity>,
    roots: Vec<reqwest::Certificate>,
    pub(super) identity_pem: Option<(String, String)>,
    pub(super) ca_pem: Option<String>,
}

impl ClientAuth {
    /// Reads `token` (bearer), `username`/`password` (basic; a token wins
    /// when both are given), `client_certificate`/`client_key` (PEM) and
    /// `ca_certificate` (PEM, trusted instead of the built-in roots). Other
    /// fields are ignored. `Err` says which field cannot be used and why.
    pub(crate) fn from_secret(secret: Option<&Secret>) -> Result<ClientAuth, String> {
        let Some(secret) = secret else {
            return Ok(ClientAuth::default());
        };
        let field = |name: &str| -> Result<Option<&str>, String> {
            match secret.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(format!("credential field {name:?} must be a string")),
            }
        };

        let auth = match (field("token")?, field("username")?, field("password")?) {
            (Some(token), _, _) => {
                if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err("credential token must be printable ASCII without spaces".into());
                }
                Some(AuthHeader(format!("Bearer {token}")))
            }
            (None, Some(user), password) => {
                if user.contains(':') {
                    return Err("credential username cannot contain ':' (basic auth)".into());
                }
                let pair = format!("{user}:{}", password.unwrap_or(""));
                Some(AuthHeader(format!("Basic {}", STANDARD.encode(pair))))
            }
            (None, None, Some(_)) => {
                return Err("credential has a password but no username".into());
            }
            (None, None, None) => None,
        };

        let identity = match (field("client_certificate")?, field("client_key")?) {
            (Some(cert), Some(key)) => {
                let pem = format!("{cert}\n{key}\n");
                let id = reqwest::Identity::from_pem(pem.as_bytes()).map_err(|e| {
                    format!(
                        "client_certificate/client_key is not a PEM certificate and private key: {}",
                        super::prober::error_chain(&e)
                    )
                })?;
                Some(id)
            }
            (Some(_), None) => {
                return Err("credential has client_certificate but no client_key".into());
            }
            (None, Some(_)) => {
                return Err("credential has client_key but no client_certificate".into());
            }
            (None, None) => None,
        };
        let roots = match field("ca_certificate")? {
            Some(pem) => {
                let roots = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                    format!(
                        "ca_certificate is not valid PEM: {}",
                        super::prober::error_chain(&e)
                    )
                })?;
                if roots.is_empty() {
                    return Err("ca_certificate holds no PEM certificate".into());
                }
                roots
            }
            None => Vec::new(),
        };
        let identity_pem = match (field("client_certificate")?, field("client_key")?) {
            (Some(cert), Some(key)) => Some((cert.to_owned(), key.to_owned())),
            _ => None,
        };
        let ca_pem = field("ca_certificate")?.map(str::to_owned);
        let tls = (identity.is_some() || !roots.is_empty()).then_some(TlsMaterial {
            identity,
            roots,
            identity_pem,
            ca_pem,
        });
        Ok(ClientAuth { auth, tls })
    }
}

/// The settings every probe's HTTP client shares.
pub(crate) fn client_builder(timeout: Duration, egress: &Egress) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        // Every name goes through the egress policy...
        .dns_resolver(Arc::new(EgressDns(egress.clone())))
        // ...and a proxy from HTTP_PROXY would be what is connected to,
        // after a check of a name the proxy then resolves as it likes.
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        // A redirect already proves the server answers; following it could
        // leave the host the user named.
        .redirect(reqwest::redirect::Policy::none())
        // Each probe opens its own connection: a pooled one would not prove
        // the peer still accepts connections, and ten thousand monitored
        // hosts would otherwise hold ten thousand idle sockets.
        .pool_max_idle_per_host(0)
        .user_agent(concat!("tether/", env!("CARGO_PKG_VERSION")))
}

impl TlsMaterial {
    /// Whether a client identity would be presented to the peer.
    pub(crate) fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// A client of its own with this identity and, when a CA is given,
    /// trusting only that CA. `Err` when TLS refuses them (a key that does
    /// not parse, a root that is not a certificate).
    pub(crate) fn client(
        self,
        timeout: Duration,
        egress: &Egress,
    ) -> Result<reqwest::Client, String> {
        let mut builder = client_builder(timeout, egress);
        let what = match (&self.identity, self.roots.is_empty()) {
            (Some(_), true) => "client_certificate/client_key",
            (None, false) => "ca_certificate",
            _ => "client_certificate/client_key or ca_certificate",
        };
        if let Some(id) = self.identity {
            builder = builder.identity(id);
        }
        if !self.roots.is_empty() {
            // A CA given with the credential is the only one trusted: the
            // public roots would let any publicly certified host pass.
            builder = builder.tls_built_in_root_certs(false);
        }
        for root in self.roots {
            builder = builder.add_root_certificate(root);
        }
        builder.build().map_err(|e| {
            format!(
                "{what} cannot be used for TLS: {}",
                super::prober::error_chain(&e)
            )
        })
    }
}

/// Replaces every string of a secret found in text a peer or a library
/// wrote (error chains, gRPC status messages): our own messages are built
/// from parts that never hold one, but a peer may echo what it was sent.
pub(crate) struct Scrubber(Vec<String>);

impl Scrubber {
    pub(crate) fn new(secret: Option<&Secret>) -> Scrubber {
        fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::String(s) if !s.is_empty() => out.push(s.clone()),
                serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
                serde_json::Value::Object(o) => o.values().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        let mut values = Vec::new();
        if let Some(secret) = secret {
            secret.values().for_each(|v| collect(v, &mut values));
            // What goes on the wire is encoded too: a peer echoing the basic
            // auth header, or any value in base64, must not leak it either.
            use base64::Engine as _;
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
            if let (Some(u), Some(p)) = (
                secret.get("username").and_then(|v| v.as_str()),
                secret.get("password").and_then(|v| v.as_str()),
            ) {
                values.push(b64(&format!("{u}:{p}")));
            }
            let encoded: Vec<String> = values.iter().map(|v| b64(v)).collect();
            values.extend(encoded);
        }
        // Longest first, so a secret containing another is replaced whole.
        values.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Scrubber(values)
    }

    /// `text` with every secret value replaced, cut to `MAX` bytes.
    pub(crate) fn clean(&self, text: &str) -> String {
        const MAX: usize = 300;
        let mut out = text.to_owned();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "<redacted>");
            }
        }
        if out.len() > MAX {
            let mut end = MAX;
            while !out.is_char_boundary(end) {
                end -= 1;
            }
            out.truncate(end);
            out.push('…');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(v: serde_json::Value) -> Secret {
        v.as_object().unwrap().clone()
    }

    fn error(v: serde_json::Value) -> String {
        match ClientAuth::from_secret(Some(&secret(v))) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn tokens_and_basic_auth() {
        let c =
            ClientAuth::from_secret(Some(&secret(serde_json::json!({"token": "abc"})))).unwrap();
        assert_eq!(c.auth.unwrap().as_str(), "Bearer abc");
        let c = ClientAuth::from_secret(Some(&secret(
            serde_json::json!({"username": "alice", "password": "pw"}),
        )))
        .unwrap();
        assert_eq!(c.auth.unwrap().as_str(), "Basic YWxpY2U6cHc=");
        assert!(ClientAuth::from_secret(None).unwrap().auth.is_none());
    }

    #[test]
    fn unusable_fields_are_named_not_shown() {
        for (v, needle) in [
            (serde_json::json!({"token": 7}), "\"token\""),
            (serde_json::json!({"token": "has space-s3cret"}), "token"),
            (serde_json::json!({"password": "s3cret"}), "no username"),
            (
                serde_json::json!({"client_certificate": "s3cret"}),
                "client_key",
            ),
            (
                serde_json::json!({"client_certificate": "s3cret", "client_key": "s3cret"}),
                "client_certificate/client_key",
            ),
            (
                serde_json::json!({"ca_certificate": "s3cret"}),
                "ca_certificate",
            ),
        ] {
            let e = error(v);
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn scrubber_replaces_every_secret_string() {
        let s = Scrubber::new(Some(&secret(serde_json::json!({
            "token": "tok-123", "nested": {"k": ["deep-value"]}, "n": 5
        }))));
        assert_eq!(
            s.clean("saw tok-123 and deep-value"),
            "saw <redacted> and <redacted>"
        );
        assert_eq!(s.clean(&"é".repeat(400)).chars().count(), 151);
    }

    #[test]
    fn scrubber_replaces_encoded_secrets_too() {
        use base64::Engine as _;
        let s = Scrubber::new(Some(&secret(serde_json::json!({
            "username": "alice", "password": "pw-77"
        }))));
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:pw-77");
        let alone = base64::engine::general_purpose::STANDARD.encode("pw-77");
        let cleaned = s.clean(&format!("peer said: Basic {basic} ({alone})"));
        assert!(
            !cleaned.contains(&basic) && !cleaned.contains(&alone),
            "{cleaned}"
        );
    }
}
