//! The single write path: load, check the lifecycle table, verify if needed,
//! commit the row change and its event in one transaction, then publish.
//!
//! Every rule is re-checked inside the writer's transaction against the row as
//! it is then, so changes to one connection are serialised in commit order and
//! the latest accepted request wins. A verification runs outside the
//! transaction (it may take seconds); its result commits only if the connection
//! is still at the revision that was verified, so a slow check never
//! overwrites a newer state.
//!
//! No gRPC here: requests arrive parsed, answers leave as domain values.

use crate::access::Scope;
use crate::connection::{Connection, ConnectionId, EventType, derive_identity};
use crate::connection::{ProbeOutcome, ProbeResult};
use crate::credentials::custody;
use crate::error::{Error, RefusalInfo};
use crate::kinds::Kinds;
use crate::lifecycle::{self, Finding, Probed, Rereported, State, Trigger};
use crate::probe::{self, Verdict, Verifier};
use crate::store::{EventDraft, EventFilter, Filter, ListQuery, Page, Store, Tx, query};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The actor recorded for changes the server makes on its own.
pub const SYSTEM_ACTOR: &str = "tether";

/// A client's retry key (AIP-155) and a digest of the request it came with.
#[derive(Clone, Debug)]
pub struct RequestKey {
    /// As the client sent it, for messages.
    pub id: String,
    /// What it is stored under: a keyed digest of the caller and the id, so
    /// two callers' ids never meet and the table does not hold them in clear.
    pub stored: String,
    pub fingerprint: i64,
}

/// The fields of a connection a client chooses, already parsed.
#[derive(Clone, Debug, Default)]
pub struct NewConnection {
    pub kind: String,
    pub type_: String,
    pub sub_type: String,
    pub name: String,
    pub description: String,
    pub url: String,
    /// Empty: derived from kind and url (or the id).
    pub identity: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub labels: BTreeMap<String, String>,
    /// `None`: the kind's default.
    pub managed: Option<bool>,
    pub credential_id: String,
    pub owner: String,
}

pub struct CreateRequest {
    pub connection: NewConnection,
    pub initial_state: State,
    pub skip_verification: bool,
    pub request: Option<RequestKey>,
    pub actor: String,
    /// Whose objects the caller sees: a credential or an existing identity
    /// outside it is not named back.
    pub scope: Scope,
}

pub struct TransitionRequest {
    pub id: ConnectionId,
    pub target: State,
    pub reason: String,
    pub etag: Option<String>,
    pub skip_verification: bool,
    pub request: Option<RequestKey>,
    pub actor: String,
    pub scope: Scope,
}

/// The fields an update replaces; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub url: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub labels: Option<BTreeMap<String, String>>,
    /// `Some("")` re-derives the identity from kind and url.
    pub identity: Option<String>,
    /// `Some("")` drops the credential.
    pub credential_id: Option<String>,
    /// Whether the server probes and moves it on its own.
    pub managed: Option<bool>,
}

pub struct UpdateRequest {
    pub id: ConnectionId,
    pub patch: Patch,
    pub etag: Option<String>,
    pub request: Option<RequestKey>,
    pub actor: String,
    pub scope: Scope,
}

/// A page of history.
pub struct EventPage {
    pub events: Vec<crate::connection::Event>,
    /// Pass as `after_revision` for the next page; `None` when there is no more.
    pub next_after_revision: Option<i64>,
    pub revision: i64,
    pub compact_revision: i64,
}

/// The answer a request gets, stored for `request_id` retries. A failed
/// verification that moved the connection is an answer worth replaying too.
type Answer = Result<Connection, Error>;

#[derive(Clone)]
pub struct Engine {
    store: Store,
    verifier: Arc<dyn Verifier>,
    kinds: Kinds,
}

impl Engine {
    pub fn new(store: Store, verifier: Arc<dyn Verifier>, kinds: Kinds) -> Self {
        Engine {
            store,
            verifier,
            kinds,
        }
    }

    /// The connection, if it exists and `scope` sees it: one it may not see
    /// is not found, exactly like one that does not exist.
    pub async fn get(&self, id: ConnectionId, scope: &Scope) -> Result<Connection, Error> {
        let scope = scope.clone();
        self.store
            .read(move |c| visible(query::get(c, &id)?, &id, &scope))
            .await
    }

    pub async fn list(&self, q: ListQuery) -> Result<Page, Error> {
        self.store.read(move |c| query::list(c, &q)).await
    }

    pub async fn count(&self, filter: Filter) -> Result<(Vec<(State, i64)>, i64), Error> {
        self.store.read(move |c| query::count(c, &filter)).await
    }

    /// A page of history of the connections `scope` sees; one connection's
    /// history when `f` names it (not found when it is not to be seen).
    pub async fn events(&self, f: EventFilter, scope: &Scope) -> Result<EventPage, Error> {
        let scope = scope.clone();
        self.store
            .read(move |c| {
                if let Some(id) = &f.connection_id {
                    visible(query::get(c, id)?, id, &scope)?;
                }
                // Like a watch: history that has been pruned is said to be
                // gone, never skipped in silence (0 asks for what is kept).
                let (current, compact) = query::revisions(c)?;
                if f.after_revision != 0 && f.after_revision < compact {
                    return Err(Error::RevisionCompacted {
                        requested: f.after_revision,
                        compact,
                    });
                }
                if f.after_revision > current {
                    return Err(Error::RevisionInFuture {
                        requested: f.after_revision,
                        current,
                    });
                }
                let (revision, compact_revision) = query::revisions(c)?;
                let mut events = query::events(
                    c,
                    &EventFilter {
                        limit: f.limit + 1,
                        ..f
                    },
                )?;
                let more = events.len() > f.limit;
                events.truncate(f.limit);
                Ok(EventPage {
                    next_after_revision: more.then(|| events.last().map(|e| e.revision)).flatten(),
                    events,
                    revision,
                    compact_revision,
                })
            })
            .await
    }

    /// Registers a connection by hand: DISCOVERED, then along the allowed
    /// edges to `initial_state`, one event per step.
    pub async fn create(&self, r: CreateRequest) -> Result<Connection, Error> {
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

        // A retry gets its first answer; a duplicate is refused before a
        // verification is spent on it. One snapshot for both, so a retry never
        // sees its own first attempt as a duplicate. The writer checks again.
        let identity = conn.identity.clone();
        let credential = conn.credential_id.clone();
        let kind = conn.kind.clone();
        let url = conn.url.clone();
        let retry = r.request.clone();
        let scope = r.scope.clone();
        let earlier = self
            .store
            .read(move |c| {
                if let Some(k) = &retry
                    && let Some(answer) = decode_answer(k, query::request_answer(c, &k.stored)?)?
                {
                    return Ok(Some(answer));
                }
                if !credential.is_empty()
                    && let Err(e) = usable_credential(
                        query::credential(c, &credential)?,
                        &credential,
                        &kind,
                        &url,
                        &scope,
                    )
                {
                    return Ok(Some(Err(e)));
                }
                Ok(query::live_by_identity(c, &identity)?.map(|e| Err(already_exists(&e, &scope))))
            })
            .await?;
        if let Some(answer) = earlier {
            return answer;
        }

        let needs_verification = creation.steps.iter().any(|&(from, to)| {
            self.kinds
                .check(&conn.kind, from, to, Trigger::User)
                .is_ok_and(|e| e.needs_verification)
        });
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
        if needs_verification && !r.skip_verification {
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
                if let Some(answer) = replayed(tx, &key)? {
                    return Ok(answer);
                }
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
                let id = conn.id.clone();
                let answer = Ok(conn);
                remember(tx, &key, &id, &answer)?;
                Ok(answer)
            })
            .await?
    }

    /// Moves a connection along one USER edge (DELETED included).
    pub async fn transition(&self, r: TransitionRequest) -> Result<Connection, Error> {
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
                    return self.fail_verification(current, verdict, r.request).await;
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
        let kinds = self.kinds.clone();
        // A deletion frees space (the tombstone keeps no metadata, and
        // earlier events lose theirs), so it runs over the storage quota too.
        let deletes = lifecycle::is_tombstone(m.target);
        let job = move |tx: &mut Tx<'_>| {
            if let Some(answer) = replayed(tx, &key)? {
                return Ok(answer);
            }
            let id = m.id.clone();
            let answer = Ok(apply_transition(tx, &kinds, m)?);
            remember(tx, &key, &id, &answer)?;
            Ok(answer)
        };
        if deletes {
            self.store.write_freeing(job).await?
        } else {
            self.store.write(job).await?
        }
    }

    /// Applies each transition independently; one result per request, in
    /// order. Items for the same connection apply in request order; different
    /// connections go in parallel, a bounded number at a time.
    pub async fn batch_transition(
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
        self.store
            .write(move |tx| {
                if let Some(answer) = replayed(tx, &key)? {
                    return Ok(answer);
                }
                let moved = apply_transition(tx, &kinds, m)?;
                let answer = Err(with_state(err, moved.state));
                remember(tx, &key, &moved.id, &answer)?;
                Ok(answer)
            })
            .await?
    }

    /// Changes fields other than the state.
    pub async fn update(&self, r: UpdateRequest) -> Result<Connection, Error> {
        if let Some(answer) = self.replay(&r.request).await? {
            return answer;
        }
        let key = r.request;
        let kinds = self.kinds.clone();
        self.store
            .write(move |tx| {
                if let Some(answer) = replayed(tx, &key)? {
                    return Ok(answer);
                }
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
                    let id = c.id.clone();
                    let answer = Ok(c);
                    remember(tx, &key, &id, &answer)?;
                    return Ok(answer);
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
                let id = c.id.clone();
                let answer = Ok(c);
                remember(tx, &key, &id, &answer)?;
                Ok(answer)
            })
            .await?
    }

    /// Takes what a discovery agent found. Identity is the key: nothing live
    /// with it (or only tombstones) makes a new DISCOVERED connection; a
    /// NOT_FOUND one comes back to DISCOVERED; anything else stays as it is,
    /// an IGNORED one above all. Items commit in groups of
    /// [`DISCOVERY_GROUP`], each group one writer job.
    pub async fn report_discovered(
        &self,
        reporter: &Reporter,
        items: Vec<Result<NewConnection, Error>>,
    ) -> Result<Vec<Discovered>, Error> {
        let mut out = Vec::with_capacity(items.len());
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let group: Vec<_> = items.by_ref().take(DISCOVERY_GROUP).collect();
            let reporter = reporter.clone();
            let kinds = self.kinds.clone();
            let done = self
                .store
                .write(move |tx| {
                    group
                        .into_iter()
                        .map(|item| match item {
                            Ok(n) => discover(tx, &kinds, n, &reporter),
                            Err(e) => Ok(Discovered::Rejected(e)),
                        })
                        .collect::<Result<Vec<_>, Error>>()
                })
                .await?;
            out.extend(done);
        }
        Ok(out)
    }

    /// Applies what a background probe of `probed` saw: keeps the result on
    /// the connection (no event), and moves it along the SYSTEM edges the
    /// result calls for (one event per step). Nothing happens if the
    /// connection changed in what was checked since the probe started, or is
    /// no longer monitored: a user request always wins over an older probe.
    /// The connection as it is afterwards, or `None` when the result was dropped.
    pub async fn apply_probe(
        &self,
        probed: &Connection,
        result: Option<probe::ProbeResult>,
        failure_threshold: u32,
    ) -> Result<Option<Connection>, Error> {
        // A kind with no check passes verification (the lifecycle's rule).
        let (verdict, latency) = match result {
            Some(r) => (r.verdict, r.latency),
            None => (
                Verdict::Reachable("no check is defined for this connection".into()),
                std::time::Duration::ZERO,
            ),
        };
        let snapshot = Verified::of(probed);
        // Read outside the writer; the snapshot check below makes sure it is
        // still the same disconnection when the result commits.
        // Needed only when a disconnected connection passes its check.
        let disconnected_from = match finding(&verdict) {
            Some(f) if lifecycle::needs_disconnected_from(probed.state, f) => {
                self.disconnected_from(probed).await?
            }
            _ => None,
        };
        let id = probed.id.clone();
        let kinds = self.kinds.clone();
        self.store
            .write(move |tx| {
                let Some(row) = tx.get(&id)? else {
                    return Ok(None);
                };
                if Verified::of(&row) != snapshot
                    || !lifecycle::monitored(row.managed, row.state, row.state_trigger)
                {
                    return Ok(None);
                }
                let outcome = match &verdict {
                    Verdict::Reachable(_) => ProbeOutcome::Reachable,
                    Verdict::Unreachable(_) => ProbeOutcome::Unreachable,
                    Verdict::CredentialsRejected(_) => ProbeOutcome::CredentialsRejected,
                    // Nothing was learnt about the peer: record nothing, try again later.
                    Verdict::NotChecked(_) => return Ok(Some(row)),
                };
                // Failures count within the current state only: a state change
                // (a user reconnecting, say) starts the count again.
                let failures = match outcome {
                    ProbeOutcome::Reachable => 0,
                    _ => {
                        row.last_probe
                            .as_ref()
                            .filter(|p| p.time >= row.state_time)
                            .map_or(0, |p| p.consecutive_failures)
                            + 1
                    }
                };
                let detail = verdict.detail().to_owned();
                tx.set_probe(
                    &id,
                    &ProbeResult {
                        time: tx.now(),
                        outcome,
                        latency_ms: latency.as_millis() as i64,
                        message: detail.clone(),
                        consecutive_failures: failures,
                    },
                )?;
                let steps = lifecycle::after_probe(Probed {
                    state: row.state,
                    finding: match outcome {
                        ProbeOutcome::Reachable => Finding::Reachable,
                        ProbeOutcome::Unreachable => Finding::Unreachable,
                        ProbeOutcome::CredentialsRejected => Finding::CredentialsRejected,
                    },
                    threshold_reached: failures >= failure_threshold as i32,
                    auto_connects: kinds.auto_connects(&row.kind),
                    disconnected_from,
                });
                let reason = match outcome {
                    ProbeOutcome::Reachable => detail,
                    _ if lifecycle::counts_failures(row.state) => {
                        format!("{failures} failed probes in a row; last: {detail}")
                    }
                    ProbeOutcome::Unreachable => format!("unreachable: {detail}"),
                    ProbeOutcome::CredentialsRejected => format!("credentials rejected: {detail}"),
                };
                let mut now = tx.get(&id)?;
                for &target in steps {
                    now = Some(apply_transition(
                        tx,
                        &kinds,
                        Move {
                            id: id.clone(),
                            target,
                            trigger: Trigger::System,
                            reason: reason.clone(),
                            actor: SYSTEM_ACTOR.into(),
                            etag: None,
                            verified: None,
                        },
                    )?);
                }
                Ok(now)
            })
            .await
    }

    /// The state the server disconnected `c` from, read from the event that
    /// moved it into DISCONNECTED (the one at its state time). `None` when
    /// that event is no longer kept: the caller then treats it as never
    /// having been taken into use.
    async fn disconnected_from(&self, c: &Connection) -> Result<Option<State>, Error> {
        let id = c.id.clone();
        let entered = c.state_time;
        self.store
            .read(move |conn| {
                let mut found = None;
                let mut after = 0;
                loop {
                    let page = query::events(
                        conn,
                        &EventFilter {
                            connection_id: Some(id.clone()),
                            after_revision: after,
                            limit: 1000,
                            owners: None,
                            max_bytes: usize::MAX,
                        },
                    )?;
                    let Some(last) = page.last() else {
                        return Ok(found);
                    };
                    after = last.revision;
                    found = page
                        .iter()
                        .rev()
                        .find(|e| {
                            e.to_state == State::Disconnected
                                && e.from_state != State::Disconnected
                                && e.time == entered
                        })
                        .map(|e| e.from_state)
                        .or(found);
                }
            })
            .await
    }

    /// The stored answer to a retried request, read outside the writer so a
    /// retry costs no verification.
    async fn replay(&self, key: &Option<RequestKey>) -> Result<Option<Answer>, Error> {
        let Some(k) = key.clone() else {
            return Ok(None);
        };
        self.store
            .read(move |c| decode_answer(&k, query::request_answer(c, &k.stored)?))
            .await
    }
}

/// What one reported connection came to.
#[derive(Debug)]
pub enum Discovered {
    Created(Connection),
    Rediscovered(Connection),
    Unchanged(Connection),
    SuppressedIgnored(Connection),
    /// It exists, but belongs to an owner the reporter may not see.
    Hidden,
    Rejected(Error),
}

/// A connection not yet stored, in DISCOVERED, with its identity settled.
fn new_connection(n: NewConnection, kinds: &Kinds, trigger: Trigger, reason: String) -> Connection {
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
        revision: 0,
        create_time: 0,
        update_time: 0,
        last_probe: None,
    }
}

/// Reported connections committed per writer job.
pub const DISCOVERY_GROUP: usize = 500;

/// Who reports discovered connections: the agent's own name for its source,
/// the authenticated principal that records the events, and what it may see.
#[derive(Clone, Debug)]
pub struct Reporter {
    pub source: String,
    pub actor: String,
    pub scope: Scope,
}

fn discover(
    tx: &mut Tx<'_>,
    kinds: &Kinds,
    n: NewConnection,
    reporter: &Reporter,
) -> Result<Discovered, Error> {
    let source = reporter.source.as_str();
    let actor = reporter.actor.as_str();
    // Without an identity or a url there is nothing to know it by when it is
    // reported again: taking it would make a duplicate every time.
    if n.identity.is_empty() && n.url.is_empty() {
        return Ok(Discovered::Rejected(Error::invalid(
            "identity",
            "a discovered connection needs an identity or a url",
        )));
    }
    let admitted = kinds
        .admit(&n.kind)
        .and_then(|()| kinds.check_metadata(&n.kind, "metadata", &n.metadata));
    if let Err(e) = admitted {
        return Ok(Discovered::Rejected(e));
    }
    if !n.credential_id.is_empty()
        && let Err(e) = usable_credential(
            tx.credential(&n.credential_id)?,
            &n.credential_id,
            &n.kind,
            &n.url,
            &reporter.scope,
        )
    {
        return Ok(Discovered::Rejected(e));
    }
    let mut conn = new_connection(n, kinds, Trigger::System, format!("discovered by {source}"));
    if let Some(existing) = tx.live_by_identity(&conn.identity)? {
        // Someone else's connection: left alone and not shown. Reporting it
        // must not make a duplicate, so the answer admits only that it exists.
        if !reporter.scope.sees(&existing.owner) {
            return Ok(Discovered::Hidden);
        }
        if existing.kind != conn.kind {
            return Ok(Discovered::Rejected(Error::invalid(
                "identity",
                format!(
                    "identity {:?} belongs to a {} connection, not {}",
                    existing.identity, existing.kind, conn.kind
                ),
            )));
        }
        return Ok(match lifecycle::on_report(existing.state) {
            Rereported::Suppressed => Discovered::SuppressedIgnored(existing),
            Rereported::Unchanged => Discovered::Unchanged(existing),
            Rereported::Rediscovered => {
                // Found again, perhaps somewhere else: verify it where it was
                // reported, not where it could not be found.
                // A connection with a credential keeps its url: a report
                // must never steer a secret to where the reporter chooses.
                // The move is flagged in its reason for an operator to judge.
                let mut found = existing;
                let from_state = found.state;
                let mut reason = format!("reported again by {source}");
                if !conn.url.is_empty() && conn.url != found.url {
                    if found.credential_id.is_empty() {
                        found.url = std::mem::take(&mut conn.url);
                        tx.record(
                            &mut found,
                            EventDraft {
                                type_: EventType::Updated,
                                from_state,
                                trigger: Trigger::System,
                                reason: format!("url reported by {source}"),
                                actor: actor.to_owned(),
                            },
                        )?;
                    } else {
                        reason = format!(
                            "reported again by {source} at another url ({}); it has a credential, so its url is kept: an operator must move it",
                            crate::connection::shorten(&conn.url, 200)
                        );
                    }
                }
                Discovered::Rediscovered(apply_transition(
                    tx,
                    kinds,
                    Move {
                        id: found.id,
                        target: lifecycle::INITIAL,
                        trigger: Trigger::System,
                        reason,
                        actor: actor.to_owned(),
                        etag: None,
                        verified: None,
                    },
                )?)
            }
        });
    }
    tx.record(
        &mut conn,
        EventDraft {
            type_: EventType::Created,
            from_state: lifecycle::INITIAL,
            trigger: Trigger::System,
            reason: format!("discovered by {source}"),
            actor: actor.to_owned(),
        },
    )?;
    Ok(Discovered::Created(conn))
}

/// The states a create may ask for, for a message: "A, B, C or D".
fn creatable_states() -> String {
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

/// One transition as the writer applies it.
struct Move {
    id: ConnectionId,
    target: State,
    trigger: Trigger,
    reason: String,
    actor: String,
    etag: Option<String>,
    /// Commit only if the connection is still what was verified.
    verified: Option<Verified>,
}

/// What a verification looked at. A change to any of it while the check ran
/// makes the result stale; other changes (labels, a name) do not.
#[derive(PartialEq)]
struct Verified {
    state: State,
    /// When it entered its state: a state left and entered again is a change.
    state_time: i64,
    url: String,
    credential_id: String,
}

impl Verified {
    fn of(c: &Connection) -> Verified {
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
fn apply_transition(tx: &mut Tx<'_>, kinds: &Kinds, m: Move) -> Result<Connection, Error> {
    let mut c = tx.get(&m.id)?.ok_or_else(|| Error::not_found(&m.id))?;
    check_etag(&c, m.etag.as_deref())?;
    // Already there (someone else moved it meanwhile): done, not a conflict.
    if c.state == m.target {
        return Ok(c);
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
    let type_ = if lifecycle::is_tombstone(m.target) {
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
        tx.scrub(&c.id)?;
        EventType::Deleted
    } else {
        EventType::Transitioned
    };
    tx.record(
        &mut c,
        EventDraft {
            type_,
            from_state,
            trigger: m.trigger,
            reason: m.reason,
            actor: m.actor,
        },
    )?;
    tracing::info!(id = %c.id, from = %from_state, to = %c.state, trigger = %m.trigger, revision = c.revision, "transition");
    Ok(c)
}

fn check_etag(c: &Connection, etag: Option<&str>) -> Result<(), Error> {
    match etag {
        Some(given) if !given.is_empty() && given != c.etag() => Err(Error::EtagMismatch {
            id: c.id.to_string(),
            given: given.to_owned(),
            current: c.etag(),
        }),
        _ => Ok(()),
    }
}

fn invalid_transition(id: &ConnectionId, refusal: RefusalInfo) -> Error {
    Error::InvalidTransition {
        id: id.to_string(),
        refusal,
    }
}

/// A connection may use credential `id` only if it exists, the caller may see
/// it, and it is for the connection's kind (its secret was checked against
/// that kind's schema). One outside the caller's scope is "no credential".
/// And the secret may go to `url` ([`custody`]): its error names `field`.
fn usable_credential(
    found: Option<crate::store::StoredCredential>,
    id: &str,
    kind: &str,
    url: &str,
    scope: &Scope,
) -> Result<(), Error> {
    usable_credential_for(found, id, kind, url, scope, "connection.credential_id")
}

fn usable_credential_for(
    found: Option<crate::store::StoredCredential>,
    id: &str,
    kind: &str,
    url: &str,
    scope: &Scope,
    field: &str,
) -> Result<(), Error> {
    match found.filter(|c| scope.sees(&c.owner)) {
        None => Err(Error::invalid(
            "connection.credential_id",
            format!("no credential {id:?}"),
        )),
        Some(c) if c.type_ != kind => Err(Error::invalid(
            "connection.credential_id",
            format!("credential {id:?} is for kind {}, not {kind}", c.type_),
        )),
        Some(c) => custody(&c.allowed_hosts, url).map_err(|why| Error::invalid(field, why)),
    }
}

/// The identity is taken. Its holder is named only to a caller who may see
/// it: identities are unique across owners, so that it exists cannot be hidden.
fn already_exists(existing: &Connection, scope: &Scope) -> Error {
    Error::AlreadyExists {
        identity: existing.identity.clone(),
        existing_id: if scope.sees(&existing.owner) {
            existing.id.to_string()
        } else {
            String::new()
        },
    }
}

/// `found` if `scope` sees it; otherwise not found, as if it did not exist.
fn visible(
    found: Option<Connection>,
    id: &ConnectionId,
    scope: &Scope,
) -> Result<Connection, Error> {
    found
        .filter(|c| scope.sees(&c.owner))
        .ok_or_else(|| Error::not_found(id))
}

/// A verification that could not run: the caller should retry, nothing moved.
fn not_checked(detail: String) -> Error {
    Error::Unavailable(format!("verification could not run; retry: {detail}"))
}

/// The error, what was found and the detail of a failed verification.
fn failed(c: &Connection, verdict: Verdict) -> (Error, Finding, String) {
    let id = c.id.to_string();
    match verdict {
        Verdict::CredentialsRejected(detail) => (
            Error::CredentialsRejected {
                id,
                detail: detail.clone(),
                state: c.state,
            },
            Finding::CredentialsRejected,
            format!("credentials rejected: {detail}"),
        ),
        Verdict::Unreachable(detail) | Verdict::Reachable(detail) | Verdict::NotChecked(detail) => {
            (
                Error::Unreachable {
                    id,
                    detail: detail.clone(),
                    state: c.state,
                },
                Finding::Unreachable,
                format!("unreachable: {detail}"),
            )
        }
    }
}

/// What a verdict found; `None`: the check could not run, nothing was learnt.
fn finding(v: &Verdict) -> Option<Finding> {
    match v {
        Verdict::Reachable(_) => Some(Finding::Reachable),
        Verdict::Unreachable(_) => Some(Finding::Unreachable),
        Verdict::CredentialsRejected(_) => Some(Finding::CredentialsRejected),
        Verdict::NotChecked(_) => None,
    }
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

fn decode_answer(key: &RequestKey, stored: Option<(i64, Answer)>) -> Result<Option<Answer>, Error> {
    match stored {
        None => Ok(None),
        Some((fingerprint, _)) if fingerprint != key.fingerprint => Err(Error::RequestIdReused {
            request_id: key.id.clone(),
        }),
        Some((_, answer)) => Ok(Some(answer)),
    }
}

fn replayed(tx: &Tx<'_>, key: &Option<RequestKey>) -> Result<Option<Answer>, Error> {
    match key {
        None => Ok(None),
        Some(k) => decode_answer(k, tx.answer(&k.stored)?),
    }
}

fn remember(
    tx: &Tx<'_>,
    key: &Option<RequestKey>,
    id: &ConnectionId,
    answer: &Answer,
) -> Result<(), Error> {
    if let Some(k) = key {
        tx.remember(&k.stored, k.fingerprint, id, answer)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_create_refusal_names_the_states_a_create_may_ask_for() {
        assert_eq!(
            creatable_states(),
            "DISCOVERED, REGISTERED, CONNECTED or IGNORED"
        );
    }
}
