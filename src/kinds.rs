//! What the engine asks of connection definitions: whether a kind may be
//! used, the defaults and metadata schema it brings, and the USER targets it
//! narrows the lifecycle table to.
//!
//! Pure policy over a loaded [`Registry`]; no I/O.

use crate::definitions::Registry;
use crate::error::Error;
use crate::lifecycle::{self, Edge, State, Trigger};
use std::sync::Arc;

/// The definitions in force, and whether kinds without one are accepted.
#[derive(Clone, Debug)]
pub(crate) struct Kinds {
    registry: Arc<Registry>,
    allow_unknown: bool,
}

impl Kinds {
    pub(crate) fn new(registry: Arc<Registry>, allow_unknown: bool) -> Self {
        Kinds {
            registry,
            allow_unknown,
        }
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Refuses a kind with no definition unless unknown kinds are allowed.
    pub(crate) fn admit(&self, kind: &str) -> Result<(), Error> {
        if self.allow_unknown || self.registry.get(kind).is_some() {
            return Ok(());
        }
        Err(Error::UnknownKind {
            kind: kind.to_owned(),
            known: self
                .registry
                .list(None, None)
                .iter()
                .map(|d| d.kind.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Checks `metadata` against the kind's schema; `field` prefixes the path.
    pub(crate) fn check_metadata(
        &self,
        kind: &str,
        field: &str,
        metadata: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), Error> {
        if self.registry.get(kind).is_none() {
            return Ok(());
        }
        self.registry
            .validate_metadata(kind, metadata)
            .map_err(|v| Error::invalid(format!("{field}{}", v.path), v.message))
    }

    /// Whether the kind's connections are managed when the client does not say.
    pub(crate) fn managed_by_default(&self, kind: &str) -> bool {
        self.registry.get(kind).is_none_or(|d| d.managed)
    }

    /// Type and sub-type the kind's definition gives, for clients that leave them empty.
    pub(crate) fn default_types(&self, kind: &str) -> (String, String) {
        self.registry
            .get(kind)
            .map(|d| (d.type_.clone(), d.sub_type.clone()))
            .unwrap_or_default()
    }

    /// Whether REGISTERED goes on to CONNECTED by itself for this kind.
    pub(crate) fn auto_connects(&self, kind: &str) -> bool {
        self.registry.get(kind).is_some_and(|d| d.auto_connect)
    }

    /// The lifecycle table, narrowed for USER requests to what the kind allows.
    pub(crate) fn check(
        &self,
        kind: &str,
        from: State,
        to: State,
        trigger: Trigger,
    ) -> Result<Edge, lifecycle::Refusal> {
        let edge = lifecycle::check(from, to, trigger)?;
        if trigger == Trigger::User {
            let allowed = self.registry.user_targets(kind, from);
            if !allowed.contains(&to) {
                return Err(lifecycle::Refusal {
                    from,
                    to,
                    trigger,
                    allowed,
                });
            }
        }
        Ok(edge)
    }
}
