//! Retry keys: a client's `request_id` turned into what the engine stores it
//! under, bound to a digest of the whole request.

use crate::access::Principal;
use crate::connection::{self, check_len, limits};
use crate::engine::RequestKey;
use crate::error::Error;
use prost::Message;

/// Turns a client's `request_id` into what it is stored under: an HMAC of
/// the principal and the id, so ids are scoped per caller and the table
/// holds no client-chosen text.
#[derive(Clone)]
pub(crate) struct RequestIds {
    key: [u8; 32],
}

impl RequestIds {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        RequestIds { key }
    }

    fn stored(&self, principal: &str, request_id: &str) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key)
            .expect("hmac takes any key length");
        mac.update(principal.as_bytes());
        mac.update(&[0]);
        mac.update(request_id.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The retry key of a request, bound to a digest of the whole request so
    /// a reused id with a different body is caught.
    pub(crate) fn key<M: Message>(
        &self,
        principal: &Principal,
        request_id: &str,
        message: &M,
        field: &str,
    ) -> Result<Option<RequestKey>, Error> {
        if request_id.is_empty() {
            return Ok(None);
        }
        check_len(field, request_id, limits::REQUEST_ID)?;
        Ok(Some(RequestKey {
            id: request_id.to_owned(),
            stored: self.stored(&principal.name, request_id),
            fingerprint: connection::digest(&message.encode_to_vec()) as i64,
        }))
    }
}
