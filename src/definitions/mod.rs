//! Connection definitions: what each kind of connection is (type, names, the
//! check that proves it reachable, the JSON Schemas of its metadata and of its
//! credential, the USER transitions it allows), built in or loaded from model
//! folders, and the [`Registry`] that answers for them.
//!
//! Owns loading, `extends` resolution and schema validation. Does not probe,
//! store, or speak proto: `probe` runs the [`Check`], `service` converts.
//!
//! Load order decides everything that order can decide: the built-in models
//! first, then each directory given, its files (recursively) in sorted path
//! order, each file's definitions in the order written. A definition may only
//! extend one loaded before it.

mod file;
#[cfg(test)]
mod tests;

use crate::lifecycle::{self, State, Trigger};
use crate::probe::Check;
use file::{Format, RawDef};
use jsonschema::Validator;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use std::{fmt, fs};

/// What one kind of connection is.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Definition {
    /// The model (folder of definitions) it belongs to.
    pub(crate) model: String,
    pub(crate) kind: String,
    pub(crate) type_: String,
    pub(crate) sub_type: String,
    /// The kind itself unless the file says otherwise.
    pub(crate) display_name: String,
    pub(crate) description: String,
    /// Whether new connections of this kind are managed by default.
    pub(crate) managed: bool,
    /// REGISTERED moves on to CONNECTED by itself (SYSTEM) when reachable.
    pub(crate) auto_connect: bool,
    pub(crate) check: Check,
    /// None: the server's default interval.
    pub(crate) probe_interval: Option<Duration>,
    /// JSON Schema of a connection's metadata (None: anything goes).
    pub(crate) metadata_schema: Option<Value>,
    /// JSON Schema of a credential's secret (None: anything goes).
    pub(crate) credential_schema: Option<Value>,
    /// The USER targets allowed from each listed state: a subset of the lifecycle's.
    pub(crate) transitions: Option<BTreeMap<State, Vec<State>>>,
    /// The kind this definition overrides (the same kind when it replaces it in place).
    pub(crate) extends: Option<String>,
    /// The file it came from, or `builtin:MODEL`.
    pub(crate) source: String,
}

/// A definition file that cannot be used: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}{}: {message}", line_suffix(.line))]
pub(crate) struct LoadError {
    pub(crate) path: String,
    /// 1-based; None when the file or directory could not be read at all.
    pub(crate) line: Option<usize>,
    pub(crate) message: String,
}

fn line_suffix(line: &Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

/// A metadata or secret value its kind's schema refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) struct SchemaViolation {
    /// JSON pointer of the offending value, e.g. `/scrape_interval`; "" for the whole object.
    pub(crate) path: String,
    pub(crate) message: String,
}

impl fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every known definition, by kind, with its schemas compiled once.
/// Cheap to clone (validators are shared); `Send + Sync`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Registry {
    kinds: BTreeMap<String, Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    def: Definition,
    metadata: Option<Arc<Validator>>,
    credential: Option<Arc<Validator>>,
}

/// The built-in models: (model, file text).
const BUILTIN: [(&str, &str); 5] = [
    ("generic", include_str!("../../models/generic.yaml")),
    ("grafana", include_str!("../../models/grafana.yaml")),
    ("kubernetes", include_str!("../../models/kubernetes.yaml")),
    ("meshery", include_str!("../../models/meshery.yaml")),
    ("prometheus", include_str!("../../models/prometheus.yaml")),
];

impl Registry {
    /// The models embedded in the binary, and nothing else.
    pub(crate) fn builtin() -> Registry {
        static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
            let mut registry = Registry::default();
            for (model, text) in BUILTIN {
                registry
                    .add_file(&format!("builtin:{model}"), text, Format::Yaml)
                    .unwrap_or_else(|e| panic!("built-in model is invalid: {e}"));
            }
            registry
        });
        REGISTRY.clone()
    }

    /// The built-in models plus every `.yaml`, `.yml` and `.json` file under each
    /// of `dirs` (recursively; names starting with `.` are skipped).
    pub(crate) fn load(dirs: &[PathBuf]) -> Result<Registry, LoadError> {
        let mut registry = Registry::builtin();
        for dir in dirs {
            let mut files = Vec::new();
            collect(dir, &mut files)?;
            files.sort_by(|a, b| a.0.cmp(&b.0));
            for (path, format) in files {
                let source = path.display().to_string();
                let text = fs::read_to_string(&path).map_err(|e| LoadError {
                    path: source.clone(),
                    line: None,
                    message: e.to_string(),
                })?;
                registry.add_file(&source, &text, format)?;
            }
        }
        Ok(registry)
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Definition> {
        self.kinds.get(kind).map(|e| &e.def)
    }

    /// The definitions matching both filters (None: any), sorted by (model, kind).
    pub(crate) fn list(&self, model: Option<&str>, kind: Option<&str>) -> Vec<&Definition> {
        let mut defs: Vec<&Definition> = self
            .kinds
            .values()
            .map(|e| &e.def)
            .filter(|d| model.is_none_or(|m| d.model == m) && kind.is_none_or(|k| d.kind == k))
            .collect();
        defs.sort_by(|a, b| (&a.model, &a.kind).cmp(&(&b.model, &b.kind)));
        defs
    }

    /// Checks a connection's metadata against its kind's schema. A kind without
    /// a schema, or unknown here, accepts anything: whether unknown kinds are
    /// allowed at all is the caller's policy.
    pub(crate) fn validate_metadata(
        &self,
        kind: &str,
        metadata: &Map<String, Value>,
    ) -> Result<(), SchemaViolation> {
        let validator = self.kinds.get(kind).and_then(|e| e.metadata.as_deref());
        validate(validator, metadata, false)
    }

    /// Checks a credential's secret against its kind's schema, as
    /// [`validate_metadata`](Self::validate_metadata) does, except that the
    /// message never quotes a value of the secret.
    pub(crate) fn validate_secret(
        &self,
        kind: &str,
        secret: &Map<String, Value>,
    ) -> Result<(), SchemaViolation> {
        let validator = self.kinds.get(kind).and_then(|e| e.credential.as_deref());
        validate(validator, secret, true)
    }

    /// The states a USER may move a connection of `kind` to from `from`: the
    /// lifecycle's list, narrowed by the kind's `transitions` when it lists `from`.
    pub(crate) fn user_targets(&self, kind: &str, from: State) -> Vec<State> {
        let narrowed = self
            .get(kind)
            .and_then(|d| d.transitions.as_ref())
            .and_then(|t| t.get(&from));
        lifecycle::targets(from, Trigger::User)
            .iter()
            .map(|e| e.to)
            .filter(|to| narrowed.is_none_or(|n| n.contains(to)))
            .collect()
    }

    /// Adds every definition of one file. On error the registry is half-changed;
    /// callers drop it.
    fn add_file(&mut self, source: &str, text: &str, format: Format) -> Result<(), LoadError> {
        let error = |line, message| LoadError {
            path: source.to_owned(),
            line: Some(line),
            message,
        };
        let file = file::parse(text, format).map_err(|(line, message)| error(line, message))?;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for raw in file.connections {
            let kind = raw.kind.0.clone();
            let nth = seen.entry(kind.clone()).or_default();
            let entry = self
                .resolve(&file.model.0, raw, source)
                .map_err(|message| {
                    error(
                        file::kind_line(text, &kind, *nth),
                        format!("kind {kind}: {message}"),
                    )
                })?;
            *nth += 1;
            self.kinds.insert(kind, entry);
        }
        Ok(())
    }

    /// Builds one definition: checks it against the lifecycle and what is
    /// already loaded, inherits from what it extends, compiles its schemas.
    fn resolve(&self, model: &str, raw: RawDef, source: &str) -> Result<Entry, String> {
        let kind = raw.kind.0;
        let parent = match &raw.extends {
            Some(base) => {
                let parent = self.kinds.get(&base.0).ok_or_else(|| {
                    format!(
                        "extends unknown kind {base} (only kinds loaded before it can be extended)"
                    )
                })?;
                if parent.def.model != model {
                    return Err(format!(
                        "extends {base} of model {}, not of model {model}",
                        parent.def.model
                    ));
                }
                Some(parent)
            }
            None => None,
        };
        if let Some(existing) = self.kinds.get(&kind)
            && raw.extends.as_ref().is_none_or(|base| base.0 != kind)
        {
            return Err(format!(
                "already defined by {} (to override it, extend it: `extends: {kind}`)",
                existing.def.source
            ));
        }
        let transitions = raw.transitions.map(narrowing).transpose()?;
        let metadata = compile(raw.metadata_schema, "metadata_schema")?;
        let credential = compile(raw.credential_schema, "credential_schema")?;

        let base = match parent {
            Some(p) => p.clone(),
            None => Entry {
                def: Definition {
                    model: model.to_owned(),
                    kind: kind.clone(),
                    type_: String::new(),
                    sub_type: String::new(),
                    display_name: kind.clone(),
                    description: String::new(),
                    managed: true,
                    auto_connect: false,
                    check: Check::default(),
                    probe_interval: None,
                    metadata_schema: None,
                    credential_schema: None,
                    transitions: None,
                    extends: None,
                    source: String::new(),
                },
                metadata: None,
                credential: None,
            },
        };
        let (metadata_schema, metadata) = metadata
            .map_or((base.def.metadata_schema, base.metadata), |(s, v)| {
                (Some(s), Some(v))
            });
        let (credential_schema, credential) = credential
            .map_or((base.def.credential_schema, base.credential), |(s, v)| {
                (Some(s), Some(v))
            });
        let def = Definition {
            model: model.to_owned(),
            kind,
            type_: raw.type_.unwrap_or(base.def.type_),
            sub_type: raw.sub_type.unwrap_or(base.def.sub_type),
            display_name: raw.display_name.unwrap_or(base.def.display_name),
            description: raw.description.unwrap_or(base.def.description),
            managed: raw.managed.unwrap_or(base.def.managed),
            auto_connect: raw.auto_connect.unwrap_or(base.def.auto_connect),
            check: raw.check.unwrap_or(base.def.check),
            probe_interval: raw.probe_interval.map(|i| i.0).or(base.def.probe_interval),
            metadata_schema,
            credential_schema,
            transitions: transitions.or(base.def.transitions),
            extends: raw.extends.map(|n| n.0),
            source: source.to_owned(),
        };
        Ok(Entry {
            def,
            metadata,
            credential,
        })
    }
}

/// A kind's `transitions`, refused if it allows any USER move the lifecycle does not.
fn narrowing(
    raw: BTreeMap<file::StateName, Vec<file::StateName>>,
) -> Result<BTreeMap<State, Vec<State>>, String> {
    raw.into_iter()
        .map(|(from, to)| {
            let allowed: Vec<State> = lifecycle::targets(from.0, Trigger::User)
                .iter()
                .map(|e| e.to)
                .collect();
            let to: Vec<State> = to.into_iter().map(|s| s.0).collect();
            match to.iter().find(|s| !allowed.contains(s)) {
                None => Ok((from.0, to)),
                Some(bad) => {
                    let allowed: Vec<&str> = allowed.iter().map(|s| s.name()).collect();
                    Err(format!(
                        "transitions: {} -> {bad} is not a USER transition of the lifecycle \
                         (allowed from {}: {})",
                        from.0,
                        from.0,
                        if allowed.is_empty() {
                            "none".into()
                        } else {
                            allowed.join(", ")
                        }
                    ))
                }
            }
        })
        .collect()
}

/// Compiles a schema a file gives (None: it gives none).
fn compile(
    schema: Option<Map<String, Value>>,
    field: &str,
) -> Result<Option<(Value, Arc<Validator>)>, String> {
    schema
        .map(|schema| {
            let schema = Value::Object(schema);
            let validator = jsonschema::validator_for(&schema)
                .map_err(|e| format!("{field} is not a valid JSON Schema: {e}"))?;
            Ok((schema, Arc::new(validator)))
        })
        .transpose()
}

fn validate(
    validator: Option<&Validator>,
    instance: &Map<String, Value>,
    secret: bool,
) -> Result<(), SchemaViolation> {
    let Some(validator) = validator else {
        return Ok(());
    };
    let instance = Value::Object(instance.clone());
    validator.validate(&instance).map_err(|e| SchemaViolation {
        path: e.instance_path().as_str().to_owned(),
        message: if secret {
            e.masked().to_string()
        } else {
            e.to_string()
        },
    })
}

/// Every definition file under `path`, with its format.
fn collect(path: &Path, out: &mut Vec<(PathBuf, Format)>) -> Result<(), LoadError> {
    let io = |e: std::io::Error| LoadError {
        path: path.display().to_string(),
        line: None,
        message: e.to_string(),
    };
    for entry in fs::read_dir(path).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        // Follows symlinks, so a linked model folder loads like a real one.
        if fs::metadata(&path).map_err(io)?.is_dir() {
            collect(&path, out)?;
        } else if let Some(format) = Format::of(&path) {
            out.push((path, format));
        }
    }
    Ok(())
}
