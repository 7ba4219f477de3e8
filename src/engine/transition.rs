//! Moving a connection: one USER move, a batch of them, what a failed
//! verification does, and [`apply_transition`], the writer step every move
//! (USER or SYSTEM, from any operation) goes through.

use super::idempotency::{once, once_if_changed};
use super::{
    Engine, RequestKey, SYSTEM_ACTOR, TransitionRequest, check_etag, failed, invalid_transition,
    not_checked,
};
use crate::access::Scope;
use crate::connection::{Connection, ConnectionId, EventType};
use crate::error::Error;
use crate::kinds::Kinds;
use crate::lifecycle::{self, State, Trigger};
use crate::metrics::{Metrics, Outcome};
use crate::probe::Verdict;
use crate::store::{EventDraft, Tx};
use std::collections::BTreeMap;

impl Engine {
    /// Moves a connection along one USER edge (DELETED included).
    pub(crate) async fn transition(&self, r: TransitionRequest) -> Result<Connection, Error> {
        let answer = self.try_transition(r).await;
        // A committed move is counted where it is logged (`log_move`).
        if let Err(e) = &answer {
            self.metrics.transition(Trigger::User, outcome_of(e));
        }
        answer
    }

    async fn try_transition(&self, r: TransitionRequest) -> Result<Connection, Error> {
        // A move that verifies nothing goes straight to the writer, which
        // checks the scope, etag, no-op, retry and lifecycle table against
        // the row as it is then: a read before it would only repeat them.
        if r.skip_verification || !lifecycle::verified_target(r.target) {
            return self.commit_user_move(r, None).await;
        }
        if let Some(answer) = self.replay(&r.request).await? {
            return answer;
        }
        let current = self.get(r.id.clone(), &r.scope).await?;
        check_etag(&current, r.etag.as_deref())?;
        // A no-op needs no writer, and stores no answer: a stream of no-ops
        // with fresh request_ids must not fill the disk. Its retry finds the
        // connection as it is then, which is what the request asked for.
        if current.state == r.target {
            return Ok(current);
        }
        let edge = self
            .kinds
            .check(&current.kind, current.state, r.target, Trigger::User)
            .map_err(|refusal| invalid_transition(&current.id, refusal))?;

        let mut r = r;
        let mut verified = None;
        if edge.needs_verification && !r.skip_verification {
            match self.verifier.verify(&current).await {
                None => {}
                Some(Verdict::Reachable(detail)) => {
                    verified = Some(Verified::of(&current));
                    if r.reason.is_empty() {
                        r.reason = detail;
                    }
                }
                Some(Verdict::NotChecked(detail)) => return Err(not_checked(detail)),
                Some(verdict) => {
                    return self
                        .fail_verification(current, verdict, r.request, r.method)
                        .await;
                }
            }
        }
        self.commit_user_move(r, verified).await
    }

    async fn commit_user_move(
        &self,
        r: TransitionRequest,
        verified: Option<Verified>,
    ) -> Result<Connection, Error> {
        let m = Move {
            id: r.id,
            target: r.target,
            trigger: Trigger::User,
            reason: r.reason,
            actor: r.actor,
            etag: r.etag,
            verified,
        };
        let key = r.request;
        let scope = r.scope;
        let (actor, method) = (m.actor.clone(), r.method);
        let kinds = self.kinds.clone();
        // A deletion frees space (the tombstone keeps no metadata, and
        // earlier events lose theirs), so it runs over the storage quota too.
        let deletes = lifecycle::is_tombstone(m.target);
        let trigger = m.trigger;
        let job = move |tx: &mut Tx<'_>| {
            let mut from = None;
            let answer = once_if_changed(tx, &key, |tx| {
                let id = m.id.clone();
                let (c, left) = apply_move(tx, &kinds, m, Some(&scope))?;
                let moved = left != c.state;
                if moved {
                    from = Some(left);
                }
                Ok((id, Ok(c), moved))
            })?;
            Ok((answer, from))
        };
        let (answer, from) = if deletes {
            self.store.write_freeing(job).await?
        } else {
            self.store.write(job).await?
        };
        if let (Ok(c), Some(from)) = (&answer, from) {
            log_move(&self.metrics, c, from, trigger, &actor, method);
        }
        answer
    }

    /// Applies each transition independently; one result per request, in
    /// order. Items for the same connection apply in request order; different
    /// connections go in parallel, a bounded number at a time.
    pub(crate) async fn batch_transition(
        &self,
        requests: Vec<TransitionRequest>,
    ) -> Vec<Result<Connection, Error>> {
        use futures::StreamExt;
        let n = requests.len();
        let mut chains: BTreeMap<ConnectionId, Vec<(usize, TransitionRequest)>> = BTreeMap::new();
        for (i, r) in requests.into_iter().enumerate() {
            chains.entry(r.id.clone()).or_default().push((i, r));
        }
        let mut results: Vec<Option<Result<Connection, Error>>> = (0..n).map(|_| None).collect();
        let mut done = futures::stream::iter(chains.into_values())
            .map(|chain| async move {
                let mut out = Vec::with_capacity(chain.len());
                for (i, r) in chain {
                    out.push((i, self.transition(r).await));
                }
                out
            })
            .buffer_unordered(BATCH_PARALLELISM);
        while let Some(chain) = done.next().await {
            for (i, r) in chain {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every item ran"))
            .collect()
    }

    /// A failed verification: an attempt from DISCOVERED or REGISTERED (to
    /// register or to connect) moves the connection where
    /// [`lifecycle::after_failed_attempt`] says (unreachable: NOT_FOUND;
    /// credentials rejected: DISCONNECTED); any other attempt leaves it as it was.
    async fn fail_verification(
        &self,
        current: Connection,
        verdict: Verdict,
        key: Option<RequestKey>,
        method: &'static str,
    ) -> Result<Connection, Error> {
        let (err, finding, detail) = failed(&current, verdict);
        let Some(fallback) = lifecycle::after_failed_attempt(current.state, finding) else {
            return Err(with_state(err, current.state));
        };
        let m = Move {
            id: current.id.clone(),
            target: fallback,
            trigger: Trigger::System,
            reason: detail,
            actor: SYSTEM_ACTOR.into(),
            etag: None,
            verified: Some(Verified::of(&current)),
        };
        let kinds = self.kinds.clone();
        let answer = self
            .store
            .write(move |tx| {
                let mut moved = None;
                let answer = once(tx, &key, |tx| {
                    let (c, from) = apply_move(tx, &kinds, m, None)?;
                    let answer = Err(with_state(err, c.state));
                    let id = c.id.clone();
                    moved = Some((c, from));
                    Ok((id, answer))
                })?;
                Ok((answer, moved))
            })
            .await?;
        if let (_, Some((c, from))) = &answer
            && *from != c.state
        {
            log_move(
                &self.metrics,
                c,
                *from,
                Trigger::System,
                SYSTEM_ACTOR,
                method,
            );
        }
        answer.0
    }
}

/// One transition as the writer applies it.
pub(super) struct Move {
    pub(super) id: ConnectionId,
    pub(super) target: State,
    pub(super) trigger: Trigger,
    pub(super) reason: String,
    pub(super) actor: String,
    pub(super) etag: Option<String>,
    /// Commit only if the connection is still what was verified.
    pub(super) verified: Option<Verified>,
}

/// What a verification looked at. A change to any of it while the check ran
/// makes the result stale; other changes (labels, a name) do not.
#[derive(PartialEq)]
pub(super) struct Verified {
    state: State,
    /// When it entered its state: a state left and entered again is a change.
    state_time: i64,
    url: String,
    credential_id: String,
}

impl Verified {
    pub(super) fn of(c: &Connection) -> Verified {
        Verified {
            state: c.state,
            state_time: c.state_time,
            url: c.url.clone(),
            credential_id: c.credential_id.clone(),
        }
    }
}

/// Connections a batch moves at once.
const BATCH_PARALLELISM: usize = 32;

/// Applies one transition against the row as it is now: the authoritative
/// check of etag, what was verified, and the lifecycle table.
pub(super) fn apply_transition(
    tx: &mut Tx<'_>,
    kinds: &Kinds,
    m: Move,
) -> Result<Connection, Error> {
    apply_move(tx, kinds, m, None).map(|(c, _)| c)
}

/// [`apply_transition`], also saying which state the connection left (its
/// state now when it did not move). A `scope` the connection is outside of
/// finds it missing, as reads do.
pub(super) fn apply_move(
    tx: &mut Tx<'_>,
    kinds: &Kinds,
    m: Move,
    scope: Option<&Scope>,
) -> Result<(Connection, State), Error> {
    let mut c = tx
        .get(&m.id)?
        .filter(|c| scope.is_none_or(|s| s.sees(&c.owner)))
        .ok_or_else(|| Error::not_found(&m.id))?;
    check_etag(&c, m.etag.as_deref())?;
    // Already there (someone else moved it meanwhile): done, not a conflict.
    if c.state == m.target {
        let from = c.state;
        return Ok((c, from));
    }
    if m.verified.as_ref().is_some_and(|v| *v != Verified::of(&c)) {
        return Err(Error::Conflict {
            id: c.id.to_string(),
        });
    }
    // Whether a USER edge needs verification depends only on its target (a
    // lifecycle test pins this), so the caller's decision made against an
    // older row still holds here.
    kinds
        .check(&c.kind, c.state, m.target, m.trigger)
        .map_err(|refusal| invalid_transition(&c.id, refusal))?;
    let from_state = c.state;
    c.state = m.target;
    c.state_reason = m.reason.clone();
    c.state_trigger = m.trigger;
    let deleted = lifecycle::is_tombstone(m.target);
    if deleted {
        // What remains is a tombstone: its credentials and collected data go,
        // here and from everything stored about it before. The credential
        // itself goes too, unless another live connection uses it.
        // A credential of another owner (an admin may attach one) is not
        // the connection's to take with it.
        let credential = std::mem::take(&mut c.credential_id);
        if !credential.is_empty()
            && tx
                .credential(&credential)?
                .is_some_and(|k| k.owner == c.owner)
            && tx.credential_user(&credential, Some(&c.id))?.is_none()
        {
            tx.delete_credential(&credential)?;
        }
        c.metadata.clear();
        c.description.clear();
        c.labels.clear();
    }
    tx.record(
        &mut c,
        EventDraft {
            type_: if deleted {
                EventType::Deleted
            } else {
                EventType::Transitioned
            },
            from_state,
            trigger: m.trigger,
            reason: m.reason,
            actor: m.actor,
        },
    )?;
    if deleted {
        tx.scrub(&c.id)?;
    }
    Ok((c, from_state))
}

/// The log line of a committed move, and its count, written by the task
/// that asked for it, off the writer thread. `principal` made it (`tether`
/// for the server's own), by `method` (the gRPC method, or `probe`).
pub(super) fn log_move(
    metrics: &Metrics,
    c: &Connection,
    from: State,
    trigger: Trigger,
    principal: &str,
    method: &str,
) {
    metrics.transition(trigger, Outcome::Accepted);
    tracing::info!(
        principal = %principal,
        method = %method,
        id = %c.id,
        from = %from,
        to = %c.state,
        trigger = %trigger,
        revision = c.revision.get(),
        "transition"
    );
}

/// How a move that was not made came out, for the metrics.
fn outcome_of(e: &Error) -> Outcome {
    match e {
        Error::InvalidTransition { .. } => Outcome::Refused,
        Error::Unreachable { .. } | Error::CredentialsRejected { .. } => Outcome::Unverified,
        Error::EtagMismatch { .. } | Error::Conflict { .. } => Outcome::Conflict,
        _ => Outcome::Failed,
    }
}

/// Sets the state a verification error reports the connection in.
fn with_state(e: Error, state: State) -> Error {
    match e {
        Error::Unreachable { id, detail, .. } => Error::Unreachable { id, detail, state },
        Error::CredentialsRejected { id, detail, .. } => {
            Error::CredentialsRejected { id, detail, state }
        }
        other => other,
    }
}
