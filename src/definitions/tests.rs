//! Tests of the registry: the built-in models, files on disk, `extends`, and
//! that every refused file names its path and the right line.

use super::*;
use serde_json::json;
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn load_one(name: &str, text: &str) -> Result<Registry, LoadError> {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), name, text);
    Registry::load(&[dir.path().to_path_buf()])
}

/// Loads one file that must be refused, and checks where the error points.
fn refused(name: &str, text: &str, line: usize, says: &str) -> LoadError {
    let err = load_one(name, text).expect_err("file should be refused");
    assert!(err.path.ends_with(name), "{err}");
    assert_eq!(err.line, Some(line), "{err}");
    assert!(err.message.contains(says), "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:{line}: ", err.path)),
        "{shown}"
    );
    err
}

fn object(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

#[test]
fn every_builtin_loads() {
    let registry = Registry::builtin();
    let kinds: Vec<(&str, &str)> = registry
        .list(None, None)
        .iter()
        .map(|d| (d.model.as_str(), d.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("generic", "grpc"),
            ("generic", "http"),
            ("generic", "tcp"),
            ("grafana", "grafana"),
            ("kubernetes", "kubernetes"),
            ("meshery", "meshery"),
            ("prometheus", "prometheus"),
        ]
    );
    for def in registry.list(None, None) {
        assert_eq!(def.source, format!("builtin:{}", def.model));
        assert!(def.managed && def.probe_interval.is_none(), "{}", def.kind);
        assert!(!def.display_name.is_empty() && !def.description.is_empty());
        assert!(def.metadata_schema.is_some(), "{}", def.kind);
    }

    let k8s = registry.get("kubernetes").unwrap();
    assert_eq!(
        (k8s.type_.as_str(), k8s.sub_type.as_str()),
        ("platform", "orchestration")
    );
    assert_eq!(
        k8s.check,
        Check::Http {
            paths: vec!["/readyz".into(), "/version".into()]
        }
    );
    let meshery = registry.get("meshery").unwrap();
    assert!(meshery.auto_connect);
    assert_eq!(meshery.check, Check::Http { paths: vec![] });
    assert_eq!(registry.get("tcp").unwrap().check, Check::Tcp);
    assert_eq!(
        registry.get("grpc").unwrap().check,
        Check::Grpc {
            service: String::new()
        }
    );
    assert!(registry.get("postgres").is_none());
}

/// Every string a schema holds under `description`, and whether any value
/// anywhere in it is null (what an unquoted comma in a flow map turns into).
fn descriptions(schema: &Value, out: &mut Vec<String>) -> bool {
    match schema {
        Value::Null => true,
        Value::Array(items) => items.iter().any(|v| descriptions(v, out)),
        Value::Object(fields) => {
            if let Some(Value::String(d)) = fields.get("description") {
                out.push(d.clone());
            }
            fields.values().any(|v| descriptions(v, out))
        }
        _ => false,
    }
}

#[test]
fn every_builtin_description_reads_as_written() {
    let registry = Registry::builtin();
    let mut loaded = vec![];
    for def in registry.list(None, None) {
        loaded.push(def.description.clone());
        for schema in [&def.metadata_schema, &def.credential_schema]
            .into_iter()
            .flatten()
        {
            assert!(
                !descriptions(schema, &mut loaded),
                "{}: a schema holds a null: {schema}",
                def.kind
            );
        }
    }
    let mut written = 0;
    for (model, text) in BUILTIN {
        for line in text.lines() {
            let Some((head, value)) = line.split_once("description: ") else {
                continue;
            };
            let value = if head.contains('{') {
                value.strip_suffix('}').unwrap_or(value)
            } else {
                value
            };
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            written += 1;
            assert!(
                loaded.iter().any(|d| d == value),
                "builtin:{model}: {value:?} does not load as written"
            );
        }
    }
    assert_eq!(written, 36, "every description line was read");
}

#[test]
fn builtin_credential_schemas_accept_what_each_kind_uses() {
    let registry = Registry::builtin();
    let ok = |kind: &str, secret: Value| registry.validate_secret(kind, &object(secret));
    ok("kubernetes", json!({"token": "t"})).unwrap();
    ok(
        "kubernetes",
        json!({"client_certificate": "c", "client_key": "k", "ca_certificate": "ca"}),
    )
    .unwrap();
    ok("kubernetes", json!({"client_certificate": "c"})).unwrap_err();
    ok("kubernetes", json!({})).unwrap_err();
    for kind in ["prometheus", "grafana"] {
        ok(kind, json!({"token": "t"})).unwrap();
        ok(kind, json!({"username": "u", "password": "p"})).unwrap();
        ok(kind, json!({"username": "u"})).unwrap_err();
    }
    ok("meshery", json!({"token": "t"})).unwrap();
    ok("meshery", json!({})).unwrap_err();
    ok("http", json!({"anything": 1})).unwrap();
}

#[test]
fn a_custom_definition_inherits_what_it_does_not_override() {
    let registry = load_one(
        "custom.yaml",
        "model: prometheus
connections:
  - kind: prometheus-proxied
    extends: prometheus
    display_name: Prometheus behind a proxy
    check: {type: http, paths: [/prometheus/-/ready]}
    probe_interval: 1m
",
    )
    .unwrap();
    let base = registry.get("prometheus").unwrap();
    let custom = registry.get("prometheus-proxied").unwrap();
    assert_eq!(
        custom.check,
        Check::Http {
            paths: vec!["/prometheus/-/ready".into()]
        }
    );
    assert_eq!(custom.display_name, "Prometheus behind a proxy");
    assert_eq!(custom.probe_interval, Some(Duration::from_secs(60)));
    assert_eq!(custom.extends.as_deref(), Some("prometheus"));
    assert!(custom.source.ends_with("custom.yaml"));
    assert_eq!(
        (&custom.type_, &custom.sub_type, &custom.description),
        (&base.type_, &base.sub_type, &base.description)
    );
    assert_eq!(custom.metadata_schema, base.metadata_schema);
    assert_eq!(custom.credential_schema, base.credential_schema);
    // The inherited schemas are enforced, not just shown.
    let bad = object(json!({"username": "u"}));
    assert!(
        registry
            .validate_secret("prometheus-proxied", &bad)
            .is_err()
    );
    assert_eq!(
        registry.list(Some("prometheus"), None).len(),
        2,
        "the base stays"
    );
}

#[test]
fn a_definition_extending_its_own_kind_replaces_it() {
    let registry = load_one(
        "prometheus.json",
        r#"{"model": "prometheus", "connections": [
            {"kind": "prometheus", "extends": "prometheus", "auto_connect": true}
        ]}"#,
    )
    .unwrap();
    let def = registry.get("prometheus").unwrap();
    assert!(def.auto_connect && def.source.ends_with("prometheus.json"));
    assert_eq!(def.type_, "telemetry");
    assert_eq!(registry.list(Some("prometheus"), None).len(), 1);
}

#[test]
fn yaml_and_json_files_load_recursively_in_path_order() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "b/db.yml",
        "model: acme\nconnections:\n  - kind: acme-db\n    type: database\n    check: {type: tcp}\n",
    );
    write(
        dir.path(),
        "a.json",
        r#"{"model": "acme", "connections": [{"kind": "acme-api", "type": "service",
            "managed": false, "transitions": {"DISCOVERED": ["IGNORED", "DELETED"]}}]}"#,
    );
    // Extends a kind of a file that sorts before it.
    write(
        dir.path(),
        "c.yaml",
        "model: acme\nconnections:\n  - {kind: acme-db-replica, extends: acme-db}\n",
    );
    write(dir.path(), "README.md", "not a definition");
    write(dir.path(), ".hidden.yaml", "not: [valid");

    let registry = Registry::load(&[dir.path().to_path_buf()]).unwrap();
    let kinds: Vec<&str> = registry
        .list(Some("acme"), None)
        .iter()
        .map(|d| d.kind.as_str())
        .collect();
    assert_eq!(kinds, ["acme-api", "acme-db", "acme-db-replica"]);
    let api = registry.get("acme-api").unwrap();
    assert_eq!((api.managed, &api.check), (false, &Check::Url));
    assert_eq!(api.display_name, "acme-api");
    assert_eq!(registry.get("acme-db-replica").unwrap().check, Check::Tcp);
    assert_eq!(registry.list(None, Some("acme-db")).len(), 1);
    assert!(registry.get("kubernetes").is_some(), "built-ins stay");
}

#[test]
fn a_yaml_syntax_error_names_its_line() {
    refused(
        "broken.yaml",
        "model: acme\nconnections:\n  - kind: a\n    type: platform: x\n    description: x\n",
        4,
        "mapping values are not allowed",
    );
}

#[test]
fn a_json_syntax_error_names_its_line() {
    refused(
        "broken.json",
        "{\"model\": \"acme\",\n \"connections\": [\n  {\"kind\": \"a\",}\n ]}\n",
        3,
        "",
    );
}

#[test]
fn an_unknown_field_names_its_line() {
    refused(
        "unknown.yaml",
        "model: acme\nconnections:\n  - kind: a\n  - kind: b\n    colour: blue\n",
        5,
        "unknown field `colour`",
    );
}

#[test]
fn a_bad_kind_name_names_its_line() {
    refused(
        "name.yaml",
        "model: acme\nconnections:\n  - kind: a\n  - kind: Bad_Kind\n",
        4,
        "invalid name",
    );
}

#[test]
fn transitions_wider_than_the_lifecycle_are_refused() {
    refused(
        "wide.yaml",
        "model: acme
connections:
  - kind: a
  - kind: b
    transitions:
      DISCOVERED: [REGISTERED, CONNECTED]
",
        4,
        "DISCOVERED -> CONNECTED",
    );
}

#[test]
fn an_unknown_extends_is_refused() {
    refused(
        "orphan.yaml",
        "model: acme\nconnections:\n  - kind: a\n\n  - kind: b\n    extends: nothing\n",
        5,
        "extends unknown kind nothing",
    );
    refused(
        "other-model.yaml",
        "model: acme\nconnections:\n  - kind: b\n    extends: prometheus\n",
        3,
        "of model prometheus",
    );
}

#[test]
fn a_duplicate_kind_is_refused_naming_both_sources() {
    refused(
        "twice.yaml",
        "model: acme\nconnections:\n  - kind: a\n  - kind: b\n  - kind: a\n",
        5,
        "already defined by",
    );
    let err = refused(
        "shadow.yaml",
        "model: monitoring\nconnections:\n  - kind: prometheus\n",
        3,
        "already defined by builtin:prometheus",
    );
    assert!(err.path.ends_with("shadow.yaml"));
}

#[test]
fn a_schema_that_does_not_compile_is_refused() {
    refused(
        "schema.json",
        r#"{"model": "acme", "connections": [
  {"kind": "a"},
  {"kind": "b", "metadata_schema": {"type": "objekt"}}
]}"#,
        3,
        "metadata_schema is not a valid JSON Schema",
    );
}

#[test]
fn metadata_violations_name_the_field() {
    let registry = Registry::builtin();
    let good = object(json!({"scrape_interval": "15s", "team": "sre"}));
    registry.validate_metadata("prometheus", &good).unwrap();
    let bad = object(json!({"version": "2.53.0", "scrape_interval": 15}));
    let err = registry.validate_metadata("prometheus", &bad).unwrap_err();
    assert_eq!(err.path, "/scrape_interval");
    assert!(err.to_string().starts_with("/scrape_interval: "), "{err}");
    // Unknown kinds have no schema; the caller decides whether they are allowed.
    registry.validate_metadata("nothing", &bad).unwrap();
}

#[test]
fn secret_violations_never_quote_the_secret() {
    let registry = Registry::builtin();
    let secret = object(json!({"token": "s3cr3t", "username": "", "password": "hunter2"}));
    let err = registry.validate_secret("grafana", &secret).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("s3cr3t"), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    let secret = object(json!({"token": 42}));
    let err = registry.validate_secret("meshery", &secret).unwrap_err();
    assert_eq!(err.path, "/token");
    assert!(!err.message.contains("42"), "{err:?}");
}

#[test]
fn user_targets_narrow_by_kind() {
    let registry = load_one(
        "narrow.yaml",
        "model: acme
connections:
  - kind: appliance
    transitions:
      DISCOVERED: [IGNORED]
      CONNECTED: []
",
    )
    .unwrap();
    use State::*;
    assert_eq!(registry.user_targets("appliance", Discovered), [Ignored]);
    assert!(registry.user_targets("appliance", Connected).is_empty());
    let global = |from| -> Vec<State> {
        lifecycle::targets(from, Trigger::User)
            .iter()
            .map(|e| e.to)
            .collect()
    };
    assert_eq!(
        registry.user_targets("appliance", Registered),
        global(Registered)
    );
    assert_eq!(
        registry.user_targets("prometheus", Discovered),
        global(Discovered)
    );
    assert_eq!(
        registry.user_targets("unknown", Discovered),
        global(Discovered)
    );
}

#[test]
fn registry_is_shareable() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Registry>();
}
