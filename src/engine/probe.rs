//! Background probe results: kept on the connection, and the SYSTEM moves
//! [`lifecycle::after_probe`] calls for, unless a newer change overtook the
//! probe.

use super::transition::{Move, Verified, apply_move};
use super::{Engine, SYSTEM_ACTOR};
use crate::connection::Revision;
use crate::connection::{Connection, ProbeOutcome, ProbeResult};
use crate::error::Error;
use crate::lifecycle::{self, Finding, Probed, State, Trigger};
use crate::probe::{self, Verdict};
use crate::store::EventFilter;

impl Engine {
    /// Applies what a background probe of `probed` saw: keeps the result on
    /// the connection (no event), and moves it along the SYSTEM edges the
    /// result calls for (one event per step). Nothing happens if the
    /// connection changed in what was checked since the probe started, or is
    /// no longer monitored: a user request always wins over an older probe.
    /// The connection as it is afterwards, or `None` when the result was dropped.
    /// (The monitor applies results in batches, [`Engine::apply_probes`].)
    #[cfg(test)]
    pub(crate) async fn apply_probe(
        &self,
        probed: &Connection,
        result: Option<probe::Observation>,
        failure_threshold: u32,
    ) -> Result<Option<Connection>, Error> {
        self.apply_probes(vec![(probed.clone(), result)], failure_threshold)
            .await
            .pop()
            .expect("one answer per result")
    }

    /// Applies what background probes saw, as `apply_probe` does
    /// for one, with one answer each, in order. The results that move nothing (most of them) are kept in one
    /// write job rather than one each, so a monitor that probes thousands of
    /// connections pays for one transaction per batch, not per probe.
    pub(crate) async fn apply_probes(
        &self,
        results: Vec<(Connection, Option<probe::Observation>)>,
        failure_threshold: u32,
    ) -> Vec<Result<Option<Connection>, Error>> {
        let mut items = Vec::with_capacity(results.len());
        let mut answers: Vec<Option<Result<Option<Connection>, Error>>> =
            (0..results.len()).map(|_| None).collect();
        for (i, (probed, result)) in results.into_iter().enumerate() {
            // A kind with no check passes verification (the lifecycle's rule).
            let (verdict, latency) = match result {
                Some(r) => (r.verdict, r.latency),
                None => (
                    Verdict::Reachable("no check is defined for this connection".into()),
                    std::time::Duration::ZERO,
                ),
            };
            // Read outside the writer; the snapshot check makes sure it is
            // still the same disconnection when the result commits.
            // Needed only when a disconnected connection passes its check.
            let disconnected_from = match finding(&verdict) {
                Some(f) if lifecycle::needs_disconnected_from(probed.state, f) => {
                    match self.disconnected_from(&probed).await {
                        Ok(from) => from,
                        Err(e) => {
                            answers[i] = Some(Err(e));
                            continue;
                        }
                    }
                }
                _ => None,
            };
            items.push((
                i,
                ProbeItem {
                    probed,
                    verdict,
                    latency,
                    disconnected_from,
                },
            ));
        }
        // Most results move nothing: they are kept without waiting for the
        // disk, all in one job. One that must move the connection comes back
        // and is applied again, alone, in a synced group (a move is an event
        // watchers see).
        let kinds = self.kinds.clone();
        let batch: Vec<ProbeItem> = items.iter().map(|(_, item)| item.clone()).collect();
        let kept = self
            .store
            .write_volatile(move |tx| {
                batch
                    .iter()
                    .map(|item| write_probe(tx, &kinds, item, failure_threshold))
                    .collect::<Result<Vec<_>, Error>>()
            })
            .await;
        match kept {
            Ok(applied) => {
                for ((i, item), applied) in items.into_iter().zip(applied) {
                    let answer = match applied {
                        Applied::NeedsSync => self.apply_synced(&item, failure_threshold).await,
                        other => Ok(other.answer(&self.metrics)),
                    };
                    answers[i] = Some(answer);
                }
            }
            Err(e) => {
                for (i, _) in items {
                    answers[i] = Some(Err(e.clone()));
                }
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("every result answered"))
            .collect()
    }

    /// Applies one result that moves its connection, in a synced group.
    async fn apply_synced(
        &self,
        item: &ProbeItem,
        failure_threshold: u32,
    ) -> Result<Option<Connection>, Error> {
        let kinds = self.kinds.clone();
        let job_item = item.clone();
        let applied = self
            .store
            .write(move |tx| write_probe(tx, &kinds, &job_item, failure_threshold))
            .await?;
        match applied {
            Applied::NeedsSync => Err(Error::Internal(
                "a synced probe group was not synced".into(),
            )),
            other => Ok(other.answer(&self.metrics)),
        }
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
                let mut after = Revision::ZERO;
                loop {
                    let page = conn.events(&EventFilter {
                        connection_id: Some(id.clone()),
                        after_revision: after,
                        limit: 1000,
                        owners: None,
                        max_bytes: usize::MAX,
                    })?;
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
}

/// One probe result on its way to the writer.
#[derive(Clone)]
struct ProbeItem {
    probed: Connection,
    verdict: Verdict,
    latency: std::time::Duration,
    disconnected_from: Option<State>,
}

/// One attempt at applying a probe result, in a synced group or not: keeps
/// it on the row and makes the moves it calls for, unless the connection
/// changed in what was checked or is no longer monitored.
fn write_probe(
    tx: &mut crate::store::Tx<'_>,
    kinds: &crate::kinds::Kinds,
    item: &ProbeItem,
    failure_threshold: u32,
) -> Result<Applied, Error> {
    let id = &item.probed.id;
    let Some(row) = tx.get(id)? else {
        return Ok(Applied::Kept(None));
    };
    if Verified::of(&row) != Verified::of(&item.probed)
        || !lifecycle::monitored(row.managed, row.state, row.state_trigger)
    {
        return Ok(Applied::Kept(None));
    }
    let verdict = &item.verdict;
    let outcome = match verdict {
        Verdict::Reachable(_) => ProbeOutcome::Reachable,
        Verdict::Unreachable(_) => ProbeOutcome::Unreachable,
        Verdict::CredentialsRejected(_) => ProbeOutcome::CredentialsRejected,
        // Nothing was learnt about the peer: record nothing, try again later.
        Verdict::NotChecked(_) => return Ok(Applied::Kept(Some(Box::new(row)))),
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
    let steps = lifecycle::after_probe(Probed {
        state: row.state,
        finding: match outcome {
            ProbeOutcome::Reachable => Finding::Reachable,
            ProbeOutcome::Unreachable => Finding::Unreachable,
            ProbeOutcome::CredentialsRejected => Finding::CredentialsRejected,
        },
        threshold_reached: failures >= failure_threshold as i32,
        auto_connects: kinds.auto_connects(&row.kind),
        disconnected_from: item.disconnected_from,
    });
    if !steps.is_empty() && !tx.durable() {
        return Ok(Applied::NeedsSync);
    }
    let probe = ProbeResult {
        time: tx.now(),
        outcome,
        latency_ms: item.latency.as_millis() as i64,
        message: detail.clone(),
        consecutive_failures: failures,
    };
    tx.set_probe(id, &probe)?;
    let reason = match outcome {
        ProbeOutcome::Reachable => detail,
        _ if lifecycle::counts_failures(row.state) => {
            format!("{failures} failed probes in a row; last: {detail}")
        }
        ProbeOutcome::Unreachable => format!("unreachable: {detail}"),
        ProbeOutcome::CredentialsRejected => format!("credentials rejected: {detail}"),
    };
    if steps.is_empty() {
        let mut row = row;
        row.last_probe = Some(probe);
        return Ok(Applied::Kept(Some(Box::new(row))));
    }
    let mut moves = Vec::new();
    for &target in steps {
        let (c, from) = apply_move(
            tx,
            kinds,
            Move {
                id: id.clone(),
                target,
                trigger: Trigger::System,
                reason: reason.clone(),
                actor: SYSTEM_ACTOR.into(),
                etag: None,
                verified: None,
            },
            None,
        )?;
        moves.push((c, from));
    }
    Ok(Applied::Moved(moves))
}

/// What one attempt to apply a probe result did.
enum Applied {
    /// Kept the result (or dropped it: `None`); nothing moved.
    Kept(Option<Box<Connection>>),
    /// Moved the connection: each step, the connection after it and the
    /// state it left.
    Moved(Vec<(Connection, State)>),
    /// It must move the connection, which only a synced group may do.
    NeedsSync,
}

impl Applied {
    /// The connection as the result left it (logging each move), or `None`
    /// when the result was dropped. Not for [`Applied::NeedsSync`].
    fn answer(self, metrics: &crate::metrics::Metrics) -> Option<Connection> {
        match self {
            Applied::Kept(c) => c.map(|c| *c),
            Applied::Moved(moves) => {
                for (c, from) in &moves {
                    super::transition::log_move(
                        metrics,
                        c,
                        *from,
                        Trigger::System,
                        SYSTEM_ACTOR,
                        "probe",
                    );
                }
                moves.into_iter().last().map(|(c, _)| c)
            }
            Applied::NeedsSync => None,
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
