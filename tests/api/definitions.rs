//! Connection definitions: the built-in models, `--models` folders (custom
//! kinds, `extends`, narrowed transitions, bad files), and the metadata
//! schemas a kind imposes on its connections.

use crate::common::*;
use std::collections::BTreeSet;
use tether::pb::tether::v1 as pb;
use tether::pb::tether::v1::definition_service_client::DefinitionServiceClient;
use tonic::Code;
use tonic::transport::Channel;

fn definitions(app: &App) -> DefinitionServiceClient<Channel> {
    DefinitionServiceClient::new(app.channel.clone())
}

async fn list(
    d: &mut DefinitionServiceClient<Channel>,
    model: &str,
    kind: &str,
) -> Vec<pb::Definition> {
    d.list_definitions(pb::ListDefinitionsRequest {
        model: model.into(),
        kind: kind.into(),
    })
    .await
    .expect("list definitions")
    .into_inner()
    .definitions
}

async fn get_def(
    d: &mut DefinitionServiceClient<Channel>,
    kind: &str,
) -> Result<pb::Definition, tonic::Status> {
    d.get_definition(pb::GetDefinitionRequest { kind: kind.into() })
        .await
        .map(|r| r.into_inner())
}

fn kinds_of(defs: &[pb::Definition]) -> BTreeSet<&str> {
    defs.iter().map(|d| d.kind.as_str()).collect()
}

fn check_of(d: &pb::Definition) -> (&str, Vec<&str>, &str) {
    let c = d.check.as_ref().expect("every definition has a check");
    (
        c.r#type.as_str(),
        c.paths.iter().map(String::as_str).collect(),
        c.service.as_str(),
    )
}

/// The property names a JSON Schema (as a Struct) declares.
fn properties(schema: &Option<prost_types::Struct>) -> BTreeSet<String> {
    use prost_types::value::Kind;
    let schema = schema.as_ref().expect("a schema");
    match schema
        .fields
        .get("properties")
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StructValue(p)) => p.fields.keys().cloned().collect(),
        other => panic!("no properties in {other:?}"),
    }
}

#[tokio::test]
async fn builtin_definitions_are_listed_with_their_checks() {
    let app = App::start().await;
    let mut d = definitions(&app);
    let all = list(&mut d, "", "").await;
    let models: BTreeSet<(&str, &str)> = all
        .iter()
        .map(|d| (d.model.as_str(), d.kind.as_str()))
        .collect();
    assert_eq!(
        models,
        BTreeSet::from([
            ("generic", "grpc"),
            ("generic", "http"),
            ("generic", "tcp"),
            ("grafana", "grafana"),
            ("kubernetes", "kubernetes"),
            ("meshery", "meshery"),
            ("prometheus", "prometheus"),
        ])
    );
    assert_eq!(all.len(), 7, "each kind once");
    let by_kind = |k: &str| all.iter().find(|d| d.kind == k).unwrap();

    assert_eq!(
        check_of(by_kind("prometheus")),
        ("http", vec!["/-/ready"], "")
    );
    assert_eq!(
        check_of(by_kind("kubernetes")),
        ("http", vec!["/readyz", "/version"], "")
    );
    assert_eq!(
        check_of(by_kind("grafana")),
        ("http", vec!["/api/health"], "")
    );
    assert_eq!(check_of(by_kind("meshery")), ("http", vec![], ""));
    assert_eq!(check_of(by_kind("http")), ("http", vec![], ""));
    assert_eq!(check_of(by_kind("tcp")), ("tcp", vec![], ""));
    assert_eq!(check_of(by_kind("grpc")), ("grpc", vec![], ""));

    let auto: BTreeSet<&str> = all
        .iter()
        .filter(|d| d.auto_connect)
        .map(|d| d.kind.as_str())
        .collect();
    assert_eq!(auto, BTreeSet::from(["meshery"]));
    assert!(all.iter().all(|d| d.managed), "built-ins are managed");
    assert!(
        all.iter()
            .all(|d| d.extends.is_empty() && d.transitions.is_empty())
    );

    let prom = by_kind("prometheus");
    assert_eq!(
        (
            prom.r#type.as_str(),
            prom.sub_type.as_str(),
            prom.display_name.as_str()
        ),
        ("telemetry", "metrics", "Prometheus")
    );
    assert!(properties(&prom.metadata_schema).contains("scrape_interval"));
    assert_eq!(
        properties(&by_kind("kubernetes").credential_schema),
        BTreeSet::from([
            "token".to_string(),
            "client_certificate".into(),
            "client_key".into(),
            "ca_certificate".into()
        ])
    );
    assert_eq!(
        properties(&by_kind("grafana").metadata_schema),
        BTreeSet::from([
            "version".to_string(),
            "org_id".into(),
            "home_dashboard".into()
        ])
    );
    // Generic kinds take any credential.
    assert_eq!(by_kind("http").credential_schema, None);

    // GetDefinition answers exactly what the listing says.
    for def in &all {
        assert_eq!(&get_def(&mut d, &def.kind).await.unwrap(), def);
    }
}

#[tokio::test]
async fn definitions_filter_by_model_and_kind() {
    let app = App::start().await;
    let mut d = definitions(&app);
    assert_eq!(
        kinds_of(&list(&mut d, "generic", "").await),
        BTreeSet::from(["grpc", "http", "tcp"])
    );
    let grafana = list(&mut d, "", "grafana").await;
    assert_eq!(kinds_of(&grafana), BTreeSet::from(["grafana"]));
    assert_eq!(grafana[0].model, "grafana");
    assert_eq!(
        kinds_of(&list(&mut d, "generic", "tcp").await),
        BTreeSet::from(["tcp"])
    );
    // Both filters apply at once.
    assert!(list(&mut d, "prometheus", "grafana").await.is_empty());
    assert!(list(&mut d, "no-such-model", "").await.is_empty());
    assert!(list(&mut d, "", "no-such-kind").await.is_empty());
}

#[tokio::test]
async fn get_definition_of_an_unknown_kind_is_not_found() {
    let app = App::start().await;
    let mut d = definitions(&app);
    let meta = assert_error(
        get_def(&mut d, "no-such-kind").await,
        Code::NotFound,
        "DEFINITION_NOT_FOUND",
    );
    assert_eq!(meta["kind"], "no-such-kind");
    // Allowing unknown kinds for connections does not invent definitions.
    let lax = App::start_with(|cfg| cfg.allow_unknown_kinds = true).await;
    let mut d = definitions(&lax);
    assert_error(
        get_def(&mut d, "no-such-kind").await,
        Code::NotFound,
        "DEFINITION_NOT_FOUND",
    );
}

const PROXIED_PROMETHEUS: &str = "\
# A Prometheus served by a proxy under another health path.
model: prometheus
connections:
  - kind: prometheus-proxied
    extends: prometheus
    display_name: Prometheus behind a proxy
    check: {type: http, paths: [\"/custom/healthy\"]}
    probe_interval: 45s
";

#[tokio::test]
async fn a_custom_definition_extends_a_builtin_and_overrides_its_check() {
    let models = models_dir(&[("proxied.yaml", PROXIED_PROMETHEUS)]);
    let path = models.path().to_path_buf();
    let app = App::start_with(|cfg| cfg.models = vec![path]).await;
    let mut d = definitions(&app);
    let base = get_def(&mut d, "prometheus").await.unwrap();
    let custom = get_def(&mut d, "prometheus-proxied").await.unwrap();

    // Overridden.
    assert_eq!(check_of(&custom), ("http", vec!["/custom/healthy"], ""));
    assert_eq!(custom.display_name, "Prometheus behind a proxy");
    assert_eq!(custom.extends, "prometheus");
    assert_eq!(
        custom.probe_interval,
        Some(prost_types::Duration {
            seconds: 45,
            nanos: 0
        })
    );
    // Inherited.
    assert_eq!(custom.model, "prometheus");
    assert_eq!(
        (custom.r#type.as_str(), custom.sub_type.as_str()),
        ("telemetry", "metrics")
    );
    assert_eq!(custom.description, base.description);
    assert!(!custom.description.is_empty());
    assert_eq!(custom.metadata_schema, base.metadata_schema);
    assert_eq!(custom.credential_schema, base.credential_schema);
    assert_eq!(
        (custom.managed, custom.auto_connect),
        (base.managed, base.auto_connect)
    );
    // The base is untouched, and the model now holds both.
    assert_eq!(check_of(&base), ("http", vec!["/-/ready"], ""));
    assert_eq!(
        kinds_of(&list(&mut d, "prometheus", "").await),
        BTreeSet::from(["prometheus", "prometheus-proxied"])
    );

    // Its connections are verified against its own path, not the base's.
    let proxy = RoutedHttp::ok_on(&["/custom/healthy"]).await;
    let mut c = app.client.clone();
    let custom_conn = create(&mut c, conn("prometheus-proxied", &proxy.url(""))).await;
    assert_eq!(
        custom_conn.r#type, "telemetry",
        "type comes from the definition"
    );
    let registered = transition(&mut c, &custom_conn.id, S::Registered)
        .await
        .expect("verified against /custom/healthy");
    assert_eq!(registered.state, S::Registered as i32);
    assert_eq!(proxy.paths(), ["/custom/healthy"]);

    let plain = create(&mut c, conn("prometheus", &proxy.url(""))).await;
    let refused = transition(&mut c, &plain.id, S::Registered).await;
    assert_error(refused, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
    assert_eq!(proxy.paths(), ["/custom/healthy", "/-/ready"]);

    // And the reverse: a server that only knows the base path fails the custom kind.
    let stock = RoutedHttp::ok_on(&["/-/ready"]).await;
    let other = create(&mut c, conn("prometheus-proxied", &stock.url(""))).await;
    let refused = transition(&mut c, &other.id, S::Registered).await;
    assert_error(refused, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
    assert_eq!(stock.paths(), ["/custom/healthy"]);

    // The inherited metadata schema applies to the custom kind.
    let bad = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(pb::Connection {
                metadata: Some(json_struct(
                    serde_json::json!({"external_labels": {"region": 5}}),
                )),
                ..conn("prometheus-proxied", "")
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(
        invalid_field(bad),
        "connection.metadata/external_labels/region"
    );
    // So does the inherited credential schema.
    let mut creds = tether::pb::tether::v1::credential_service_client::CredentialServiceClient::new(
        app.channel.clone(),
    );
    let secret = |v: serde_json::Value| pb::CreateCredentialRequest {
        name: "proxy".into(),
        r#type: "prometheus-proxied".into(),
        secret: Some(json_struct(v)),
        owner: String::new(),
        allowed_hosts: vec!["*.example".into()],
    };
    let bad = creds
        .create_credential(secret(serde_json::json!({"token": "t", "extra": "x"})))
        .await;
    assert!(invalid_field(bad).starts_with("secret"));
    creds
        .create_credential(secret(serde_json::json!({"token": "t"})))
        .await
        .expect("a token fits the inherited schema");
}

#[tokio::test]
async fn a_definition_may_replace_a_builtin_of_the_same_kind_in_place() {
    let models = models_dir(&[(
        "prometheus.yml",
        "model: prometheus\n\
         connections:\n  \
           - kind: prometheus\n    \
             extends: prometheus\n    \
             check: {type: http, paths: [\"/healthz\"]}\n",
    )]);
    let path = models.path().to_path_buf();
    let app = App::start_with(|cfg| cfg.models = vec![path]).await;
    let mut d = definitions(&app);
    let prom = get_def(&mut d, "prometheus").await.unwrap();
    assert_eq!(check_of(&prom), ("http", vec!["/healthz"], ""));
    assert_eq!(prom.display_name, "Prometheus", "the rest is inherited");
    assert_eq!(list(&mut d, "", "prometheus").await.len(), 1);

    let server = RoutedHttp::ok_on(&["/healthz"]).await;
    let mut c = app.client.clone();
    let made = create(&mut c, conn("prometheus", &server.url(""))).await;
    transition(&mut c, &made.id, S::Registered)
        .await
        .expect("verified against the replacement path");
    assert_eq!(server.paths(), ["/healthz"]);
}

/// `Server::open` with `dir` as the only models folder: the error text.
async fn open_error(dir: &tempfile::TempDir) -> String {
    let db = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.db = Some(db.path().join("tether.db"));
    config.models = vec![dir.path().to_path_buf()];
    match tether::server::Server::open(config).await {
        Ok(_) => panic!("a bad definition file must stop the server"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_bad_definition_file_is_refused_at_start_with_its_file_and_line() {
    // A field no definition has, on line 5.
    let unknown_field = models_dir(&[(
        "bad.yaml",
        "model: custom\n\
         connections:\n  \
           - kind: widget\n    \
             type: device\n    \
             colour: red\n",
    )]);
    let e = open_error(&unknown_field).await;
    assert!(e.contains("bad.yaml:5"), "{e}");
    assert!(e.contains("colour"), "says what is wrong: {e}");

    // A kind name that is not a name, on line 3.
    let bad_name = models_dir(&[(
        "bad.yaml",
        "model: custom\nconnections:\n  - kind: Not A Name\n",
    )]);
    let e = open_error(&bad_name).await;
    assert!(e.contains("bad.yaml:3"), "{e}");
    assert!(e.contains("invalid name"), "{e}");

    // Extending a kind nobody defined: the line of the definition that does.
    let dangling = models_dir(&[(
        "bad.yaml",
        "model: custom\n\
         connections:\n  \
           - kind: fine\n  \
           - kind: orphan\n    \
             extends: nothing-here\n",
    )]);
    let e = open_error(&dangling).await;
    assert!(e.contains("bad.yaml:4"), "{e}");
    assert!(e.contains("nothing-here"), "{e}");

    // Transitions wider than the lifecycle.
    let wider = models_dir(&[(
        "bad.yaml",
        "model: custom\n\
         connections:\n  \
           - kind: wide\n    \
             transitions:\n      \
               DISCOVERED: [CONNECTED]\n",
    )]);
    let e = open_error(&wider).await;
    assert!(e.contains("bad.yaml:3"), "{e}");
    assert!(e.contains("CONNECTED"), "{e}");

    // Extending a kind of another model.
    let foreign = models_dir(&[(
        "bad.yaml",
        "model: custom\n\
         connections:\n  \
           - kind: my-prometheus\n    \
             extends: prometheus\n",
    )]);
    let e = open_error(&foreign).await;
    assert!(e.contains("bad.yaml:3"), "{e}");
    assert!(e.contains("model prometheus"), "{e}");

    // A schema that is not a JSON Schema.
    let schema = models_dir(&[(
        "bad.yaml",
        "model: custom\n\
         connections:\n  \
           - kind: fine\n  \
           - kind: broken\n    \
             metadata_schema: {type: 12}\n",
    )]);
    let e = open_error(&schema).await;
    assert!(e.contains("bad.yaml:4"), "{e}");
    assert!(e.contains("metadata_schema"), "{e}");

    // Broken JSON names its line too.
    let json = models_dir(&[(
        "bad.json",
        "{\n  \"model\": \"custom\",\n  \"connections\": [\n    {\"kind\": \"x\",}\n  ]\n}\n",
    )]);
    let e = open_error(&json).await;
    assert!(e.contains("bad.json:4"), "{e}");

    // A good folder opens.
    let good = models_dir(&[("proxied.yaml", PROXIED_PROMETHEUS)]);
    let db = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.db = Some(db.path().join("tether.db"));
    config.models = vec![good.path().to_path_buf()];
    assert!(tether::server::Server::open(config).await.is_ok());
}

const APPLIANCE: &str = "\
model: appliances
connections:
  - kind: appliance
    type: device
    check: {type: none}
    transitions:
      DISCOVERED: [IGNORED, DELETED]
";

#[tokio::test]
async fn a_kind_with_narrowed_transitions_refuses_the_others() {
    let models = models_dir(&[("appliance.yaml", APPLIANCE)]);
    let path = models.path().to_path_buf();
    let app = App::start_with(|cfg| cfg.models = vec![path]).await;
    let mut d = definitions(&app);
    let def = get_def(&mut d, "appliance").await.unwrap();
    assert_eq!(
        def.transitions,
        [pb::StateTargets {
            state: S::Discovered as i32,
            targets: vec![S::Ignored as i32, S::Deleted as i32],
        }]
    );

    let mut c = app.client.clone();
    let made = create(&mut c, conn("appliance", "")).await;
    let before = store_revision(&mut c).await;
    for skip_verification in [false, true] {
        let refused = c
            .transition_connection(pb::TransitionConnectionRequest {
                id: made.id.clone(),
                target_state: S::Registered as i32,
                skip_verification,
                ..Default::default()
            })
            .await;
        let meta = assert_error(refused, Code::FailedPrecondition, "INVALID_TRANSITION");
        assert_eq!(meta["allowed"], "IGNORED,DELETED");
        assert_eq!(
            (meta["from"].as_str(), meta["to"].as_str()),
            ("DISCOVERED", "REGISTERED")
        );
    }
    assert_eq!(store_revision(&mut c).await, before, "nothing committed");
    assert_eq!(get(&mut c, &made.id).await.state, S::Discovered as i32);

    // Creating straight into REGISTERED takes the same edge, and is refused whole.
    let refused = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(conn("appliance", "")),
            initial_state: S::Registered as i32,
            skip_verification: true,
            ..Default::default()
        })
        .await;
    let meta = assert_error(refused, Code::FailedPrecondition, "INVALID_TRANSITION");
    assert_eq!(meta["allowed"], "IGNORED,DELETED");
    assert_eq!(store_revision(&mut c).await, before, "nothing committed");

    // What it does allow works, and other states keep the full table.
    let ignored = transition(&mut c, &made.id, S::Ignored).await.unwrap();
    assert_eq!(ignored.state, S::Ignored as i32);
    let registered = transition(&mut c, &made.id, S::Registered).await.unwrap();
    assert_eq!(registered.state, S::Registered as i32);

    // Other kinds are not narrowed.
    let tcp = create(&mut c, conn("tcp", "")).await;
    let moved = c
        .transition_connection(pb::TransitionConnectionRequest {
            id: tcp.id.clone(),
            target_state: S::Registered as i32,
            skip_verification: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.state, S::Registered as i32);
}

#[tokio::test]
async fn metadata_that_breaks_its_kinds_schema_is_refused_naming_the_field() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let with_meta = |kind: &str, meta: serde_json::Value| pb::CreateConnectionRequest {
        connection: Some(pb::Connection {
            metadata: Some(json_struct(meta)),
            ..conn(kind, "")
        }),
        ..Default::default()
    };
    let before = store_revision(&mut c).await;
    for (kind, meta, field) in [
        (
            "grafana",
            serde_json::json!({"org_id": "one"}),
            "connection.metadata/org_id",
        ),
        (
            "grafana",
            serde_json::json!({"org_id": 0}),
            "connection.metadata/org_id",
        ),
        (
            "kubernetes",
            serde_json::json!({"version": 131}),
            "connection.metadata/version",
        ),
        (
            "prometheus",
            serde_json::json!({"external_labels": {"region": true}}),
            "connection.metadata/external_labels/region",
        ),
    ] {
        let r = c.create_connection(with_meta(kind, meta.clone())).await;
        assert_eq!(invalid_field(r), field, "{kind} {meta}");
    }
    assert_eq!(store_revision(&mut c).await, before, "nothing was created");

    // Matching metadata (and properties the schema does not mention) is fine.
    let made = c
        .create_connection(with_meta(
            "grafana",
            serde_json::json!({"org_id": 2, "version": "11.2.0", "extra": [1, 2]}),
        ))
        .await
        .expect("valid metadata")
        .into_inner();

    // The same check on update; the connection is left as it was.
    let update = |meta: serde_json::Value| pb::UpdateConnectionRequest {
        connection: Some(pb::Connection {
            id: made.id.clone(),
            metadata: Some(json_struct(meta)),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["metadata".into()],
        }),
        ..Default::default()
    };
    let r = c
        .update_connection(update(serde_json::json!({"org_id": -3})))
        .await;
    assert_eq!(invalid_field(r), "connection.metadata/org_id");
    let r = c
        .update_connection(update(serde_json::json!({"home_dashboard": 7})))
        .await;
    assert_eq!(invalid_field(r), "connection.metadata/home_dashboard");
    assert_eq!(get(&mut c, &made.id).await, made, "unchanged");
    let updated = c
        .update_connection(update(serde_json::json!({"org_id": 5})))
        .await
        .expect("valid update")
        .into_inner();
    assert!(updated.revision > made.revision);
}

#[tokio::test]
async fn unknown_kinds_are_refused_unless_allowed() {
    let strict = App::start().await;
    let mut c = strict.client.clone();
    let r = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(conn("acme-widget", "")),
            ..Default::default()
        })
        .await;
    let meta = assert_error(r, Code::InvalidArgument, "UNKNOWN_KIND");
    assert_eq!(meta["kind"], "acme-widget");
    let counted = c
        .count_connections(pb::CountConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counted.total, 0);

    let lax = App::start_with(|cfg| cfg.allow_unknown_kinds = true).await;
    let mut c = lax.client.clone();
    // Accepted with any metadata; the generic check (by the url's scheme) applies.
    let peer = RoutedHttp::ok_on(&["/status"]).await;
    let made = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(pb::Connection {
                metadata: Some(json_struct(serde_json::json!({"anything": {"goes": 1}}))),
                ..conn("acme-widget", &peer.url("/status"))
            }),
            ..Default::default()
        })
        .await
        .expect("unknown kinds allowed")
        .into_inner();
    assert_eq!(
        (made.kind.as_str(), made.state),
        ("acme-widget", S::Discovered as i32)
    );
    let registered = transition(&mut c, &made.id, S::Registered).await.unwrap();
    assert_eq!(registered.state, S::Registered as i32);
    assert_eq!(peer.paths(), ["/status"]);
    let elsewhere = create(&mut c, conn("acme-widget", &peer.url("/missing"))).await;
    let r = transition(&mut c, &elsewhere.id, S::Registered).await;
    assert_error(r, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
    // Known kinds keep their schemas.
    let r = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(pb::Connection {
                metadata: Some(json_struct(serde_json::json!({"org_id": "x"}))),
                ..conn("grafana", "")
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(invalid_field(r), "connection.metadata/org_id");
}
