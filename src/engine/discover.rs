//! Discovery reports: what an agent found, taken in groups, each reported
//! connection created, found again, or left as it is by
//! [`lifecycle::on_report`].

use super::create::new_connection;
use super::transition::{Move, apply_transition};
use super::{Discovered, Engine, NewConnection, Reporter, usable_credential};
use crate::connection::{Connection, EventType};
use crate::error::Error;
use crate::kinds::Kinds;
use crate::lifecycle::{self, Rereported, Trigger};
use crate::metrics::Outcome;
use crate::store::{EventDraft, Tx};

/// Reported connections committed per writer job: a report of this many is
/// one transaction of its own ([`Store::write_alone`]), and the writer is
/// never held longer than one group.
///
/// [`Store::write_alone`]: crate::store::Store::write_alone
pub(crate) const DISCOVERY_GROUP: usize = 500;

/// A reported item once what needs no database is checked: the connection
/// it would create, or why it is refused.
type Prepared = Result<Connection, Error>;

impl Engine {
    /// Takes what a discovery agent found. Identity is the key: nothing live
    /// with it (or only tombstones) makes a new DISCOVERED connection; a
    /// NOT_FOUND one comes back to DISCOVERED; anything else stays as it is,
    /// an IGNORED one above all. Items commit in groups of
    /// [`DISCOVERY_GROUP`], each group one writer job.
    ///
    /// What needs only the definitions (the item's shape, its kind, its
    /// metadata's schema, the connection it would create) is done off the
    /// writer, before the group is queued; the writer job does what needs
    /// the database: the credential, the identity lookup, the write.
    pub(crate) async fn report_discovered(
        &self,
        reporter: &Reporter,
        items: Vec<Result<NewConnection, Error>>,
    ) -> Result<Vec<Discovered>, Error> {
        let mut out = Vec::with_capacity(items.len());
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let group: Vec<_> = items.by_ref().take(DISCOVERY_GROUP).collect();
            let (kinds, source) = (self.kinds.clone(), reporter.source.clone());
            let group = tokio::task::spawn_blocking(move || {
                group
                    .into_iter()
                    .map(|item| prepare(&kinds, item, &source))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| Error::Internal(format!("checking a discovery report failed: {e}")))?;
            let reporter = reporter.clone();
            let kinds = self.kinds.clone();
            let done = self
                .store
                .write_alone(move |tx| {
                    group
                        .into_iter()
                        .map(|item| match item {
                            Ok(conn) => discover(tx, &kinds, conn, &reporter),
                            Err(e) => Ok(Discovered::Rejected(e)),
                        })
                        .collect::<Result<Vec<_>, Error>>()
                })
                .await?;
            // A connection found again moves NOT_FOUND -> DISCOVERED.
            let found_again = done
                .iter()
                .filter(|d| matches!(d, Discovered::Rediscovered(_)))
                .count();
            if found_again > 0 {
                self.metrics
                    .transitions_by(Trigger::System, Outcome::Accepted, found_again as u64);
            }
            out.extend(done);
        }
        Ok(out)
    }
}

/// The checks of one reported item that need no database, and the
/// connection it would create.
fn prepare(kinds: &Kinds, item: Result<NewConnection, Error>, source: &str) -> Prepared {
    let n = item?;
    // Without an identity or a url there is nothing to know it by when it is
    // reported again: taking it would make a duplicate every time.
    if n.identity.is_empty() && n.url.is_empty() {
        return Err(Error::invalid(
            "identity",
            "a discovered connection needs an identity or a url",
        ));
    }
    kinds.admit(&n.kind)?;
    kinds.check_metadata(&n.kind, "metadata", &n.metadata)?;
    Ok(new_connection(
        n,
        kinds,
        Trigger::System,
        format!("discovered by {source}"),
    ))
}

fn discover(
    tx: &mut Tx<'_>,
    kinds: &Kinds,
    mut conn: Connection,
    reporter: &Reporter,
) -> Result<Discovered, Error> {
    let source = reporter.source.as_str();
    let actor = reporter.actor.as_str();
    if !conn.credential_id.is_empty()
        && let Err(e) = usable_credential(
            tx.credential(&conn.credential_id)?,
            &conn.credential_id,
            &conn.kind,
            &conn.url,
            &reporter.scope,
        )
    {
        return Ok(Discovered::Rejected(e));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Scope;
    use crate::definitions::Registry;
    use crate::probe::{Verifier, VerifyFuture};
    use crate::store::Store;
    use std::sync::Arc;
    use std::time::Instant;

    struct NeverAsked;

    impl Verifier for NeverAsked {
        fn verify<'a>(&'a self, c: &'a Connection) -> VerifyFuture<'a> {
            panic!("verification of {} was not expected", c.id)
        }
    }

    /// Reports connections shaped like the benchmark's (kinds 1% grpc, 9%
    /// http, 90% tcp; labels env=bench and shard=s0..s15) in reports of
    /// 2,000, and prints the rate: first as new, then reported again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement: run by hand with --ignored --nocapture"]
    async fn discovery_rate() {
        let n: usize = std::env::var("TETHER_DISCOVERY_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let dir = tempfile::tempdir().unwrap();
        let config = crate::Config::default();
        let store = Store::open(&dir.path().join("t.db"), config.store_config()).unwrap();
        let engine = Engine::new(
            store,
            Arc::new(NeverAsked),
            Kinds::new(Arc::new(Registry::builtin()), false),
        );
        let reporter = Reporter {
            source: "bench".into(),
            actor: "bench".into(),
            scope: Scope::All,
        };
        let item = |i: usize| {
            let kind = match i % 100 {
                0 => "grpc",
                1..=9 => "http",
                _ => "tcp",
            };
            Ok(NewConnection {
                kind: kind.into(),
                name: format!("c{i}"),
                url: format!("{kind}://host-{i}.bench:443"),
                labels: [
                    ("env".to_string(), "bench".to_string()),
                    ("shard".to_string(), format!("s{}", i % 16)),
                ]
                .into(),
                ..Default::default()
            })
        };
        for pass in ["new", "again"] {
            let start = Instant::now();
            for batch in (0..n).step_by(2_000) {
                let items = (batch..(batch + 2_000).min(n)).map(item).collect();
                let done = engine.report_discovered(&reporter, items).await.unwrap();
                let expected = |d: &Discovered| match pass {
                    "new" => matches!(d, Discovered::Created(_)),
                    _ => matches!(d, Discovered::Unchanged(_)),
                };
                assert!(done.iter().all(expected), "{pass}");
            }
            let took = start.elapsed();
            println!(
                "{pass}: {n} in {took:?}, {:.0}/s",
                n as f64 / took.as_secs_f64()
            );
        }
    }
}
