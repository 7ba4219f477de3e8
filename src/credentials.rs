//! Credentials: secrets the server uses to reach connections, sealed at rest.
//!
//! Write-only by construction: [`CredentialInfo`], the only view that leaves
//! this module for clients, has no secret in it; [`Credentials::secret_for`]
//! is for the checks that use one. Validation errors name the offending field
//! of a secret but never repeat its value.
//!
//! Custody: every credential names the hosts it may be sent to, and
//! [`custody`] is the one rule for where a secret may go: only to those hosts,
//! and never over cleartext (`http://`, plaintext `grpc://`). The engine asks
//! it whenever a credential and a url meet; the checker asks it again before
//! anything is sent.

use crate::access::Scope;
use crate::connection::{Micros, check_len, limits, parse_kind};
use crate::error::Error;
use crate::kinds::Kinds;
use crate::probe::Secret;
use crate::secrets::SecretBox;
use crate::store::{Store, StoredCredential};
use std::sync::Arc;

/// A credential as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CredentialInfo {
    pub(crate) id: String,
    pub(crate) name: String,
    /// The connection kind whose credential schema the secret follows.
    pub(crate) type_: String,
    pub(crate) owner: String,
    pub(crate) create_time: Micros,
    pub(crate) allowed_hosts: Vec<String>,
}

impl From<&StoredCredential> for CredentialInfo {
    fn from(c: &StoredCredential) -> Self {
        CredentialInfo {
            id: c.id.clone(),
            name: c.name.clone(),
            type_: c.type_.clone(),
            owner: c.owner.clone(),
            create_time: c.create_time,
            allowed_hosts: c.allowed_hosts.clone(),
        }
    }
}

pub(crate) struct NewCredential {
    pub(crate) name: String,
    pub(crate) type_: String,
    pub(crate) secret: Secret,
    /// Already settled by the caller's scope.
    pub(crate) owner: String,
    pub(crate) allowed_hosts: Vec<String>,
}

/// Most host patterns one credential may name.
const MAX_HOSTS: usize = 64;

/// Checks a host pattern: a host name, `*.` and a domain (its subdomains,
/// not the domain itself), an IPv4 address or a bracketed IPv6 address.
/// Lowercased; no scheme, port, path or other wildcard.
pub(crate) fn parse_host_pattern(field: &str, p: &str) -> Result<String, Error> {
    let bad = |why: &str| {
        Error::invalid(
            field,
            format!("{:?}: {why}", crate::connection::shorten(p, 100)),
        )
    };
    let lower = p.trim().to_ascii_lowercase();
    let host = lower.strip_prefix("*.").unwrap_or(&lower);
    if host.is_empty() {
        return Err(bad("is empty"));
    }
    if host.contains('*') {
        return Err(bad("only a leading \"*.\" wildcard is allowed"));
    }
    // The url crate's host parser is the one urls are read with, so a
    // pattern means what a url's host means.
    match url::Host::parse(host) {
        Ok(url::Host::Domain(d)) if d == host && !host.contains(':') => {}
        Ok(url::Host::Ipv4(a)) if a.to_string() == host && !lower.starts_with("*.") => {}
        Ok(url::Host::Ipv6(_)) if host.starts_with('[') && !lower.starts_with("*.") => {}
        _ => {
            return Err(bad(
                "is not a host name or address (no scheme, port or path)",
            ));
        }
    }
    Ok(lower)
}

/// Whether `host` (as the url crate prints it) matches `pattern`: names and
/// `*.domain` the way the egress policy matches them, addresses exactly.
fn host_matches(pattern: &str, host: &str) -> bool {
    match crate::probe::HostPattern::parse(pattern) {
        Ok(p) => p.matches(host),
        Err(_) => pattern == host,
    }
}

/// The one rule for where a credential's secret may go: `url` must use a
/// scheme that encrypts (no `http://`, no plaintext `grpc://`) and name a
/// host the credential allows. A connection without a url sends nothing.
pub(crate) fn custody(allowed_hosts: &[String], url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Ok(());
    }
    let parsed = url::Url::parse(url).map_err(|_| "the url cannot be parsed".to_owned())?;
    if matches!(parsed.scheme(), "http" | "grpc") {
        return Err(format!(
            "a credential is never sent over cleartext ({}://); use {}",
            parsed.scheme(),
            if parsed.scheme() == "http" {
                "https://"
            } else {
                "grpcs://"
            }
        ));
    }
    let host = parsed.host_str().unwrap_or("").to_ascii_lowercase();
    if allowed_hosts.iter().any(|p| host_matches(p, &host)) {
        return Ok(());
    }
    Err(if allowed_hosts.is_empty() {
        "the credential names no host it may be sent to; create it again with allowed_hosts"
            .to_owned()
    } else {
        format!(
            "the credential may not be sent to {}; it allows {}",
            crate::connection::shorten(&host, 100),
            allowed_hosts.join(", ")
        )
    })
}

/// Where a credential listing goes on from.
pub(crate) type CredentialCursor = (i64, String);

#[derive(Clone)]
pub(crate) struct Credentials {
    store: Store,
    secrets: Arc<SecretBox>,
    kinds: Kinds,
}

impl Credentials {
    pub(crate) fn new(store: Store, secrets: Arc<SecretBox>, kinds: Kinds) -> Self {
        Credentials {
            store,
            secrets,
            kinds,
        }
    }

    pub(crate) async fn create(&self, n: NewCredential) -> Result<CredentialInfo, Error> {
        if n.name.is_empty() {
            return Err(Error::invalid("name", "is required"));
        }
        check_len("name", &n.name, limits::SHORT)?;
        check_len("owner", &n.owner, limits::SHORT)?;
        let kind = parse_kind("type", &n.type_)?;
        if n.secret.is_empty() {
            return Err(Error::invalid("secret", "is required"));
        }
        if n.allowed_hosts.is_empty() {
            return Err(Error::invalid(
                "allowed_hosts",
                "is required: name the hosts (or *.domain patterns) the secret may be sent to",
            ));
        }
        if n.allowed_hosts.len() > MAX_HOSTS {
            return Err(Error::invalid(
                "allowed_hosts",
                format!(
                    "has {} entries, the limit is {MAX_HOSTS}",
                    n.allowed_hosts.len()
                ),
            ));
        }
        let allowed_hosts = n
            .allowed_hosts
            .iter()
            .enumerate()
            .map(|(i, p)| parse_host_pattern(&format!("allowed_hosts[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        let size = serde_json::to_vec(&n.secret)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > limits::METADATA_BYTES {
            return Err(Error::invalid("secret", "is too large"));
        }
        // A credential serves connections of one kind: the kind must be one
        // the server accepts, and the secret must fit its schema.
        self.kinds.admit(&kind)?;
        self.kinds
            .registry()
            .validate_secret(&kind, &n.secret)
            .map_err(|v| {
                Error::invalid(
                    format!("secret{}", v.path),
                    format!("does not match the credential schema of kind {kind}"),
                )
            })?;
        let id = uuid::Uuid::new_v4().to_string();
        let (nonce, sealed) = self.secrets.seal(&id, &n.secret)?;
        let row = StoredCredential {
            id,
            name: n.name,
            type_: kind,
            owner: n.owner,
            nonce,
            sealed,
            create_time: 0,
            allowed_hosts,
        };
        self.store
            .write(move |tx| {
                tx.insert_credential(&row)?;
                let mut info = CredentialInfo::from(&row);
                info.create_time = tx.now();
                Ok(info)
            })
            .await
    }

    /// A page of the credentials `scope` sees, in creation order, and where
    /// the next starts.
    pub(crate) async fn list(
        &self,
        after: Option<CredentialCursor>,
        limit: usize,
        scope: &Scope,
    ) -> Result<(Vec<CredentialInfo>, Option<CredentialCursor>), Error> {
        let owners = scope.owners();
        let rows = self
            .store
            .read(move |r| r.credentials(after, limit + 1, owners.as_deref()))
            .await?;
        let more = rows.len() > limit;
        let infos: Vec<CredentialInfo> =
            rows.iter().take(limit).map(CredentialInfo::from).collect();
        let next = more
            .then(|| infos.last().map(|c| (c.create_time, c.id.clone())))
            .flatten();
        Ok((infos, next))
    }

    /// Deletes a credential no live connection uses; one outside `scope` is
    /// not found.
    pub(crate) async fn delete(&self, id: String, scope: &Scope) -> Result<(), Error> {
        let scope = scope.clone();
        // Frees space, so it runs over the storage quota too.
        self.store
            .write_freeing(move |tx| {
                if !tx.credential(&id)?.is_some_and(|c| scope.sees(&c.owner)) {
                    return Err(Error::CredentialNotFound { id });
                }
                if let Some(user) = tx.credential_user(&id, None)? {
                    // Named only to a caller who may see it.
                    let seen = tx.get(&user)?.is_some_and(|c| scope.sees(&c.owner));
                    return Err(Error::CredentialInUse {
                        id,
                        connection_id: if seen {
                            user.to_string()
                        } else {
                            String::new()
                        },
                    });
                }
                tx.delete_credential(&id)?;
                Ok(())
            })
            .await
    }

    /// The decrypted secret of credential `id`, for a check of `url` to use:
    /// `Ok(Err(why))` when [`custody`] forbids sending it there, `Ok(Ok(None))`
    /// when the credential is gone.
    pub(crate) async fn secret_for(
        &self,
        id: String,
        url: &str,
    ) -> Result<Result<Option<Secret>, String>, Error> {
        let row = self.store.read(move |r| r.credential(&id)).await?;
        let Some(row) = row else {
            return Ok(Ok(None));
        };
        if let Err(why) = custody(&row.allowed_hosts, url) {
            return Ok(Err(why));
        }
        self.secrets
            .open(&row.id, &row.nonce, &row.sealed)
            .map(|s| Ok(Some(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(p: &[&str]) -> Vec<String> {
        p.iter()
            .map(|p| parse_host_pattern("h", p).unwrap())
            .collect()
    }

    #[test]
    fn patterns_are_hosts_or_subdomain_wildcards() {
        assert_eq!(hosts(&["Prom.Example"]), ["prom.example"]);
        for bad in [
            "",
            "*",
            "*.",
            "https://x",
            "x:80",
            "x/y",
            "a.*.b",
            "*.10.0.0.1",
            "user@x",
        ] {
            assert!(parse_host_pattern("h", bad).is_err(), "{bad:?}");
        }
        assert!(parse_host_pattern("h", "10.0.0.1").is_ok());
        assert!(parse_host_pattern("h", "[::1]").is_ok());
    }

    #[test]
    fn custody_allows_only_named_hosts_over_tls() {
        let allowed = hosts(&["prom.example", "*.k8s.example"]);
        assert!(custody(&allowed, "https://prom.example:9090/x").is_ok());
        assert!(custody(&allowed, "https://a.k8s.example/").is_ok());
        assert!(custody(&allowed, "grpcs://b.a.k8s.example:443").is_ok());
        assert!(
            custody(&allowed, "https://k8s.example/").is_err(),
            "the domain itself"
        );
        assert!(custody(&allowed, "https://evilk8s.example/").is_err());
        assert!(custody(&allowed, "https://prom.example.evil/").is_err());
        assert!(custody(&allowed, "https://attacker.example/").is_err());
        let e = custody(&allowed, "http://prom.example/").unwrap_err();
        assert!(e.contains("cleartext"), "{e}");
        assert!(custody(&allowed, "grpc://prom.example:1").is_err());
        assert!(custody(&[], "https://prom.example/").is_err());
        assert!(custody(&[], "").is_ok(), "no url, nothing sent");
        // The url crate reads other spellings of an address as the address.
        let ip = hosts(&["127.0.0.1"]);
        assert!(custody(&ip, "https://2130706433/").is_ok());
        assert!(custody(&ip, "https://0x7f000002/").is_err());
    }
}
