//! Changing a connection's fields other than its state.

use super::idempotency::once;
use super::read::visible;
use super::{Engine, UpdateRequest, already_exists, check_etag, usable_credential_for};
use crate::connection::{Connection, EventType, derive_identity};
use crate::error::Error;
use crate::lifecycle::{self, Trigger};
use crate::store::EventDraft;

impl Engine {
    /// Changes fields other than the state.
    pub(crate) async fn update(&self, r: UpdateRequest) -> Result<Connection, Error> {
        if let Some(answer) = self.replay(&r.request).await? {
            return answer;
        }
        let key = r.request;
        let kinds = self.kinds.clone();
        self.store
            .write(move |tx| {
                once(tx, &key, |tx| {
                    let mut c = visible(tx.get(&r.id)?, &r.id, &r.scope)?;
                    check_etag(&c, r.etag.as_deref())?;
                    if lifecycle::is_tombstone(c.state) {
                        return Err(Error::Deleted {
                            id: c.id.to_string(),
                        });
                    }
                    let before = c.clone();
                    let p = r.patch;
                    if let Some(v) = p.name {
                        c.name = v;
                    }
                    if let Some(v) = p.description {
                        c.description = v;
                    }
                    if let Some(v) = p.metadata {
                        kinds.check_metadata(&c.kind, "connection.metadata", &v)?;
                        c.metadata = v;
                    }
                    if let Some(v) = p.credential_id {
                        c.credential_id = v;
                    }
                    if let Some(v) = p.labels {
                        c.labels = v;
                    }
                    if let Some(v) = p.managed {
                        c.managed = v;
                    }
                    if let Some(url) = p.url {
                        // An identity that was derived from the url follows it.
                        let derived = derive_identity(&c.kind, &c.url, &c.id);
                        if p.identity.is_none() && c.identity == derived {
                            c.identity = derive_identity(&c.kind, &url, &c.id);
                        }
                        c.url = url;
                    }
                    if let Some(identity) = p.identity {
                        c.identity = if identity.is_empty() {
                            derive_identity(&c.kind, &c.url, &c.id)
                        } else {
                            identity
                        };
                    }
                    // A credential and a url meet: attaching one, or moving a
                    // connection that has one, needs the credential to allow the
                    // url (or a new credential given with it).
                    if !c.credential_id.is_empty()
                        && (c.credential_id != before.credential_id || c.url != before.url)
                    {
                        let field = if c.credential_id != before.credential_id {
                            "connection.credential_id"
                        } else {
                            "connection.url"
                        };
                        usable_credential_for(
                            tx.credential(&c.credential_id)?,
                            &c.credential_id,
                            &c.kind,
                            &c.url,
                            &r.scope,
                            field,
                        )?;
                    }
                    let changed = changed_fields(&before, &c);
                    if changed.is_empty() {
                        return Ok((c.id.clone(), Ok(c)));
                    }
                    if c.identity != before.identity
                        && let Some(other) = tx.live_by_identity(&c.identity)?
                    {
                        return Err(already_exists(&other, &r.scope));
                    }
                    let from_state = c.state;
                    tx.record(
                        &mut c,
                        EventDraft {
                            type_: EventType::Updated,
                            from_state,
                            trigger: Trigger::User,
                            reason: format!("updated {}", changed.join(", ")),
                            actor: r.actor,
                        },
                    )?;
                    Ok((c.id.clone(), Ok(c)))
                })
            })
            .await?
    }
}

fn changed_fields(a: &Connection, b: &Connection) -> Vec<&'static str> {
    let mut out = Vec::new();
    if a.name != b.name {
        out.push("name");
    }
    if a.description != b.description {
        out.push("description");
    }
    if a.url != b.url {
        out.push("url");
    }
    if a.identity != b.identity {
        out.push("identity");
    }
    if a.metadata != b.metadata {
        out.push("metadata");
    }
    if a.labels != b.labels {
        out.push("labels");
    }
    if a.credential_id != b.credential_id {
        out.push("credential_id");
    }
    if a.managed != b.managed {
        out.push("managed");
    }
    out
}
