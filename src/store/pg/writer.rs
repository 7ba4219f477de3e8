//! A replica's writer groups over PostgreSQL: the jobs the store queued
//! (`store::writer::Job`), committed in one transaction per group as the
//! SQLite writer commits them, each job in a savepoint of its own so that a
//! failed one rolls back alone.
//!
//! The group takes the revisions after the last committed by any replica
//! ([`order::begin_group`], a row lock held to COMMIT), so groups of all
//! replicas commit one at a time in revision order. Each job's reads and
//! rule checks therefore see every change committed before it, wherever it
//! was made: two replicas changing one connection behave as one writer does.
//! A group of volatile jobs only (a probe result that moves nothing) commits
//! without waiting for the disk (`synchronous_commit = off`).

use super::Statements;
use super::{Client, error, order};
use crate::connection::Revision;
use crate::connection::{Event, Micros};
use crate::error::Error;
use crate::store::writer::{
    EXPIRED_ANSWERS, Job, NEWEST_OLD, PRUNE_RANGE, Tx, WriterConfig, run_caught,
};
use std::cell::RefCell;

/// Commits `jobs` as one group on `client` (not in a transaction). `last_create`
/// is the latest create_time this replica has given; it comes back updated.
/// The events of the changes that committed come back in revision order.
pub(crate) fn commit_group(
    client: &RefCell<Client>,
    jobs: &mut [Box<dyn Job>],
    last_create: &mut Micros,
    config: &WriterConfig,
) -> Result<Vec<Event>, Error> {
    let durable = jobs.iter().any(|j| j.durable());
    // BEGIN and COMMIT are the writer's own statements, not the client's
    // transaction guard: a job's `Tx` reaches the client between them.
    let begun = (|| {
        let c = &mut *client.borrow_mut();
        c.batch_execute(if durable {
            "BEGIN"
        } else {
            "BEGIN; SET LOCAL synchronous_commit = off"
        })
        .map_err(error)?;
        let revision = order::begin_group(c)?;
        // Read once the group holds the revision row, so they include every
        // group committed before it. Another replica may have made
        // connections since this one last did, or moved the mark.
        let row = c.query_one(GROUP_START, &[]).map_err(error)?;
        let stored: Option<Micros> = row.get(0);
        let compact = Revision::new(row.get(1));
        let version: i64 = row.get(2);
        if version > super::schema::VERSION {
            return Err(super::schema::newer(version));
        }
        Ok::<_, Error>((revision, (stored.unwrap_or(0), compact)))
    })();
    let (revision, (stored, compact)) = match begun {
        Ok(b) => b,
        Err(e) => {
            rollback(client);
            return Err(e);
        }
    };
    let mut tx = Tx::on_pg(client, revision, durable, (*last_create).max(stored));
    // The savepoint of a job that succeeded is released with the next
    // job's start, in one round trip; COMMIT releases the last.
    let mut kept = false;
    for job in jobs.iter_mut() {
        let step = (|| -> Result<(), Error> {
            client
                .borrow_mut()
                .batch_execute(match kept {
                    true => "RELEASE SAVEPOINT job; SAVEPOINT job",
                    false => "SAVEPOINT job",
                })
                .map_err(error)?;
            let mark = tx.mark();
            kept = run_caught(job, &mut tx);
            if !kept {
                client
                    .borrow_mut()
                    .batch_execute("ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job")
                    .map_err(error)?;
                tx.back_to(mark);
            }
            Ok(())
        })();
        if let Err(e) = step {
            drop(tx);
            rollback(client);
            return Err(e);
        }
    }
    let (last, events, created) = tx.finish();
    let ended = (|| {
        let c = &mut *client.borrow_mut();
        if last != revision {
            keep_history(c, compact, last, &events, config)?;
            order::end_group(c, last)?;
        }
        // PostgreSQL answers COMMIT of a transaction a failed statement
        // aborted with a rollback, not an error: a statement first makes
        // that an error. Every statement's result is checked, so this is
        // the last guard, not the way failures are found.
        c.batch_execute("SELECT 1; COMMIT").map_err(error)
    })();
    if let Err(e) = ended {
        rollback(client);
        return Err(e);
    }
    *last_create = created;
    Ok(events)
}

/// Keeps at most the newest `retention_count` events (and each connection's
/// latest), as the SQLite writer does after each group: moves the
/// compaction mark, and drops what a connection changed in this group had
/// kept below it.
fn keep_history(
    c: &mut impl Statements,
    mut compact: Revision,
    revision: Revision,
    events: &[Event],
    config: &WriterConfig,
) -> Result<(), Error> {
    let keep = i64::try_from(config.retention_count).unwrap_or(i64::MAX);
    let floor = Revision::new(revision.get().saturating_sub(keep));
    if floor > compact {
        move_mark(c, compact, floor)?;
        compact = floor;
    }
    if compact > Revision::ZERO {
        let mut touched: Vec<uuid::Uuid> = events
            .iter()
            .map(|e| uuid::Uuid::from_bytes(*e.connection_id.as_bytes()))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        c.execute(DROP_SUPERSEDED_OF_ALL, &[&touched, &compact.get()])
            .map_err(error)?;
    }
    Ok(())
}

/// What a group reads once it holds the revision row: the create_time of
/// the connection made last (none when there is none), the compaction mark,
/// and the schema version (a newer replica may have migrated the database).
const GROUP_START: &str = "SELECT (SELECT create_time FROM connections ORDER BY seq DESC LIMIT 1), \
     (SELECT value FROM meta WHERE key = 'compact_revision'), \
     (SELECT version FROM schema_version)";

/// SQLite's `DROP_SUPERSEDED` for every connection in the array $1 at once.
const DROP_SUPERSEDED_OF_ALL: &str = "DELETE FROM events e WHERE e.connection_id = ANY($1) \
     AND e.revision <= $2 \
     AND e.revision < (SELECT max(revision) FROM events m WHERE m.connection_id = e.connection_id)";

fn compaction_mark(c: &mut impl Statements) -> Result<Revision, Error> {
    let row = c
        .query_one("SELECT value FROM meta WHERE key = 'compact_revision'", &[])
        .map_err(error)?;
    Ok(Revision::new(row.get(0)))
}

/// Prunes the events in `(above, through]` (but each connection's latest)
/// and moves the compaction mark to `through`.
fn move_mark(c: &mut impl Statements, above: Revision, through: Revision) -> Result<(), Error> {
    c.execute(
        &super::query::numbered(PRUNE_RANGE),
        &[&above.get(), &through.get()],
    )
    .map_err(error)?;
    c.execute(
        "UPDATE meta SET value = $1 WHERE key = 'compact_revision'",
        &[&through.get()],
    )
    .map_err(error)?;
    Ok(())
}

/// Drops the events and stored answers older than the retention window, and
/// answers past the most kept, as the SQLite writer's timed pruning does. It
/// holds the revision row, so replicas pruning at once take turns and the
/// compaction mark only moves up. The new mark, when it moved.
pub(crate) fn prune(
    client: &mut Client,
    config: &WriterConfig,
    now: Micros,
) -> Result<Option<Revision>, Error> {
    let cutoff = now - config.retention.as_micros() as i64;
    let mut tx = client.raw.transaction().map_err(error)?;
    order::begin_group(&mut tx)?;
    let compact = compaction_mark(&mut tx)?;
    let newest_old: Option<i64> = tx
        .query_one(
            &super::query::numbered(NEWEST_OLD),
            &[&compact.get(), &cutoff],
        )
        .map_err(error)?
        .get(0);
    let moved = newest_old.map(Revision::new).filter(|r| *r > compact);
    if let Some(r) = moved {
        move_mark(&mut tx, compact, r)?;
    }
    tx.execute(&super::query::numbered(EXPIRED_ANSWERS), &[&cutoff])
        .map_err(error)?;
    tx.execute(
        "DELETE FROM requests WHERE request_id IN (SELECT request_id FROM requests \
         ORDER BY time DESC, request_id DESC OFFSET $1)",
        &[&(config.max_answers as i64)],
    )
    .map_err(error)?;
    tx.commit().map_err(error)?;
    Ok(moved)
}

/// Ends a group that cannot commit. A connection that broke has nothing to
/// roll back; its error says so already.
fn rollback(client: &RefCell<Client>) {
    let _ = client.borrow_mut().batch_execute("ROLLBACK");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::{Connection, EventType, Revision};
    use crate::lifecycle::{State, Trigger};
    use crate::store::EventDraft;
    use crate::store::pg::cluster::Cluster;
    use crate::store::writer::TypedJob;
    use tokio::sync::oneshot;

    type Answer = oneshot::Receiver<Result<Connection, Error>>;

    /// A job as `Store::write` queues it, and where its answer arrives.
    fn job<F>(f: F) -> (Box<dyn Job>, Answer)
    where
        F: FnOnce(&mut Tx<'_>) -> Result<Connection, Error> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = TypedJob {
            f: Some(f),
            frees_space: false,
            durable: true,
            alone: false,
            result: None,
            reply,
        };
        (Box::new(job), answer)
    }

    fn draft(type_: EventType, from_state: State) -> EventDraft {
        EventDraft {
            type_,
            from_state,
            trigger: Trigger::User,
            reason: String::new(),
            actor: "test".into(),
        }
    }

    fn create(c: Connection) -> impl FnOnce(&mut Tx<'_>) -> Result<Connection, Error> {
        move |tx| {
            let mut c = c;
            tx.record(&mut c, draft(EventType::Created, State::Discovered))?;
            Ok(c)
        }
    }

    /// Commits `jobs` as one group, and answers them as the store does.
    fn commit(
        client: &RefCell<Client>,
        jobs: Vec<Box<dyn Job>>,
        last_create: &mut Micros,
    ) -> Vec<Event> {
        let mut jobs = jobs;
        let config = crate::Config::default().store_config().writer;
        let events = commit_group(client, &mut jobs, last_create, &config).unwrap();
        for job in jobs {
            job.finish(Ok(()));
        }
        events
    }

    fn database() -> String {
        let url = Cluster::shared().database();
        super::super::schema::migrate(&mut super::super::connect(&url).unwrap()).unwrap();
        url
    }

    #[test]
    fn a_group_commits_its_jobs_and_a_failed_one_rolls_back_alone() {
        let url = database();
        let client = RefCell::new(Client::connect(&url).unwrap());
        let mut last_create = 0;
        let a = Connection::for_test("a");
        let id = a.id.clone();
        let (first, made) = job(create(a));
        let (second, refused) = job(|tx| {
            create(Connection::for_test("b"))(tx)?;
            Err(Error::invalid("x", "refused after writing"))
        });
        let (third, renamed) = job(move |tx| {
            let mut c = tx.get(&id)?.expect("made by the first job");
            c.name = "renamed".into();
            let from = c.state;
            tx.record(&mut c, draft(EventType::Updated, from))?;
            Ok(c)
        });
        let events = commit(&client, vec![first, second, third], &mut last_create);

        let revisions: Vec<(i64, EventType)> =
            events.iter().map(|e| (e.revision.get(), e.type_)).collect();
        assert_eq!(
            revisions,
            [(1, EventType::Created), (2, EventType::Updated)]
        );
        let made = made.blocking_recv().unwrap().unwrap();
        assert!(refused.blocking_recv().unwrap().is_err());
        let renamed = renamed.blocking_recv().unwrap().unwrap();
        assert_eq!(
            (renamed.name.as_str(), renamed.revision.get()),
            ("renamed", 2)
        );
        // The rolled-back job's create_time is not given again.
        assert_eq!(last_create, made.create_time + 1);

        let mut c = client.borrow_mut();
        let names: Vec<String> = c
            .query("SELECT name FROM connections", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(names, ["renamed"], "the failed job's connection is gone");
        let revision: i64 = c
            .query_one("SELECT value FROM meta WHERE key = 'revision'", &[])
            .unwrap()
            .get(0);
        assert_eq!(revision, 2);
        let stored = super::super::query::get(&mut *c, &made.id)
            .unwrap()
            .unwrap();
        assert_eq!(stored, renamed);
    }

    /// Two replicas each add one to a connection's counter 40 times, at
    /// once: every job reads what the one before it committed, wherever it
    /// ran, so no increment is lost and the revisions run without a gap.
    #[test]
    fn two_replicas_changing_one_connection_lose_no_change() {
        const EACH: usize = 40;
        let url = database();
        let client = RefCell::new(Client::connect(&url).unwrap());
        let mut made = Connection::for_test("counter");
        made.labels.insert("n".into(), "0".into());
        let id = made.id.clone();
        let mut last_create = 0;
        let (first, _) = job(create(made));
        commit(&client, vec![first], &mut last_create);
        std::thread::scope(|s| {
            for _ in 0..2 {
                let (url, id) = (&url, &id);
                s.spawn(move || {
                    let client = RefCell::new(Client::connect(url).unwrap());
                    let mut last_create = 0;
                    for _ in 0..EACH {
                        let id = id.clone();
                        let (add, _) = job(move |tx| {
                            let mut c = tx.get(&id)?.expect("made");
                            let n: usize = c.labels["n"].parse().unwrap();
                            c.labels.insert("n".into(), (n + 1).to_string());
                            let from = c.state;
                            tx.record(&mut c, draft(EventType::Updated, from))?;
                            Ok(c)
                        });
                        commit(&client, vec![add], &mut last_create);
                    }
                });
            }
        });
        let mut c = client.borrow_mut();
        let counted = super::super::query::get(&mut *c, &id).unwrap().unwrap();
        assert_eq!(counted.labels["n"], (2 * EACH).to_string());
        assert_eq!(counted.revision.get(), 1 + 2 * EACH as i64);
        let events: i64 = c
            .query_one("SELECT count(*) FROM events", &[])
            .unwrap()
            .get(0);
        assert_eq!(events, 1 + 2 * EACH as i64);
    }

    /// Writers on two replicas make connections at once; a publisher on
    /// each replica reads the tail into its own hub, as watchers there
    /// receive it. Every hub gets every change once, in revision order,
    /// with the connection as that change left it.
    #[test]
    fn every_replica_publishes_every_change_once_in_order() {
        use crate::store::pg::order::{Tail, publish};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        const GROUPS: usize = 30;
        let url = database();
        let done = AtomicBool::new(false);
        let received = std::thread::scope(|s| {
            let publishers: Vec<_> = (0..2)
                .map(|_| {
                    let (hub, mut watcher) = tokio::sync::broadcast::channel(1024);
                    let mut tail = Tail::open(&url, Revision::ZERO).unwrap();
                    let done = &done;
                    s.spawn(move || {
                        loop {
                            let finished = done.load(Ordering::SeqCst);
                            let n = publish(&mut tail, &hub, Duration::from_millis(50)).unwrap();
                            if n == 0 && finished {
                                break;
                            }
                        }
                        let mut got = Vec::new();
                        while let Ok(event) = watcher.try_recv() {
                            got.push((event.revision.get(), event.connection.name.clone()));
                        }
                        got
                    })
                })
                .collect();
            let writers: Vec<_> = (0..2)
                .map(|w| {
                    let url = &url;
                    s.spawn(move || {
                        let client = RefCell::new(Client::connect(url).unwrap());
                        let mut last_create = 0;
                        for g in 0..GROUPS {
                            let jobs = (0..=g % 2)
                                .map(|j| {
                                    job(create(Connection::for_test(&format!("w{w}-g{g}-{j}")))).0
                                })
                                .collect();
                            commit(&client, jobs, &mut last_create);
                        }
                    })
                })
                .collect();
            let ended: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
            done.store(true, Ordering::SeqCst);
            for e in ended {
                e.unwrap_or_else(|p| std::panic::resume_unwind(p));
            }
            publishers
                .into_iter()
                .map(|p| p.join().unwrap())
                .collect::<Vec<_>>()
        });
        let mut c = super::super::connect(&url).unwrap();
        let stored: Vec<(i64, String)> = c
            .query(
                "SELECT e.revision, c.name FROM events e JOIN connections c ON c.id = e.connection_id \
                 ORDER BY e.revision",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(stored.len(), 2 * (GROUPS + GROUPS / 2));
        let revisions: Vec<i64> = stored.iter().map(|(r, _)| *r).collect();
        assert_eq!(revisions, (1..=stored.len() as i64).collect::<Vec<_>>());
        for got in received {
            assert_eq!(got, stored);
        }
    }

    /// The store's `Read` on PostgreSQL answers from the rows the writer
    /// committed: rows, pages, counts and events, as on SQLite.
    #[test]
    fn reads_through_the_stores_read_see_what_was_committed() {
        use crate::store::{Filter, ListQuery, Order};
        let url = database();
        let client = RefCell::new(Client::connect(&url).unwrap());
        let mut last_create = 0;
        let jobs = (0..3)
            .map(|i| job(create(Connection::for_test(&format!("c{i}")))).0)
            .collect();
        commit(&client, jobs, &mut last_create);
        let (names, counted, events, revision) = super::super::read(&client, |r| {
            let page = r.list(&ListQuery {
                filter: Filter::default(),
                order: Order::default(),
                page_size: 10,
                after: None,
            })?;
            let names: Vec<String> = page.connections.iter().map(|c| c.name.clone()).collect();
            let (counts, _) = r.count(&Filter::default())?;
            let counted: i64 = counts.iter().map(|(_, n)| n).sum();
            let events = r.events(&crate::store::EventFilter {
                connection_id: None,
                after_revision: Revision::ZERO,
                limit: 10,
                owners: None,
                max_bytes: usize::MAX,
            })?;
            let got = r.get(&page.connections[1].id)?.expect("listed");
            assert_eq!(got, page.connections[1]);
            Ok((names, counted, events.len(), r.revisions()?.0))
        })
        .unwrap();
        assert_eq!(names, ["c0", "c1", "c2"]);
        assert_eq!((counted, events, revision.get()), (3, 3, 3));
        // A failed read leaves the connection usable.
        let failed: Result<(), Error> =
            super::super::read(&client, |_| Err(Error::invalid("x", "no")));
        assert!(failed.is_err());
        let again = super::super::read(&client, |r| r.revisions()).unwrap();
        assert_eq!(again.0.get(), 3);
    }
}
