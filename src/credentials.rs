//! Credentials: secrets the server uses to reach connections, sealed at rest.
//!
//! Write-only by construction: [`CredentialInfo`], the only view that leaves
//! this module for clients, has no secret in it; [`Credentials::secret`] is
//! for the checks that use one. Validation errors name the offending field of
//! a secret but never repeat its value.

use crate::connection::{Micros, check_len, limits, parse_kind};
use crate::error::Error;
use crate::kinds::Kinds;
use crate::probe::Secret;
use crate::secrets::SecretBox;
use crate::store::{Store, StoredCredential, query};
use std::sync::Arc;

/// A credential as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialInfo {
    pub id: String,
    pub name: String,
    /// The connection kind whose credential schema the secret follows.
    pub type_: String,
    pub owner: String,
    pub create_time: Micros,
}

impl From<&StoredCredential> for CredentialInfo {
    fn from(c: &StoredCredential) -> Self {
        CredentialInfo {
            id: c.id.clone(),
            name: c.name.clone(),
            type_: c.type_.clone(),
            owner: c.owner.clone(),
            create_time: c.create_time,
        }
    }
}

pub struct NewCredential {
    pub name: String,
    pub type_: String,
    pub secret: Secret,
    pub owner: String,
}

/// Where a credential listing goes on from.
pub type CredentialCursor = (i64, String);

#[derive(Clone)]
pub struct Credentials {
    store: Store,
    secrets: Arc<SecretBox>,
    kinds: Kinds,
}

impl Credentials {
    pub fn new(store: Store, secrets: Arc<SecretBox>, kinds: Kinds) -> Self {
        Credentials {
            store,
            secrets,
            kinds,
        }
    }

    pub async fn create(&self, n: NewCredential) -> Result<CredentialInfo, Error> {
        if n.name.is_empty() {
            return Err(Error::invalid("name", "is required"));
        }
        check_len("name", &n.name, limits::SHORT)?;
        check_len("owner", &n.owner, limits::SHORT)?;
        let kind = parse_kind("type", &n.type_)?;
        if n.secret.is_empty() {
            return Err(Error::invalid("secret", "is required"));
        }
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

    /// A page of credentials in creation order, and where the next starts.
    pub async fn list(
        &self,
        after: Option<CredentialCursor>,
        limit: usize,
    ) -> Result<(Vec<CredentialInfo>, Option<CredentialCursor>), Error> {
        let rows = self
            .store
            .read(move |c| query::credentials(c, after, limit + 1))
            .await?;
        let more = rows.len() > limit;
        let infos: Vec<CredentialInfo> =
            rows.iter().take(limit).map(CredentialInfo::from).collect();
        let next = more
            .then(|| infos.last().map(|c| (c.create_time, c.id.clone())))
            .flatten();
        Ok((infos, next))
    }

    /// Deletes a credential no live connection uses.
    pub async fn delete(&self, id: String) -> Result<(), Error> {
        self.store
            .write(move |tx| {
                if tx.credential(&id)?.is_none() {
                    return Err(Error::CredentialNotFound { id });
                }
                if let Some(user) = tx.credential_user(&id, None)? {
                    return Err(Error::CredentialInUse {
                        id,
                        connection_id: user.to_string(),
                    });
                }
                tx.delete_credential(&id)?;
                Ok(())
            })
            .await
    }

    /// The decrypted secret of credential `id`, for a check to use.
    pub async fn secret(&self, id: String) -> Result<Option<Secret>, Error> {
        let row = self.store.read(move |c| query::credential(c, &id)).await?;
        row.map(|r| self.secrets.open(&r.id, &r.nonce, &r.sealed))
            .transpose()
    }
}
