//! Retried requests (AIP-155 `request_id`): the first answer is stored with
//! the change it made, in the same transaction, and a retry gets it back
//! instead of running again; the same id with another request is refused.
//! [`once`] is the one wrapper every idempotent write runs in.

use super::{Engine, RequestKey};
use crate::connection::{Connection, ConnectionId};
use crate::error::Error;
use crate::store::Tx;

/// The answer a request gets, stored for `request_id` retries. A failed
/// verification that moved the connection is an answer worth replaying too.
pub(super) type Answer = Result<Connection, Error>;

/// Runs `op` in the writer as the request `key` names: a retry gets the
/// stored answer and `op` does not run; otherwise `op`'s answer (for the
/// connection it names) is stored with its change. An `Err` from `op`
/// itself aborts the transaction and is not stored.
pub(super) fn once(
    tx: &mut Tx<'_>,
    key: &Option<RequestKey>,
    op: impl FnOnce(&mut Tx<'_>) -> Result<(ConnectionId, Answer), Error>,
) -> Result<Answer, Error> {
    once_if_changed(tx, key, |tx| op(tx).map(|(id, answer)| (id, answer, true)))
}

/// [`once`] for an operation that may change nothing (the `bool` says
/// whether it did): such an answer is not stored, so a stream of no-ops with
/// fresh request ids cannot fill the disk. Its retry finds the connection as
/// it is then, which is what the request asked for.
pub(super) fn once_if_changed(
    tx: &mut Tx<'_>,
    key: &Option<RequestKey>,
    op: impl FnOnce(&mut Tx<'_>) -> Result<(ConnectionId, Answer, bool), Error>,
) -> Result<Answer, Error> {
    if let Some(answer) = replayed(tx, key)? {
        return Ok(answer);
    }
    let (id, answer, changed) = op(tx)?;
    if changed {
        remember(tx, key, &id, &answer)?;
    }
    Ok(answer)
}

impl Engine {
    /// The stored answer to a retried request, read outside the writer so a
    /// retry costs no verification.
    pub(super) async fn replay(&self, key: &Option<RequestKey>) -> Result<Option<Answer>, Error> {
        let Some(k) = key.clone() else {
            return Ok(None);
        };
        self.store
            .read(move |c| decode_answer(&k, c.answer(&k.stored)?))
            .await
    }
}

pub(super) fn decode_answer(
    key: &RequestKey,
    stored: Option<(i64, Answer)>,
) -> Result<Option<Answer>, Error> {
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
