//! The definition file format: what one YAML or JSON file may say, parsed into
//! raw definitions in which every field but `kind` may be absent, so that
//! `extends` can tell "not given" (inherit) from "given" (override).
//!
//! Names, states and intervals are parsed here, where the parser still knows
//! the line. Resolving `extends`, checking transitions against the lifecycle and
//! compiling schemas is the registry's work, not this module's.

use crate::lifecycle::State;
use crate::probe::Check;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// `{ model: NAME, connections: [ DEF, ... ] }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(crate) model: Name,
    pub(crate) connections: Vec<RawDef>,
}

/// One definition as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDef {
    pub(crate) kind: Name,
    #[serde(rename = "type")]
    pub(crate) type_: Option<String>,
    pub(crate) sub_type: Option<String>,
    pub(crate) display_name: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) managed: Option<bool>,
    pub(crate) auto_connect: Option<bool>,
    pub(crate) check: Option<Check>,
    pub(crate) probe_interval: Option<Interval>,
    pub(crate) metadata_schema: Option<Map<String, Value>>,
    pub(crate) credential_schema: Option<Map<String, Value>>,
    pub(crate) transitions: Option<BTreeMap<StateName, Vec<StateName>>>,
    pub(crate) extends: Option<Name>,
}

/// A model or kind name: `[a-z][a-z0-9_-]*`, at most 63 characters.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) struct Name(pub String);

impl TryFrom<String> for Name {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let mut chars = s.chars();
        let valid = s.len() <= 63
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'));
        if valid {
            Ok(Name(s))
        } else {
            Err(format!(
                "invalid name {s:?}: lowercase letters, digits, '_' and '-', \
                 starting with a letter, at most 63 characters"
            ))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A lifecycle state by its wire name (`DISCOVERED`, `NOT_FOUND`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub(super) struct StateName(pub State);

impl TryFrom<String> for StateName {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        State::ALL
            .into_iter()
            .find(|state| state.name() == s)
            .map(StateName)
            .ok_or_else(|| {
                let names: Vec<_> = State::ALL.iter().map(|s| s.name()).collect();
                format!("unknown state {s:?}, expected one of {}", names.join(", "))
            })
    }
}

/// A positive humantime duration such as `30s` or `2m`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "String")]
pub(super) struct Interval(pub Duration);

impl TryFrom<String> for Interval {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match humantime::parse_duration(&s) {
            // Faster than this is a busy loop against the peer, not monitoring.
            Ok(d) if d < std::time::Duration::from_millis(100) => {
                Err("probe_interval must be at least 100ms".into())
            }
            Ok(d) => Ok(Interval(d)),
            Err(e) => Err(format!("invalid probe_interval {s:?}: {e}")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    Yaml,
    Json,
}

impl Format {
    /// The format a file's extension names, if it is a definition file at all.
    pub(crate) fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// Parses a whole file; an error carries its 1-based line and what is wrong.
pub(super) fn parse(text: &str, format: Format) -> Result<RawFile, (usize, String)> {
    match format {
        Format::Yaml => serde_norway::from_str(text).map_err(|e| {
            let at = e.location().map(|l| (l.line(), l.column()));
            located(e.to_string(), at)
        }),
        Format::Json => serde_json::from_str(text)
            .map_err(|e| located(e.to_string(), Some((e.line(), e.column())))),
    }
}

/// Moves the parser's trailing " at line L column C" into the line number.
fn located(mut message: String, at: Option<(usize, usize)>) -> (usize, String) {
    let Some((line, column)) = at else {
        return (1, message);
    };
    if let Some(len) = message
        .strip_suffix(&format!(" at line {line} column {column}"))
        .map(str::len)
    {
        message.truncate(len);
    }
    (line.max(1), message)
}

/// The 1-based line of the `nth` (from 0) definition of `kind` in `text`: where
/// `kind: NAME` (YAML) or `"kind": "NAME"` (JSON) is written. Parsers keep no
/// positions once a value is built, so semantic errors find their line here.
pub(super) fn kind_line(text: &str, kind: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .flat_map(|(i, line)| std::iter::repeat_n(i + 1, kind_keys(line, kind)))
        .nth(nth)
        .unwrap_or(1)
}

/// How many `kind` keys with value `kind` one line holds.
fn kind_keys(line: &str, kind: &str) -> usize {
    let quote = |c: char| c == '"' || c == '\'';
    line.match_indices("kind")
        .filter(|&(at, key)| {
            let before = line[..at].trim_end_matches(quote);
            let key_starts = before
                .chars()
                .next_back()
                .is_none_or(|c| c.is_whitespace() || matches!(c, '{' | ',' | '-'));
            let value = line[at + key.len()..]
                .trim_start_matches(quote)
                .trim_start()
                .strip_prefix(':')
                .map(|rest| rest.trim_start().trim_start_matches(quote))
                .and_then(|rest| rest.strip_prefix(kind));
            key_starts
                && value.is_some_and(|rest| {
                    rest.chars().next().is_none_or(|c| {
                        quote(c) || c.is_whitespace() || matches!(c, ',' | '}' | '#')
                    })
                })
        })
        .count()
}
