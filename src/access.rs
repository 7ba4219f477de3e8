//! Who a caller is and what it may do: principals, roles, owner scopes, and
//! the access file they come from.
//!
//! The access file lists bearer tokens (as SHA-256 digests, never the tokens
//! themselves) and client-certificate principals, each with roles and the
//! owners whose objects it may see. It is read at start (a bad file refuses
//! start) and again when it changes or on SIGHUP (a bad edit keeps the old
//! table and logs why). Without an access file authentication is off and
//! every caller is the `anonymous` admin; the server only allows that on a
//! loopback address unless told `--insecure`.
//!
//! Pure policy and parsing: no gRPC here (the tower layer in
//! `service::auth` asks this module), no secrets logged.

use crate::error::Error;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The name reserved for changes the server makes itself.
pub const SYSTEM_PRINCIPAL: &str = "tether";

/// The principal every caller is when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// What a principal may do. Roles add up; `admin` is all of them over every owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read and watch connections.
    Viewer,
    /// Create, update, transition and delete connections (and read them).
    Operator,
    /// ReportDiscovered only.
    Discovery,
    /// Create, list and delete credentials.
    CredentialAdmin,
    /// Everything, over every owner.
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Operator,
        Role::Discovery,
        Role::CredentialAdmin,
        Role::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Discovery => "discovery",
            Role::CredentialAdmin => "credential-admin",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whose objects a principal sees and changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every owner.
    All,
    /// These owners only (always including the principal's own name).
    Owners(BTreeSet<String>),
}

impl Scope {
    /// Whether an object owned by `owner` is visible.
    pub fn sees(&self, owner: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Owners(o) => o.contains(owner),
        }
    }

    /// The owners to filter by, `None` for every owner.
    pub fn owners(&self) -> Option<Vec<String>> {
        match self {
            Scope::All => None,
            Scope::Owners(o) => Some(o.iter().cloned().collect()),
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub roles: BTreeSet<Role>,
    pub scope: Scope,
}

impl Principal {
    /// The caller when authentication is off: admin over everything.
    pub fn anonymous() -> Principal {
        Principal {
            name: ANONYMOUS.into(),
            roles: [Role::Admin].into(),
            scope: Scope::All,
        }
    }

    /// Whether the principal holds any of `roles` (admin holds them all).
    pub fn has_any(&self, roles: &[Role]) -> bool {
        self.roles.contains(&Role::Admin) || roles.iter().any(|r| self.roles.contains(r))
    }

    /// The owner a new object gets: the one asked for, if the principal may
    /// act for it, else the principal itself.
    pub fn owner_for(&self, requested: &str, field: &str) -> Result<String, Error> {
        if requested.is_empty() {
            return Ok(self.name.clone());
        }
        if self.scope.sees(requested) {
            return Ok(requested.to_owned());
        }
        Err(Error::invalid(
            field,
            format!("{requested:?} is not an owner you may act for"),
        ))
    }
}

/// Why a principal's standing ended while it held something open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// The access file no longer admits it.
    Unknown(String),
    /// Its roles or scope changed.
    Changed(String),
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Revoked::Unknown(p) => write!(f, "the access file no longer admits {p}"),
            Revoked::Changed(p) => write!(f, "the access file changed what {p} may see or do"),
        }
    }
}

/// How a caller proved who it is: what to look up again when the access
/// file changes, to end what it may no longer do (its open watches).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// Authentication is off.
    Nothing,
    /// A bearer token, by its SHA-256.
    Token([u8; 32]),
    /// A verified client certificate, by its principal name.
    Certificate(String),
}

/// The SHA-256 of a bearer token, as the access file lists it (lowercase hex).
pub fn token_digest(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random bearer token: 32 bytes, URL-safe base64.
pub fn new_token() -> String {
    use base64::Engine as _;
    use chacha20poly1305::aead::rand_core::RngCore;
    let mut bytes = [0u8; 32];
    chacha20poly1305::aead::OsRng.fill_bytes(&mut bytes);
    format!(
        "tether_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

// ---- the access file ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    tokens: Vec<TokenSpec>,
    #[serde(default)]
    certificates: Vec<GrantSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSpec {
    principal: String,
    sha256: String,
    #[serde(default)]
    roles: Vec<Role>,
    #[serde(default)]
    owners: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    principal: String,
    #[serde(default)]
    roles: Vec<Role>,
    #[serde(default)]
    owners: Vec<String>,
}

/// The principals of one reading of the access file.
#[derive(Debug, Default)]
pub struct Table {
    /// By token digest.
    tokens: HashMap<[u8; 32], Principal>,
    /// By certificate principal name.
    certificates: HashMap<String, Principal>,
}

impl Table {
    /// Parses an access file's text; errors name the entry and what is wrong.
    pub fn parse(text: &str) -> Result<Table, String> {
        // An empty file admits no one: far likelier a file caught half
        // written than an intent, so it is refused like any bad edit.
        if text.trim().is_empty() {
            return Err("the file is empty; list `tokens:` or `certificates:`".into());
        }
        let spec: FileSpec = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let mut table = Table::default();
        for (i, t) in spec.tokens.into_iter().enumerate() {
            let at = format!("tokens[{i}]");
            let digest = parse_digest(&t.sha256)
                .ok_or_else(|| format!("{at}: sha256 must be 64 hex digits"))?;
            let p = principal(&at, t.principal, t.roles, t.owners)?;
            if table.tokens.insert(digest, p).is_some() {
                return Err(format!("{at}: the same token is listed twice"));
            }
        }
        for (i, c) in spec.certificates.into_iter().enumerate() {
            let at = format!("certificates[{i}]");
            let p = principal(&at, c.principal, c.roles, c.owners)?;
            if table.certificates.contains_key(&p.name) {
                return Err(format!("{at}: {:?} is listed twice", p.name));
            }
            table.certificates.insert(p.name.clone(), p);
        }
        Ok(table)
    }

    /// The principal of a bearer token, and how to find it again.
    pub fn by_token(&self, token: &str) -> Option<(&Principal, Via)> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.tokens.get(&digest).map(|p| (p, Via::Token(digest)))
    }

    /// The principal a verified client certificate names. A certificate the
    /// file does not list is still who it says (the CA vouched for it), but
    /// holds no role, so it may do nothing.
    pub fn by_certificate(&self, name: &str) -> Principal {
        self.certificates.get(name).cloned().unwrap_or(Principal {
            name: name.to_owned(),
            roles: BTreeSet::new(),
            scope: Scope::Owners([name.to_owned()].into()),
        })
    }
}

fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Checks a principal name: printable, at most 128 bytes, not reserved.
pub fn check_principal_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("a principal name has 1 to 128 characters".into());
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("a principal name has no control characters".into());
    }
    if name == SYSTEM_PRINCIPAL || name == ANONYMOUS || name == "*" {
        return Err(format!("{name:?} is reserved"));
    }
    Ok(())
}

fn principal(
    at: &str,
    name: String,
    roles: Vec<Role>,
    owners: Vec<String>,
) -> Result<Principal, String> {
    check_principal_name(&name).map_err(|e| format!("{at}: principal: {e}"))?;
    let roles: BTreeSet<Role> = roles.into_iter().collect();
    let scope = if roles.contains(&Role::Admin) || owners.iter().any(|o| o == "*") {
        Scope::All
    } else {
        let mut set: BTreeSet<String> = owners.into_iter().collect();
        set.insert(name.clone());
        Scope::Owners(set)
    };
    Ok(Principal { name, roles, scope })
}

// ---- the live table ----

/// How callers are authenticated: off, or against the access file.
pub struct Access {
    file: Option<PathBuf>,
    table: RwLock<Arc<Table>>,
    /// Bumped at every reload, for those who hold on to a principal.
    changes: tokio::sync::watch::Sender<u64>,
    /// The file as it was when first read.
    loaded: crate::reload::Stamp,
}

impl Access {
    /// Authentication off: everyone is [`Principal::anonymous`].
    pub fn off() -> Access {
        Access {
            file: None,
            table: RwLock::new(Arc::new(Table::default())),
            changes: tokio::sync::watch::Sender::new(0),
            loaded: Vec::new(),
        }
    }

    /// Reads the access file; a missing or bad file is an error naming it.
    pub fn load(path: &Path) -> Result<Access, Error> {
        let loaded = crate::reload::stamp(&[path.to_owned()]);
        let table = read_table(path)?;
        Ok(Access {
            file: Some(path.to_owned()),
            table: RwLock::new(Arc::new(table)),
            changes: tokio::sync::watch::Sender::new(0),
            loaded,
        })
    }

    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// The table as it is now.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().expect("access table lock").clone()
    }

    /// Who `via` stands for now; `None` when the file no longer admits it.
    pub fn lookup(&self, via: &Via) -> Option<Principal> {
        match via {
            Via::Nothing => (!self.enabled()).then(Principal::anonymous),
            Via::Token(digest) => self.table().tokens.get(digest).cloned(),
            Via::Certificate(name) => Some(self.table().by_certificate(name)),
        }
    }

    /// Completes when the access file no longer lets `p` (authenticated
    /// `via`) do what `still` asks, or changes its scope. Never completes
    /// while it does.
    pub async fn revoked(
        &self,
        p: &Principal,
        via: &Via,
        still: impl Fn(&Principal) -> bool,
    ) -> Revoked {
        // Subscribe, then look: a reload between the caller's admission and
        // this first look is seen by the look, any later one by the wait.
        let mut changes = self.changes.subscribe();
        let mut first = true;
        loop {
            if !first && changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            first = false;
            match self.lookup(via) {
                None => return Revoked::Unknown(p.name.clone()),
                Some(now) if now.scope != p.scope || !still(&now) => {
                    return Revoked::Changed(p.name.clone());
                }
                Some(_) => {}
            }
        }
    }
}

impl crate::reload::Reloadable for Access {
    fn what(&self) -> &'static str {
        "access file"
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.file.iter().cloned().collect()
    }

    fn loaded(&self) -> crate::reload::Stamp {
        self.loaded.clone()
    }

    /// Reads the file again; on error the old table stays.
    fn reload(&self) -> Result<(), Error> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let table = read_table(path)?;
        *self.table.write().expect("access table lock") = Arc::new(table);
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }
}

fn read_table(path: &Path) -> Result<Table, Error> {
    // Whoever can write the file can make themselves admin.
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(Error::invalid(
                "auth-file",
                format!(
                    "{} has mode {mode:o}: group or others can write it, and so grant themselves any role; chmod go-w it",
                    path.display()
                ),
            ));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid("auth-file", format!("cannot read {}: {e}", path.display())))?;
    Table::parse(&text).map_err(|e| Error::invalid("auth-file", format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_digest_and_carry_roles_and_scope() {
        let alice = token_digest("alice-token");
        let admin = token_digest("admin-token");
        let text = format!(
            "tokens:\n  - {{principal: alice, sha256: {alice}, roles: [operator], owners: [team-a]}}\n  - {{principal: root, sha256: {admin}, roles: [admin]}}\ncertificates:\n  - {{principal: agent.example, roles: [discovery]}}\n"
        );
        let t = Table::parse(&text).unwrap();
        let (a, _) = t.by_token("alice-token").unwrap();
        assert_eq!(a.name, "alice");
        assert!(a.has_any(&[Role::Operator]) && !a.has_any(&[Role::Viewer]));
        assert!(a.scope.sees("alice") && a.scope.sees("team-a") && !a.scope.sees("bob"));
        assert_eq!(t.by_token("admin-token").unwrap().0.scope, Scope::All);
        assert!(t.by_token("nope").is_none());
        assert!(
            t.by_certificate("agent.example")
                .has_any(&[Role::Discovery])
        );
        let stranger = t.by_certificate("stranger");
        assert!(stranger.roles.is_empty() && stranger.scope.sees("stranger"));
    }

    #[test]
    fn bad_files_say_where() {
        for (text, needle) in [
            ("tokens: [{principal: a, sha256: xyz}]", "tokens[0]: sha256"),
            (
                "tokens: [{principal: tether, sha256: 0000000000000000000000000000000000000000000000000000000000000000}]",
                "reserved",
            ),
            ("certificates: [{principal: a, roles: [wizard]}]", "wizard"),
            ("users: []", "users"),
            (" \n", "empty"),
            (
                "certificates: [{principal: a}, {principal: a}]",
                "listed twice",
            ),
        ] {
            let e = Table::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn owners_for_new_objects() {
        let p = Principal {
            name: "alice".into(),
            roles: [Role::Operator].into(),
            scope: Scope::Owners(["alice".to_string(), "team-a".into()].into()),
        };
        assert_eq!(p.owner_for("", "owner").unwrap(), "alice");
        assert_eq!(p.owner_for("team-a", "owner").unwrap(), "team-a");
        assert!(p.owner_for("bob", "owner").is_err());
        assert_eq!(Principal::anonymous().owner_for("x", "owner").unwrap(), "x");
    }

    #[test]
    fn new_tokens_are_random_and_hash_to_hex() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.len() > 40);
        let d = token_digest(&a);
        assert_eq!(d.len(), 64);
        assert!(parse_digest(&d).is_some());
    }
}
