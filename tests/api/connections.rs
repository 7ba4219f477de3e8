//! Create, read, list, count, update, delete, history, batch, retries and errors.

use crate::common::*;
use std::collections::HashSet;
use tether::pb::tether::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn create_fills_defaults_and_get_returns_it() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let made = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(pb::Connection {
                kind: "prometheus".into(),
                url: "HTTP://Prom.Example:80/".into(),
                metadata: Some(prost_types::Struct {
                    fields: [(
                        "scrape".to_string(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::NumberValue(15.0)),
                        },
                    )]
                    .into(),
                }),
                labels: [("env".to_string(), "prod".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(made.state, S::Discovered as i32);
    assert_eq!(made.state_trigger, pb::Trigger::User as i32);
    assert_eq!(made.managed, Some(true));
    assert_eq!(made.url, "http://prom.example/");
    assert_eq!(made.identity, "prometheus:http://prom.example/");
    assert_eq!(
        made.name, "http://prom.example/",
        "name defaults to the url"
    );
    assert!(made.revision > 0);
    assert!(!made.etag.is_empty());
    assert!(uuid::Uuid::parse_str(&made.id).is_ok());
    assert!(made.create_time.is_some() && made.state_time.is_some());
    let got = get(&mut c, &made.id).await;
    assert_eq!(got, made);
    assert_eq!(got.labels["env"], "prod");
    let scrape = &got.metadata.as_ref().unwrap().fields["scrape"];
    assert_eq!(
        scrape.kind,
        Some(prost_types::value::Kind::NumberValue(15.0))
    );
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn identities_are_unique_among_live_connections() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let first = create(
        &mut c,
        pb::Connection {
            kind: "tcp".into(),
            url: "tcp://db.internal:5432".into(),
            ..Default::default()
        },
    )
    .await;
    let again = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(pb::Connection {
                kind: "tcp".into(),
                url: "tcp://DB.internal:5432".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let meta = assert_error(again, Code::AlreadyExists, "CONNECTION_ALREADY_EXISTS");
    assert_eq!(meta["existing_id"], first.id);

    // Once deleted, the identity makes a new connection with a new id.
    let tomb = c
        .delete_connection(pb::DeleteConnectionRequest {
            id: first.id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(tomb.state, S::Deleted as i32);
    let second = create(
        &mut c,
        pb::Connection {
            kind: "tcp".into(),
            url: "tcp://db.internal:5432".into(),
            ..Default::default()
        },
    )
    .await;
    assert_ne!(second.id, first.id);
    assert_eq!(second.identity, first.identity);
}

#[tokio::test]
async fn invalid_arguments_are_refused_with_the_field_named() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let cases: Vec<(pb::CreateConnectionRequest, &str)> = vec![
        (
            pb::CreateConnectionRequest {
                connection: Some(pb::Connection::default()),
                ..Default::default()
            },
            "connection.kind",
        ),
        (
            pb::CreateConnectionRequest {
                connection: Some(pb::Connection {
                    kind: "Bad Kind".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "connection.kind",
        ),
        (
            pb::CreateConnectionRequest {
                connection: Some(pb::Connection {
                    kind: "http".into(),
                    url: "not a url".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "connection.url",
        ),
        (
            pb::CreateConnectionRequest {
                connection: Some(pb::Connection {
                    kind: "http".into(),
                    name: "x".repeat(256),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "connection.name",
        ),
        (
            pb::CreateConnectionRequest {
                connection: Some(pb::Connection {
                    kind: "http".into(),
                    ..Default::default()
                }),
                initial_state: 42,
                ..Default::default()
            },
            "initial_state",
        ),
        (
            pb::CreateConnectionRequest {
                connection: Some(pb::Connection {
                    kind: "http".into(),
                    ..Default::default()
                }),
                initial_state: S::Maintenance as i32,
                ..Default::default()
            },
            "initial_state",
        ),
        (
            pb::CreateConnectionRequest {
                connection: Some(pb::Connection {
                    kind: "http".into(),
                    labels: [("bad key!".into(), "v".into())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "connection.labels",
        ),
    ];
    for (req, field) in cases {
        let meta = assert_error(
            c.create_connection(req).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(meta["field"], field);
    }
    let meta = assert_error(
        c.get_connection(pb::GetConnectionRequest { id: "nope".into() })
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(meta["field"], "id");
    let r = transition(&mut c, &uuid::Uuid::new_v4().to_string(), S::Unspecified).await;
    assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");
    for (size, token, order) in [(-1, "", ""), (0, "garbage", ""), (0, "", "colour")] {
        let r = c
            .list_connections(pb::ListConnectionsRequest {
                page_size: size,
                page_token: token.into(),
                order_by: order.into(),
                ..Default::default()
            })
            .await;
        assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");
    }
    // Nothing was created by any of it.
    let list = c
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.connections.is_empty());
    assert_eq!(list.revision, 0);
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let id = uuid::Uuid::new_v4().to_string();
    let meta = assert_error(
        c.get_connection(pb::GetConnectionRequest { id: id.clone() })
            .await,
        Code::NotFound,
        "CONNECTION_NOT_FOUND",
    );
    assert_eq!(meta["id"], id);
    assert_error(
        transition(&mut c, &id, S::Ignored).await,
        Code::NotFound,
        "CONNECTION_NOT_FOUND",
    );
    assert_error(
        c.delete_connection(pb::DeleteConnectionRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "CONNECTION_NOT_FOUND",
    );
    let upd = c
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id,
                name: "x".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert_error(upd, Code::NotFound, "CONNECTION_NOT_FOUND");
}

#[tokio::test]
async fn update_applies_the_mask_and_checks_the_etag() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let made = create(
        &mut c,
        pb::Connection {
            kind: "http".into(),
            url: "http://a.example/".into(),
            name: "a".into(),
            description: "keep me".into(),
            ..Default::default()
        },
    )
    .await;

    let updated = c
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: made.id.clone(),
                name: "renamed".into(),
                description: "ignored: not in mask".into(),
                url: "http://b.example/".into(),
                etag: made.etag.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into(), "url".into()],
            }),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.description, "keep me");
    assert_eq!(updated.url, "http://b.example/");
    assert_eq!(
        updated.identity, "http:http://b.example/",
        "a derived identity follows the url"
    );
    assert!(updated.revision > made.revision);
    assert_ne!(updated.etag, made.etag);
    assert_eq!(updated.state, made.state);

    // The old etag is stale now.
    let stale = c
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: made.id.clone(),
                name: "again".into(),
                etag: made.etag.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let meta = assert_error(stale, Code::Aborted, "ETAG_MISMATCH");
    assert_eq!(meta["current_etag"], updated.etag);
    assert_eq!(get(&mut c, &made.id).await.name, "renamed");

    // State is output only.
    let r = c
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: made.id.clone(),
                state: S::Connected as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["state".into()],
            }),
            ..Default::default()
        })
        .await;
    assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");

    // Taking another live connection's identity is refused.
    let other = create(&mut c, conn("http", "")).await;
    let r = c
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: made.id.clone(),
                identity: other.identity.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["identity".into()],
            }),
            ..Default::default()
        })
        .await;
    let meta = assert_error(r, Code::AlreadyExists, "CONNECTION_ALREADY_EXISTS");
    assert_eq!(meta["existing_id"], other.id);

    // An update that changes nothing records nothing.
    let before = events_of(&mut c, &made.id).await.len();
    let same = c
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: made.id.clone(),
                name: "renamed".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("no-op update")
        .into_inner();
    assert_eq!(same.revision, updated.revision);
    assert_eq!(events_of(&mut c, &made.id).await.len(), before);

    // A tombstone cannot be updated.
    c.delete_connection(pb::DeleteConnectionRequest {
        id: made.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = c
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: made.id.clone(),
                name: "zombie".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert_error(r, Code::FailedPrecondition, "CONNECTION_DELETED");
}

#[tokio::test]
async fn delete_leaves_a_tombstone_and_repeats_harmlessly() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let cred = bearer_credential(&app, "grafana", "t0ken").await;
    let made = create(
        &mut c,
        pb::Connection {
            credential_id: cred.clone(),
            description: "collected".into(),
            metadata: Some(prost_types::Struct {
                fields: [(
                    "k".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::BoolValue(true)),
                    },
                )]
                .into(),
            }),
            ..conn("grafana", "https://grafana.example/")
        },
    )
    .await;
    let wrong = c
        .delete_connection(pb::DeleteConnectionRequest {
            id: made.id.clone(),
            etag: "r999".into(),
            ..Default::default()
        })
        .await;
    assert_error(wrong, Code::Aborted, "ETAG_MISMATCH");
    let tomb = c
        .delete_connection(pb::DeleteConnectionRequest {
            id: made.id.clone(),
            etag: made.etag.clone(),
            reason: "decommissioned".into(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(tomb.state, S::Deleted as i32);
    assert_eq!(tomb.state_reason, "decommissioned");
    assert_eq!(tomb.credential_id, "");
    assert_eq!(tomb.description, "");
    assert!(tomb.metadata.unwrap().fields.is_empty());
    assert_eq!(
        (tomb.id.as_str(), tomb.kind.as_str(), tomb.name.as_str()),
        (made.id.as_str(), "grafana", made.name.as_str())
    );

    let again = c
        .delete_connection(pb::DeleteConnectionRequest {
            id: made.id.clone(),
            ..Default::default()
        })
        .await
        .expect("second delete")
        .into_inner();
    assert_eq!(
        again.revision, tomb.revision,
        "deleting twice records nothing"
    );

    let events = events_of(&mut c, &made.id).await;
    let last = events.last().unwrap();
    assert_eq!(last.r#type, pb::EventType::Deleted as i32);
    assert_eq!(
        (last.from_state, last.to_state),
        (S::Discovered as i32, S::Deleted as i32)
    );

    let live = c
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(live.connections.is_empty());
    let all = c
        .list_connections(pb::ListConnectionsRequest {
            show_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.connections.len(), 1);
    assert_error(
        transition(&mut c, &made.id, S::Registered).await,
        Code::FailedPrecondition,
        "INVALID_TRANSITION",
    );
}

#[tokio::test]
async fn list_filters_orders_and_counts() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let mut ids = Vec::new();
    for (i, (kind, ty)) in [
        ("prometheus", "telemetry"),
        ("grafana", "telemetry"),
        ("kubernetes", "platform"),
        ("prometheus", "telemetry"),
    ]
    .iter()
    .enumerate()
    {
        let made = create(
            &mut c,
            pb::Connection {
                r#type: ty.to_string(),
                name: format!("n{i}"),
                description: if i == 2 {
                    "The Big_Cluster".into()
                } else {
                    String::new()
                },
                labels: [(
                    "env".to_string(),
                    if i % 2 == 0 { "prod" } else { "dev" }.to_string(),
                )]
                .into(),
                ..conn(kind, "")
            },
        )
        .await;
        ids.push(made.id);
    }
    transition(&mut c, &ids[3], S::Ignored).await.unwrap();

    let list = |req: pb::ListConnectionsRequest| {
        let mut c = c.clone();
        async move {
            c.list_connections(req)
                .await
                .unwrap()
                .into_inner()
                .connections
                .into_iter()
                .map(|x| x.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(pb::ListConnectionsRequest {
            kinds: vec!["prometheus".into()],
            ..Default::default()
        })
        .await,
        ["n0", "n3"]
    );
    assert_eq!(
        list(pb::ListConnectionsRequest {
            states: vec![S::Ignored as i32],
            ..Default::default()
        })
        .await,
        ["n3"]
    );
    assert_eq!(
        list(pb::ListConnectionsRequest {
            types: vec!["platform".into()],
            ..Default::default()
        })
        .await,
        ["n2"]
    );
    assert_eq!(
        list(pb::ListConnectionsRequest {
            search: "big_c".into(),
            ..Default::default()
        })
        .await,
        ["n2"]
    );
    assert_eq!(
        list(pb::ListConnectionsRequest {
            search: "%".into(),
            ..Default::default()
        })
        .await,
        Vec::<String>::new(),
        "wildcards are literal"
    );
    assert_eq!(
        list(pb::ListConnectionsRequest {
            labels: [("env".to_string(), "dev".to_string())].into(),
            ..Default::default()
        })
        .await,
        ["n1", "n3"]
    );
    assert_eq!(
        list(pb::ListConnectionsRequest {
            order_by: "name desc".into(),
            ..Default::default()
        })
        .await,
        ["n3", "n2", "n1", "n0"]
    );

    let counts = c
        .count_connections(pb::CountConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counts.total, 4);
    let by_state: std::collections::HashMap<i32, i64> =
        counts.counts.iter().map(|s| (s.state, s.count)).collect();
    assert_eq!(by_state[&(S::Discovered as i32)], 3);
    assert_eq!(by_state[&(S::Ignored as i32)], 1);
    assert_eq!(by_state[&(S::Connected as i32)], 0);
    assert!(!by_state.contains_key(&(S::Deleted as i32)));
    let counts = c
        .count_connections(pb::CountConnectionsRequest {
            kinds: vec!["prometheus".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counts.total, 2);
}

#[tokio::test]
async fn pagination_stays_consistent_under_concurrent_writes() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let mut before = HashSet::new();
    for _ in 0..120 {
        before.insert(create(&mut c, conn("http", "")).await.id);
    }
    // Writers keep creating, renaming and transitioning while we page.
    let writer = {
        let mut c = c.clone();
        let existing: Vec<String> = before.iter().take(40).cloned().collect();
        tokio::spawn(async move {
            for (i, id) in existing.iter().enumerate() {
                create(&mut c, conn("http", "")).await;
                c.update_connection(pb::UpdateConnectionRequest {
                    connection: Some(pb::Connection {
                        id: id.clone(),
                        name: format!("renamed {i}"),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
                transition(&mut c, id, S::Ignored).await.unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_connections(pb::ListConnectionsRequest {
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.connections.len() <= 7);
        seen.extend(page.connections.into_iter().map(|x| x.id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    writer.await.unwrap();
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no connection appears twice");
    assert!(
        before.is_subset(&unique),
        "every connection that existed throughout is listed"
    );
    assert!(pages >= 18);

    // A token is bound to its query.
    let first = c
        .list_connections(pb::ListConnectionsRequest {
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = c
        .list_connections(pb::ListConnectionsRequest {
            page_size: 5,
            page_token: first.next_page_token,
            kinds: vec!["grafana".into()],
            ..Default::default()
        })
        .await;
    assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");
    // Oversized pages are coerced to the maximum.
    let big = c
        .list_connections(pb::ListConnectionsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(big.connections.len(), 160);
}

#[tokio::test]
async fn request_ids_make_retries_safe() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let req = pb::CreateConnectionRequest {
        connection: Some(conn("http", "")),
        request_id: "create-1".into(),
        ..Default::default()
    };
    let first = c.create_connection(req.clone()).await.unwrap().into_inner();
    let second = c
        .create_connection(req.clone())
        .await
        .expect("a retry is answered, not refused")
        .into_inner();
    assert_eq!(first, second);

    let t = pb::TransitionConnectionRequest {
        id: first.id.clone(),
        target_state: S::Ignored as i32,
        request_id: "t-1".into(),
        ..Default::default()
    };
    let a = c
        .transition_connection(t.clone())
        .await
        .unwrap()
        .into_inner();
    // Someone else moves it on; the retry still gets the first answer.
    moved(&mut c, &first.id, S::Registered).await;
    let b = c
        .transition_connection(t.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a, b);
    assert_eq!(get(&mut c, &first.id).await.state, S::Registered as i32);

    // The same id for a different request is a client bug.
    let mut other = t.clone();
    other.target_state = S::Deleted as i32;
    assert_error(
        c.transition_connection(other).await,
        Code::InvalidArgument,
        "REQUEST_ID_REUSED",
    );
    let events = events_of(&mut c, &first.id).await;
    assert_eq!(
        events.len(),
        3,
        "created, ignored, registered: retries record nothing"
    );
}

#[tokio::test]
async fn history_pages_and_records_the_authenticated_actor() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let a = create(&mut c, conn("http", "")).await;
    let mut req = tonic::Request::new(pb::TransitionConnectionRequest {
        id: a.id.clone(),
        target_state: S::Ignored as i32,
        reason: "not ours".into(),
        ..Default::default()
    });
    // A name the caller claims for itself is not taken: the actor is who
    // authenticated (here, with authentication off, the anonymous admin).
    req.metadata_mut()
        .insert("tether-actor", "alice".parse().unwrap());
    c.transition_connection(req).await.unwrap();
    let b = create(&mut c, conn("http", "")).await;
    transition(&mut c, &b.id, S::Deleted).await.unwrap();

    let mine = events_of(&mut c, &a.id).await;
    assert_eq!(mine.len(), 2);
    assert_eq!(mine[1].actor, "anonymous");
    assert_eq!(mine[1].reason, "not ours");
    assert_eq!(mine[1].trigger, pb::Trigger::User as i32);
    assert_eq!(mine[0].actor, "anonymous");

    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = c
            .list_connection_events(pb::ListConnectionEventsRequest {
                after_revision: after,
                page_size: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.events.iter().map(|e| e.revision));
        if page.next_after_revision == 0 {
            assert_eq!(page.revision, 4);
            break;
        }
        after = page.next_after_revision;
    }
    assert_eq!(all, [1, 2, 3, 4]);
}

#[tokio::test]
async fn batch_transitions_apply_each_item_independently() {
    let app = App::start_with(|cfg| cfg.max_batch = 5).await;
    let mut c = app.client.clone();
    let a = create(&mut c, conn("http", "")).await;
    let b = create(&mut c, conn("http", "")).await;
    let item = |id: &str, s: S| pb::TransitionConnectionRequest {
        id: id.into(),
        target_state: s as i32,
        skip_verification: true,
        ..Default::default()
    };
    let resp = c
        .batch_transition_connections(pb::BatchTransitionConnectionsRequest {
            requests: vec![
                item(&a.id, S::Ignored),
                item(&b.id, S::Connected),
                item("bogus", S::Ignored),
                item(&b.id, S::Ignored),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    use pb::batch_transition_result::Result as R;
    let results: Vec<_> = resp
        .results
        .into_iter()
        .map(|r| r.result.expect("every item has a result"))
        .collect();
    assert_eq!(results.len(), 4);
    match &results[0] {
        R::Connection(x) => assert_eq!(x.state, S::Ignored as i32),
        other => panic!("{other:?}"),
    }
    for (i, (code, reason)) in [
        (1, (Code::FailedPrecondition, "INVALID_TRANSITION")),
        (2, (Code::InvalidArgument, "INVALID_ARGUMENT")),
    ] {
        match &results[i] {
            R::Error(s) => {
                assert_eq!(s.code, code as i32);
                let info = s.details.iter().find_map(|d| {
                    (d.type_url.ends_with("google.rpc.ErrorInfo")).then(|| {
                        <tonic_types::pb::ErrorInfo as prost::Message>::decode(d.value.as_slice())
                            .unwrap()
                    })
                });
                assert_eq!(info.expect("ErrorInfo").reason, reason);
            }
            other => panic!("{other:?}"),
        }
    }
    match &results[3] {
        R::Connection(x) => {
            assert_eq!((x.id.as_str(), x.state), (b.id.as_str(), S::Ignored as i32))
        }
        other => panic!("{other:?}"),
    }
    let too_many = c
        .batch_transition_connections(pb::BatchTransitionConnectionsRequest {
            requests: vec![item(&a.id, S::Deleted); 6],
        })
        .await;
    assert_error(too_many, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(
        get(&mut c, &a.id).await.state,
        S::Ignored as i32,
        "a refused batch changes nothing"
    );
}

#[tokio::test]
async fn retries_with_many_labels_get_the_first_answer() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let labels: std::collections::BTreeMap<String, String> =
        (0..8).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
    let req = pb::CreateConnectionRequest {
        connection: Some(pb::Connection {
            labels,
            ..conn("http", "")
        }),
        request_id: "labels-1".into(),
        ..Default::default()
    };
    let first = c.create_connection(req.clone()).await.unwrap().into_inner();
    for _ in 0..5 {
        let again = c
            .create_connection(req.clone())
            .await
            .expect("the same request again")
            .into_inner();
        assert_eq!(again, first);
    }
}

#[tokio::test]
async fn a_batch_applies_items_for_one_connection_in_order() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let x = create(&mut c, conn("http", "")).await;
    let y = create(&mut c, conn("http", "")).await;
    let item = |id: &str, s: S| pb::TransitionConnectionRequest {
        id: id.into(),
        target_state: s as i32,
        skip_verification: true,
        ..Default::default()
    };
    let resp = c
        .batch_transition_connections(pb::BatchTransitionConnectionsRequest {
            requests: vec![
                item(&x.id, S::Ignored),
                item(&y.id, S::Deleted),
                item(&x.id, S::Registered),
                item(&y.id, S::Ignored),
                item(&x.id, S::Maintenance),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    use pb::batch_transition_result::Result as R;
    let states: Vec<Result<i32, i32>> = resp
        .results
        .into_iter()
        .map(|r| match r.result.unwrap() {
            R::Connection(c) => Ok(c.state),
            R::Error(s) => Err(s.code),
        })
        .collect();
    assert_eq!(
        states,
        [
            Ok(S::Ignored as i32),
            Ok(S::Deleted as i32),
            Ok(S::Registered as i32),
            Err(Code::FailedPrecondition as i32),
            Ok(S::Maintenance as i32),
        ]
    );
    let steps: Vec<i32> = events_of(&mut c, &x.id)
        .await
        .iter()
        .map(|e| e.to_state)
        .collect();
    assert_eq!(
        steps,
        [
            S::Discovered as i32,
            S::Ignored as i32,
            S::Registered as i32,
            S::Maintenance as i32
        ]
    );
}

#[tokio::test]
async fn deletion_scrubs_collected_data_from_history_and_stored_answers() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let cred = bearer_credential(&app, "kubernetes", "k8s-token").await;
    let secret_bits = pb::Connection {
        credential_id: cred.clone(),
        description: "collected description".into(),
        labels: [("team".to_string(), "payments".to_string())].into(),
        metadata: Some(prost_types::Struct {
            fields: [(
                "server_version".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("v1.31".into())),
                },
            )]
            .into(),
        }),
        ..conn("kubernetes", "")
    };
    let req = pb::CreateConnectionRequest {
        connection: Some(secret_bits),
        request_id: "scrub-1".into(),
        ..Default::default()
    };
    let made = c.create_connection(req.clone()).await.unwrap().into_inner();
    transition(&mut c, &made.id, S::Ignored).await.unwrap();
    c.delete_connection(pb::DeleteConnectionRequest {
        id: made.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Replaying history (resume after the creation) shows the scrubbed snapshots.
    let mut s = c
        .watch_connections(pb::WatchConnectionsRequest {
            after_revision: made.revision,
            ids: vec![made.id.clone()],
            states: vec![S::Ignored as i32, S::Deleted as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ignored = s.message().await.unwrap().unwrap().connection.unwrap();
    assert_eq!(ignored.state, S::Ignored as i32);
    assert_eq!(
        (ignored.credential_id.as_str(), ignored.labels.len()),
        ("", 0)
    );
    let db = rusqlite::Connection::open(app.db_path()).unwrap();
    let mut stmt = db
        .prepare("SELECT snapshot FROM events UNION ALL SELECT answer FROM requests")
        .unwrap();
    let stored: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(stored.len(), 4, "three events and one stored answer");
    for text in &stored {
        for secret in [cred.as_str(), "collected description", "payments", "v1.31"] {
            assert!(
                !text.contains(secret),
                "{secret} survived deletion in {text}"
            );
        }
    }
    // And a retry of the creation gets the scrubbed answer.
    let again = c.create_connection(req).await.unwrap().into_inner();
    assert_eq!(
        (again.id.as_str(), again.credential_id.as_str()),
        (made.id.as_str(), "")
    );
}
