//! Creating a connection by hand: recorded DISCOVERED, then moved along the
//! USER edges [`lifecycle::creation`] names to the state asked for, verified
//! first when one of those edges needs it.

use super::idempotency::{decode_answer, once};
use super::transition::{Move, apply_transition};
use super::{
    CreateRequest, Engine, NewConnection, SYSTEM_ACTOR, already_exists, failed, not_checked,
    usable_credential,
};
use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId, EventType, derive_identity};
use crate::error::Error;
use crate::kinds::Kinds;
use crate::lifecycle::{self, State, Trigger};
use crate::probe::Verdict;
use crate::store::EventDraft;

impl Engine {
    /// Registers a connection by hand: DISCOVERED, then along the allowed
    /// edges to `initial_state`, one event per step.
    pub(crate) async fn create(&self, r: CreateRequest) -> Result<Connection, Error> {
        let Some(creation) = lifecycle::creation(r.initial_state) else {
            return Err(Error::invalid(
                "initial_state",
                format!(
                    "{} is not a state to create in; use {}",
                    r.initial_state,
                    creatable_states()
                ),
            ));
        };
        self.kinds.admit(&r.connection.kind)?;
        self.kinds.check_metadata(
            &r.connection.kind,
            "connection.metadata",
            &r.connection.metadata,
        )?;
        let mut conn = new_connection(r.connection, &self.kinds, Trigger::User, "created".into());

        let needs_verification = creation.steps.iter().any(|&(from, to)| {
            self.kinds
                .check(&conn.kind, from, to, Trigger::User)
                .is_ok_and(|e| e.needs_verification)
        });
        // A retry gets its first answer; a duplicate is refused before a
        // verification is spent on it. One snapshot for both, so a retry never
        // sees its own first attempt as a duplicate. The writer checks again,
        // and is the only check when nothing is to be verified.
        let verifies = needs_verification && !r.skip_verification;
        let earlier = if !verifies {
            None
        } else {
            let identity = conn.identity.clone();
            let credential = conn.credential_id.clone();
            let kind = conn.kind.clone();
            let url = conn.url.clone();
            let retry = r.request.clone();
            let scope = r.scope.clone();
            self.store
                .read(move |c| {
                    if let Some(k) = &retry
                        && let Some(answer) = decode_answer(k, c.answer(&k.stored)?)?
                    {
                        return Ok(Some(answer));
                    }
                    if !credential.is_empty()
                        && let Err(e) = usable_credential(
                            c.credential(&credential)?,
                            &credential,
                            &kind,
                            &url,
                            &scope,
                        )
                    {
                        return Ok(Some(Err(e)));
                    }
                    Ok(c.live_by_identity(&identity)?
                        .map(|e| Err(already_exists(&e, &scope))))
                })
                .await?
        };
        if let Some(answer) = earlier {
            return answer;
        }

        let mut plan: Vec<Step> = creation
            .steps
            .iter()
            .map(|&(_, target)| Step {
                target,
                trigger: Trigger::User,
                reason: format!("requested {} at creation", r.initial_state),
            })
            .collect();
        // A create whose verification fails commits nothing: there is no
        // connection yet to move along the SYSTEM column, so the error names
        // no id and reports the state the request would have started from.
        if verifies {
            match self.verifier.verify(&conn).await {
                None => {}
                Some(Verdict::Reachable(detail)) => {
                    for s in &mut plan {
                        s.reason = detail.clone();
                    }
                }
                Some(Verdict::NotChecked(detail)) => return Err(not_checked(detail)),
                Some(verdict) => {
                    let (err, _, _) = failed(&conn, verdict);
                    return Err(without_id(err));
                }
            }
        }

        let key = r.request;
        let actor = r.actor;
        let scope = r.scope;
        let kinds = self.kinds.clone();
        self.store
            .write(move |tx| {
                once(tx, &key, |tx| {
                    if let Some(existing) = tx.live_by_identity(&conn.identity)? {
                        return Err(already_exists(&existing, &scope));
                    }
                    if !conn.credential_id.is_empty() {
                        usable_credential(
                            tx.credential(&conn.credential_id)?,
                            &conn.credential_id,
                            &conn.kind,
                            &conn.url,
                            &scope,
                        )?;
                    }
                    tx.record(
                        &mut conn,
                        EventDraft {
                            type_: EventType::Created,
                            from_state: lifecycle::INITIAL,
                            trigger: Trigger::User,
                            reason: "created".into(),
                            actor: actor.clone(),
                        },
                    )?;
                    for step in plan {
                        let actor = match step.trigger {
                            Trigger::User => actor.clone(),
                            Trigger::System => SYSTEM_ACTOR.into(),
                        };
                        conn = apply_transition(
                            tx,
                            &kinds,
                            Move {
                                id: conn.id.clone(),
                                target: step.target,
                                trigger: step.trigger,
                                reason: step.reason,
                                actor,
                                etag: None,
                                verified: None,
                            },
                        )?;
                    }
                    Ok((conn.id.clone(), Ok(conn)))
                })
            })
            .await?
    }
}

/// A connection not yet stored, in DISCOVERED, with its identity settled.
pub(super) fn new_connection(
    n: NewConnection,
    kinds: &Kinds,
    trigger: Trigger,
    reason: String,
) -> Connection {
    let id = ConnectionId::generate();
    let (type_, sub_type) = kinds.default_types(&n.kind);
    let managed = n
        .managed
        .unwrap_or_else(|| kinds.managed_by_default(&n.kind));
    let identity = if n.identity.is_empty() {
        derive_identity(&n.kind, &n.url, &id)
    } else {
        n.identity
    };
    Connection {
        id,
        type_: if n.type_.is_empty() { type_ } else { n.type_ },
        sub_type: if n.sub_type.is_empty() {
            sub_type
        } else {
            n.sub_type
        },
        kind: n.kind,
        name: n.name,
        description: n.description,
        url: n.url,
        identity,
        metadata: n.metadata,
        labels: n.labels,
        managed,
        credential_id: n.credential_id,
        owner: n.owner,
        state: lifecycle::INITIAL,
        state_reason: reason,
        state_trigger: trigger,
        // Set by the store when recorded.
        state_time: 0,
        revision: Revision::ZERO,
        create_time: 0,
        update_time: 0,
        last_probe: None,
    }
}

/// The states a create may ask for, for a message: "A, B, C or D".
pub(super) fn creatable_states() -> String {
    let names: Vec<&str> = State::ALL
        .into_iter()
        .filter(|&s| lifecycle::creation(s).is_some())
        .map(State::name)
        .collect();
    match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

struct Step {
    target: State,
    trigger: Trigger,
    reason: String,
}

/// A verification error of a create that committed nothing: it names no id.
fn without_id(e: Error) -> Error {
    match e {
        Error::Unreachable { detail, state, .. } => Error::Unreachable {
            id: String::new(),
            detail,
            state,
        },
        Error::CredentialsRejected { detail, state, .. } => Error::CredentialsRejected {
            id: String::new(),
            detail,
            state,
        },
        other => other,
    }
}
