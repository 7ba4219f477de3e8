//! How many watch streams each principal holds open, against a limit; a
//! slot frees when its stream is dropped.

use crate::error::Error;
use std::collections::HashMap;
use std::sync::Arc;

/// Open watch streams per principal, against a limit.
#[derive(Clone, Default)]
pub(crate) struct WatchSlots(Arc<std::sync::Mutex<HashMap<String, usize>>>);

/// One open watch; its slot frees when the stream is dropped.
pub(crate) struct WatchSlot {
    slots: WatchSlots,
    principal: String,
}

impl WatchSlots {
    /// Takes one of `principal`'s slots, if it holds fewer than `limit`.
    pub(crate) fn take(&self, principal: &str, limit: usize) -> Result<WatchSlot, Error> {
        let mut open = self.0.lock().expect("watch slots lock");
        let n = open.entry(principal.to_owned()).or_default();
        if *n >= limit {
            return Err(Error::ResourceExhausted(format!(
                "{principal} already holds {limit} watch streams, the most allowed; close one"
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            principal: principal.to_owned(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().expect("watch slots lock");
        if let Some(n) = open.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.principal);
            }
        }
    }
}
