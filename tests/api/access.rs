//! Authentication and authorization over the real gRPC surface: an access
//! file of bearer tokens, a client per principal, and every RPC tried by every
//! principal against objects it owns and objects it does not. Then the
//! paths a caller could use to get at someone else's secret, the limits per
//! principal, and reloading the access file.

use crate::common::*;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tether::pb::tether::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

/// The principals of these tests, in the order of the matrix columns.
/// `anon` sends no token.
const WHO: [&str; 8] = [
    "alice", "bob", "vera", "dora", "carl", "root", "nobody", "anon",
];

/// Roles and owners of each principal with a token.
const GRANTS: [(&str, &[&str], &[&str]); 7] = [
    ("alice", &["operator"], &[]),
    ("bob", &["operator"], &[]),
    ("vera", &["viewer"], &["alice"]),
    ("dora", &["discovery"], &["alice"]),
    ("carl", &["credential-admin"], &[]),
    ("root", &["admin"], &[]),
    ("nobody", &[], &[]),
];

/// A server with authentication on, and the tokens of its principals.
struct Secured {
    app: App,
    /// Holds the access file; independent of the app's database folder.
    _dir: tempfile::TempDir,
    file: PathBuf,
    tokens: HashMap<String, String>,
}

/// How often the servers of these tests look at their access file.
const RELOAD: Duration = Duration::from_millis(500);

fn new_token(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

impl Secured {
    async fn start(tweak: impl FnOnce(&mut tether::Config)) -> Secured {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("access.yaml");
        let tokens: HashMap<String, String> = GRANTS
            .iter()
            .map(|(n, _, _)| (n.to_string(), new_token(n)))
            .collect();
        write_atomically(&file, &access_file(&grants(&tokens, &[])));
        let path = file.clone();
        let app = App::start_with(move |c| {
            c.auth_file = Some(path);
            c.reload_interval = RELOAD;
            tweak(c);
        })
        .await;
        let s = Secured {
            app,
            _dir: dir,
            file,
            tokens,
        };
        // Serving, and the file it read is the one written above.
        s.client("anon")
            .health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("serving");
        s
    }

    /// Clients presenting `who`'s token (`anon`: none; anything else: that
    /// name as a token no file lists).
    fn client(&self, who: &str) -> As {
        match (who, self.tokens.get(who)) {
            ("anon", _) => As::new(&self.app.channel, None),
            (_, Some(t)) => As::new(&self.app.channel, Some(t)),
            (other, None) => As::new(&self.app.channel, Some(other)),
        }
    }
}

/// The grants of `tokens` plus extra `(name, token, roles)` entries.
fn grants<'a>(
    tokens: &'a HashMap<String, String>,
    extra: &'a [(&'a str, &'a str, &'a [&'a str])],
) -> Vec<Grant<'a>> {
    GRANTS
        .iter()
        .map(|(n, roles, owners)| Grant {
            principal: n,
            token: &tokens[*n],
            roles,
            owners,
        })
        .chain(extra.iter().map(|(n, t, roles)| Grant {
            principal: n,
            token: t,
            roles,
            owners: &[],
        }))
        .collect()
}

/// Replaces a file in one step, so its reader never sees half of it;
/// private, as the server wants its access file.
fn write_atomically(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write access file");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&tmp, path).expect("replace access file");
}

fn labelled(kind: &str, url: &str, owner: &str, tag: &str) -> pb::Connection {
    pb::Connection {
        owner: owner.into(),
        labels: [("row".to_string(), tag.to_string())].into(),
        ..conn(kind, url)
    }
}

async fn make(c: &mut As, body: pb::Connection) -> pb::Connection {
    c.conn
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(body),
            skip_verification: true,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
}

async fn fetch(c: &mut As, id: &str) -> pb::Connection {
    c.conn
        .get_connection(pb::GetConnectionRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

async fn revision(c: &mut As) -> i64 {
    c.conn
        .list_connection_events(pb::ListConnectionEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .revision
}

async fn credential(
    c: &mut As,
    owner: &str,
    allowed_hosts: &[&str],
) -> Result<pb::Credential, tonic::Status> {
    c.creds
        .create_credential(pb::CreateCredentialRequest {
            name: format!("cred of {owner}"),
            r#type: "http".into(),
            secret: Some(json_struct(
                serde_json::json!({"token": "s3cret", "ca_certificate": test_ca().pem}),
            )),
            owner: owner.into(),
            allowed_hosts: allowed_hosts.iter().map(|h| h.to_string()).collect(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn credential_ids(c: &mut As) -> Result<BTreeSet<String>, tonic::Status> {
    let mut ids = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .creds
            .list_credentials(pb::ListCredentialsRequest {
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        ids.extend(page.credentials.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            return Ok(ids);
        }
        page_token = page.next_page_token;
    }
}

/// The next message of a watch, within 10 s.
async fn next(
    s: &mut tonic::Streaming<pb::WatchConnectionsResponse>,
) -> pb::WatchConnectionsResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a watch message within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// The ids a watch's snapshot holds, up to its SYNCED.
async fn snapshot(s: &mut tonic::Streaming<pb::WatchConnectionsResponse>) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    loop {
        let m = next(s).await;
        match m.r#type() {
            pb::WatchEventType::Added => {
                ids.insert(m.connection.expect("an object").id);
            }
            pb::WatchEventType::Synced => return ids,
            other => panic!("unexpected {other:?} in a snapshot"),
        }
    }
}

async fn watch(
    c: &mut As,
    r: pb::WatchConnectionsRequest,
) -> Result<tonic::Streaming<pb::WatchConnectionsResponse>, tonic::Status> {
    c.conn.watch_connections(r).await.map(|r| r.into_inner())
}

// ---- 1. the authorization matrix ----

/// What a call should come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum E {
    /// Succeeds (and, where an object is concerned, shows it).
    Ok,
    /// Succeeds, but the object is not among what it shows.
    Hid,
    /// Fails with this code and `ErrorInfo.reason`.
    Err(Code, &'static str),
}

const OK: E = E::Ok;
const HID: E = E::Hid;
const UNA: E = E::Err(Code::Unauthenticated, "UNAUTHENTICATED");
const DEN: E = E::Err(Code::PermissionDenied, "PERMISSION_DENIED");
const NFC: E = E::Err(Code::NotFound, "CONNECTION_NOT_FOUND");
const NFK: E = E::Err(Code::NotFound, "CREDENTIAL_NOT_FOUND");
const BAD: E = E::Err(Code::InvalidArgument, "INVALID_ARGUMENT");
/// tonic's own answer for a method it does not serve: no ErrorInfo.
const UNIMPL: E = E::Err(Code::Unimplemented, "");

/// The calls of the matrix. Where a row names an owner, root makes a fresh
/// object of that owner before each call (for Create*, the owner is the one
/// asked for; "" asks for none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Create,
    Get,
    List,
    Count,
    Update,
    Transition,
    /// The call's own status if refused, else its one item's.
    Batch,
    Delete,
    /// ListConnectionEvents of one connection.
    EventsOf,
    /// ListConnectionEvents of everything (is the object's creation in it?).
    Events,
    Lifecycle,
    /// WatchConnections: is the object in the snapshot?
    Watch,
    /// ReportDiscovered of a new identity.
    Report,
    /// ReportDiscovered of the object's identity: is the object shown?
    ReportSeen,
    CreateCred,
    ListCreds,
    DeleteCred,
    ListDefs,
    GetDef,
    /// grpc.reflection.v1.ServerReflection: list the services.
    Reflect,
    /// A method of ConnectionService the server does not know.
    Unknown,
    /// grpc.health.v1.Health/Check.
    Health,
}
use Op::*;

/// Roles: viewer reads, operator reads and writes connections (and lists
/// credentials), discovery only reports, credential-admin creates, lists and
/// deletes credentials, admin does all over every owner; lifecycle and
/// definitions need any role, health none. Scope: alice, bob, carl see their
/// own; vera and dora also alice's; root everything. An object out of scope
/// is not found (or not shown), never PERMISSION_DENIED; a role short of the
/// method is PERMISSION_DENIED whatever the object. Reflection, like the
/// lifecycle and definitions, needs any role; a method the table does not
/// know is for admins only (tonic then says it is unimplemented).
#[rustfmt::skip]
const MATRIX: &[(Op, &str, [E; 8])] = &[
    //                        alice  bob   vera  dora  carl  root  nobody anon
    (Create,      "",        [OK,   OK,   DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Create,      "alice",   [OK,   BAD,  DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Create,      "bob",     [BAD,  OK,   DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Get,         "alice",   [OK,   NFC,  OK,   DEN,  DEN,  OK,   DEN,  UNA]),
    (Get,         "bob",     [NFC,  OK,   NFC,  DEN,  DEN,  OK,   DEN,  UNA]),
    (List,        "alice",   [OK,   HID,  OK,   DEN,  DEN,  OK,   DEN,  UNA]),
    (List,        "bob",     [HID,  OK,   HID,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Count,       "alice",   [OK,   HID,  OK,   DEN,  DEN,  OK,   DEN,  UNA]),
    (Count,       "bob",     [HID,  OK,   HID,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Update,      "alice",   [OK,   NFC,  DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Update,      "bob",     [NFC,  OK,   DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Transition,  "alice",   [OK,   NFC,  DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Transition,  "bob",     [NFC,  OK,   DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Batch,       "alice",   [OK,   NFC,  DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Batch,       "bob",     [NFC,  OK,   DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Delete,      "alice",   [OK,   NFC,  DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Delete,      "bob",     [NFC,  OK,   DEN,  DEN,  DEN,  OK,   DEN,  UNA]),
    (EventsOf,    "alice",   [OK,   NFC,  OK,   DEN,  DEN,  OK,   DEN,  UNA]),
    (EventsOf,    "bob",     [NFC,  OK,   NFC,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Events,      "alice",   [OK,   HID,  OK,   DEN,  DEN,  OK,   DEN,  UNA]),
    (Events,      "bob",     [HID,  OK,   HID,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Lifecycle,   "",        [OK,   OK,   OK,   OK,   OK,   OK,   DEN,  UNA]),
    (Watch,       "alice",   [OK,   HID,  OK,   DEN,  DEN,  OK,   DEN,  UNA]),
    (Watch,       "bob",     [HID,  OK,   HID,  DEN,  DEN,  OK,   DEN,  UNA]),
    (Report,      "",        [DEN,  DEN,  DEN,  OK,   DEN,  OK,   DEN,  UNA]),
    (ReportSeen,  "alice",   [DEN,  DEN,  DEN,  OK,   DEN,  OK,   DEN,  UNA]),
    (ReportSeen,  "bob",     [DEN,  DEN,  DEN,  HID,  DEN,  OK,   DEN,  UNA]),
    (CreateCred,  "",        [DEN,  DEN,  DEN,  DEN,  OK,   OK,   DEN,  UNA]),
    (CreateCred,  "alice",   [DEN,  DEN,  DEN,  DEN,  BAD,  OK,   DEN,  UNA]),
    (ListCreds,   "alice",   [OK,   HID,  DEN,  DEN,  HID,  OK,   DEN,  UNA]),
    (ListCreds,   "bob",     [HID,  OK,   DEN,  DEN,  HID,  OK,   DEN,  UNA]),
    (ListCreds,   "carl",    [HID,  HID,  DEN,  DEN,  OK,   OK,   DEN,  UNA]),
    (DeleteCred,  "alice",   [DEN,  DEN,  DEN,  DEN,  NFK,  OK,   DEN,  UNA]),
    (DeleteCred,  "carl",    [DEN,  DEN,  DEN,  DEN,  OK,   OK,   DEN,  UNA]),
    (ListDefs,    "",        [OK,   OK,   OK,   OK,   OK,   OK,   DEN,  UNA]),
    (GetDef,      "",        [OK,   OK,   OK,   OK,   OK,   OK,   DEN,  UNA]),
    (Reflect,     "",        [OK,   OK,   OK,   OK,   OK,   OK,   DEN,  UNA]),
    (Unknown,     "",        [DEN,  DEN,  DEN,  DEN,  DEN,  UNIMPL, DEN, UNA]),
    (Health,      "",        [OK,   OK,   OK,   OK,   OK,   OK,   OK,   OK]),
];

/// Makes the object a row needs (as root), calls `op` as `who`, and says
/// whether the object was shown; checks the effect as root where the call
/// changes something.
async fn attempt(
    root: &mut As,
    c: &mut As,
    who: &str,
    op: Op,
    owner: &str,
) -> Result<bool, tonic::Status> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let object = match op {
        Get | List | Count | Update | Transition | Batch | Delete | EventsOf | Events | Watch
        | ReportSeen => Some(make(root, labelled("http", "", owner, &tag)).await),
        _ => None,
    };
    let id = object.as_ref().map(|o| o.id.clone()).unwrap_or_default();
    let cred = match op {
        ListCreds | DeleteCred => {
            Some(credential(root, owner, &["x.example"]).await.expect("cred"))
        }
        _ => None,
    };
    let shown = match op {
        Create => {
            let made = c
                .conn
                .create_connection(pb::CreateConnectionRequest {
                    connection: Some(labelled("http", "", owner, &tag)),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let want = if owner.is_empty() { who } else { owner };
            assert_eq!(made.owner, want, "the owner of what {who} made");
            true
        }
        Get => {
            c.conn
                .get_connection(pb::GetConnectionRequest { id: id.clone() })
                .await?
                .into_inner()
                .id
                == id
        }
        List => c
            .conn
            .list_connections(pb::ListConnectionsRequest {
                labels: [("row".to_string(), tag.clone())].into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .connections
            .iter()
            .any(|x| x.id == id),
        Count => {
            let total = c
                .conn
                .count_connections(pb::CountConnectionsRequest {
                    labels: [("row".to_string(), tag.clone())].into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .total;
            assert!(total <= 1, "{total}");
            total == 1
        }
        Update => {
            let r = c
                .conn
                .update_connection(pb::UpdateConnectionRequest {
                    connection: Some(pb::Connection {
                        id: id.clone(),
                        name: format!("renamed by {who}"),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["name".into()],
                    }),
                    ..Default::default()
                })
                .await;
            let now = fetch(root, &id).await;
            assert_eq!(now.name == format!("renamed by {who}"), r.is_ok(), "{r:?}");
            r?.into_inner().id == id
        }
        Transition | Batch | Delete => {
            let before = object.as_ref().expect("an object").revision;
            let r = match op {
                Transition => c
                    .conn
                    .transition_connection(pb::TransitionConnectionRequest {
                        id: id.clone(),
                        target_state: S::Ignored as i32,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner()),
                Batch => {
                    let mut results = c
                        .conn
                        .batch_transition_connections(pb::BatchTransitionConnectionsRequest {
                            requests: vec![pb::TransitionConnectionRequest {
                                id: id.clone(),
                                target_state: S::Ignored as i32,
                                ..Default::default()
                            }],
                        })
                        .await?
                        .into_inner()
                        .results;
                    assert_eq!(results.len(), 1);
                    match results.remove(0).result.expect("a result") {
                        pb::batch_transition_result::Result::Connection(x) => Ok(x),
                        pb::batch_transition_result::Result::Error(e) => {
                            Err(tonic::Status::with_details(
                                Code::from(e.code),
                                e.message.clone(),
                                prost::Message::encode_to_vec(&e).into(),
                            ))
                        }
                    }
                }
                _ => c
                    .conn
                    .delete_connection(pb::DeleteConnectionRequest {
                        id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner()),
            };
            let now = fetch(root, &id).await;
            assert_eq!(
                now.revision > before,
                r.is_ok(),
                "changed only if allowed: {r:?}"
            );
            r?.id == id
        }
        EventsOf => {
            let events = c
                .conn
                .list_connection_events(pb::ListConnectionEventsRequest {
                    connection_id: id.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .events;
            assert!(events.iter().all(|e| e.connection_id == id));
            !events.is_empty()
        }
        Events => c
            .conn
            .list_connection_events(pb::ListConnectionEventsRequest {
                after_revision: object.as_ref().expect("an object").revision - 1,
                page_size: 100,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events
            .iter()
            .any(|e| e.connection_id == id),
        Lifecycle => !c
            .conn
            .describe_lifecycle(pb::DescribeLifecycleRequest::default())
            .await?
            .into_inner()
            .states
            .is_empty(),
        Watch => {
            let mut s = watch(
                c,
                pb::WatchConnectionsRequest {
                    ids: vec![id.clone()],
                    ..Default::default()
                },
            )
            .await?;
            snapshot(&mut s).await.contains(&id)
        }
        Report | ReportSeen => {
            let body = match &object {
                Some(o) => pb::Connection {
                    kind: "http".into(),
                    identity: o.identity.clone(),
                    ..Default::default()
                },
                None => conn("http", &format!("https://{tag}.example/")),
            };
            let mut results = c
                .conn
                .report_discovered(pb::ReportDiscoveredRequest {
                    source: "agent".into(),
                    connections: vec![body],
                })
                .await?
                .into_inner()
                .results;
            assert_eq!(results.len(), 1);
            let r = results.remove(0);
            let want = if object.is_some() {
                pb::DiscoveryOutcome::Unchanged
            } else {
                pb::DiscoveryOutcome::Created
            };
            assert_eq!(r.outcome(), want, "{r:?}");
            if let Some(shown) = &r.connection {
                let want = if object.is_some() { owner } else { who };
                assert_eq!(shown.owner, want);
            }
            r.connection.is_some()
        }
        CreateCred => {
            let made = credential(c, owner, &["x.example"]).await?;
            let want = if owner.is_empty() { who } else { owner };
            assert_eq!(made.owner, want);
            true
        }
        ListCreds => credential_ids(c)
            .await?
            .contains(&cred.expect("a credential").id),
        DeleteCred => {
            let cred = cred.expect("a credential").id;
            let r = c
                .creds
                .delete_credential(pb::DeleteCredentialRequest { id: cred.clone() })
                .await;
            let left = credential_ids(root)
                .await
                .expect("root lists")
                .contains(&cred);
            assert_eq!(left, r.is_err(), "deleted only if allowed: {r:?}");
            r?;
            true
        }
        ListDefs => !c
            .defs
            .list_definitions(pb::ListDefinitionsRequest::default())
            .await?
            .into_inner()
            .definitions
            .is_empty(),
        GetDef => {
            c.defs
                .get_definition(pb::GetDefinitionRequest {
                    kind: "http".into(),
                })
                .await?
                .into_inner()
                .kind
                == "http"
        }
        Reflect => {
            use tonic_reflection::pb::v1::{
                server_reflection_request as q, server_reflection_response as a,
            };
            let ask = tonic_reflection::pb::v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(q::MessageRequest::ListServices(String::new())),
            };
            let reply = c
                .reflection
                .server_reflection_info(tokio_stream::iter([ask]))
                .await?
                .into_inner()
                .message()
                .await?
                .expect("a reply");
            matches!(
                reply.message_response,
                Some(a::MessageResponse::ListServicesResponse(_))
            )
        }
        Unknown => {
            let mut raw = c.raw.clone();
            raw.ready().await.expect("ready");
            let codec =
                tonic_prost::ProstCodec::<pb::GetConnectionRequest, pb::Connection>::default();
            let path = http::uri::PathAndQuery::from_static("/tether.v1.ConnectionService/Nope");
            raw.unary(
                tonic::Request::new(pb::GetConnectionRequest::default()),
                path,
                codec,
            )
            .await?;
            true
        }
        Health => {
            c.health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await?
                .into_inner()
                .status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }
    };
    Ok(shown)
}

fn outcome(r: &Result<bool, tonic::Status>) -> E {
    match r {
        Ok(true) => E::Ok,
        Ok(false) => E::Hid,
        Err(s) => {
            let details = s.get_error_details();
            let reason = details
                .error_info()
                .map(|i| i.reason.clone())
                .unwrap_or_default();
            // Only the reasons the matrix uses; anything else shows as "other".
            let reason: &'static str = [UNA, DEN, NFC, NFK, BAD, UNIMPL]
                .into_iter()
                .find_map(|e| match e {
                    E::Err(code, r) if code == s.code() && r == reason => Some(r),
                    _ => None,
                })
                .unwrap_or("other");
            E::Err(s.code(), reason)
        }
    }
}

#[tokio::test]
async fn every_rpc_by_every_principal_on_own_and_foreign_objects() {
    let s = Secured::start(|_| {}).await;
    let mut root = s.client("root");
    let mut wrong = Vec::new();
    for (op, owner, expected) in MATRIX {
        for (who, want) in WHO.iter().zip(expected) {
            let mut c = s.client(who);
            let r = attempt(&mut root, &mut c, who, *op, owner).await;
            let got = outcome(&r);
            if got != *want {
                wrong.push(format!(
                    "{op:?} on {owner:?} as {who}: want {want:?}, got {r:?}"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cells differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

// ---- 2. what each principal sees ----

async fn listed(c: &mut As) -> Result<BTreeSet<String>, tonic::Status> {
    Ok(c.conn
        .list_connections(pb::ListConnectionsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .connections
        .into_iter()
        .map(|c| c.id)
        .collect())
}

#[tokio::test]
async fn reads_and_watches_show_only_what_the_scope_sees() {
    let s = Secured::start(|_| {}).await;
    let mut root = s.client("root");
    // Watches open before anything exists, to see the changes live.
    let mut live = Vec::new();
    for who in ["alice", "bob", "vera", "root"] {
        let mut w = watch(&mut s.client(who), pb::WatchConnectionsRequest::default())
            .await
            .expect("watch");
        assert!(snapshot(&mut w).await.is_empty());
        live.push((who, w));
    }
    // Interleaved, so a change that leaked would arrive before the last one
    // each watch expects.
    let first = make(&mut root, labelled("http", "", "alice", "t")).await;
    let a1 = first.id.clone();
    let b1 = make(&mut root, labelled("http", "", "bob", "t")).await.id;
    let a2 = make(&mut root, labelled("http", "", "alice", "t")).await.id;
    let b2 = make(&mut root, labelled("http", "", "bob", "t")).await.id;
    let expected = [
        ("alice", vec![&a1, &a2]),
        ("bob", vec![&b1, &b2]),
        ("vera", vec![&a1, &a2]),
        ("root", vec![&a1, &b1, &a2, &b2]),
    ];
    for ((who, want), (watcher, w)) in expected.iter().zip(live.iter_mut()) {
        assert_eq!(who, watcher);
        let want_set: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let mut c = s.client(who);
        assert_eq!(listed(&mut c).await.unwrap(), want_set, "{who} lists");
        let count = c
            .conn
            .count_connections(pb::CountConnectionsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(count.total, want.len() as i64, "{who} counts");
        let events = c
            .conn
            .list_connection_events(pb::ListConnectionEventsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        let ids: BTreeSet<String> = events.into_iter().map(|e| e.connection_id).collect();
        assert_eq!(ids, want_set, "{who} lists events");
        let mut snap = watch(&mut c, pb::WatchConnectionsRequest::default())
            .await
            .unwrap();
        assert_eq!(snapshot(&mut snap).await, want_set, "{who}'s snapshot");
        for id in want {
            let m = next(w).await;
            assert_eq!(
                (m.r#type(), m.connection.map(|c| c.id)),
                (pb::WatchEventType::Added, Some(id.to_string())),
                "{who}'s live watch"
            );
        }
    }

    // A watch that resumes from a revision replays history from the store:
    // filtered the same way.
    let mut alice = s.client("alice");
    let mut resumed = watch(
        &mut alice,
        pb::WatchConnectionsRequest {
            after_revision: first.revision,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // History up to now (a2, not b1 or b2), SYNCED, then what comes live:
    // a3 is made only once the history is out, so it can only come live.
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = next(&mut resumed).await;
        got.push((m.r#type(), m.connection.map(|c| c.id)));
    }
    let a3 = make(&mut root, labelled("http", "", "alice", "t")).await.id;
    let m = next(&mut resumed).await;
    got.push((m.r#type(), m.connection.map(|c| c.id)));
    assert_eq!(
        got,
        [
            (pb::WatchEventType::Added, Some(a2.clone())),
            (pb::WatchEventType::Synced, None),
            (pb::WatchEventType::Added, Some(a3.clone())),
        ],
        "alice's resumed watch"
    );

    // Out of scope is not found exactly like never made: same code, reason
    // and message, the id aside.
    let missing = uuid::Uuid::new_v4().to_string();
    let foreign = expect_code(
        alice
            .conn
            .get_connection(pb::GetConnectionRequest { id: b1.clone() })
            .await,
        Code::NotFound,
        "CONNECTION_NOT_FOUND",
    );
    let absent = expect_code(
        alice
            .conn
            .get_connection(pb::GetConnectionRequest {
                id: missing.clone(),
            })
            .await,
        Code::NotFound,
        "CONNECTION_NOT_FOUND",
    );
    assert_eq!(
        foreign.message().replace(&b1, "ID"),
        absent.message().replace(&missing, "ID")
    );
    assert_eq!(error_info(&foreign).2["id"], b1);

    // No token, an unknown token, or not a bearer token: unauthenticated.
    for who in ["anon", "mallory"] {
        let r = listed(&mut s.client(who)).await;
        expect_code(r, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    for header in ["Basic YWxpY2U6cHc=", "Bearer ", "Bearer"] {
        let mut request = tonic::Request::new(pb::ListConnectionsRequest::default());
        request
            .metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let r = s.client("anon").conn.list_connections(request).await;
        expect_code(r, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    // A token nobody holds that is the digest of one: still unknown.
    let digest = tether::access::token_digest(&s.tokens["alice"]);
    let r = listed(&mut s.client(&digest)).await;
    expect_code(r, Code::Unauthenticated, "UNAUTHENTICATED");
    // Health needs nothing.
    let health = s
        .client("anon")
        .health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health without a token")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

// ---- 3. ways to get at someone else's secret ----

fn with_cred(url: &str, credential_id: &str) -> pb::Connection {
    pb::Connection {
        credential_id: credential_id.into(),
        ..conn("http", url)
    }
}

async fn create_as(
    c: &mut As,
    body: pb::Connection,
    state: S,
    skip_verification: bool,
) -> Result<pb::Connection, tonic::Status> {
    c.conn
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(body),
            initial_state: state as i32,
            skip_verification,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Asserts an INVALID_ARGUMENT naming `field` whose message contains `says`.
fn refused(r: Result<pb::Connection, tonic::Status>, field: &str, says: &str) {
    let status = expect_code(r, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(error_info(&status).2["field"], field, "{status:?}");
    assert!(status.message().contains(says), "{says:?} in {status:?}");
}

#[tokio::test]
async fn credentials_of_others_can_be_neither_listed_nor_attached() {
    let s = Secured::start(|_| {}).await;
    let (mut root, mut alice) = (s.client("root"), s.client("alice"));
    let mine = credential(&mut root, "alice", &["alice.example"])
        .await
        .unwrap()
        .id;
    let bobs = credential(&mut root, "bob", &["*.example", "127.0.0.1"])
        .await
        .unwrap()
        .id;

    // (a) Listing: not for viewers or discovery agents; others' are not shown.
    for who in ["vera", "dora"] {
        let r = credential_ids(&mut s.client(who)).await;
        expect_code(r, Code::PermissionDenied, "PERMISSION_DENIED");
    }
    assert_eq!(
        credential_ids(&mut alice).await.unwrap(),
        [mine.clone()].into()
    );
    assert_eq!(
        credential_ids(&mut s.client("bob")).await.unwrap(),
        [bobs.clone()].into()
    );

    // Deleting one out of scope is not found exactly like deleting none.
    let mut carl = s.client("carl");
    let missing = uuid::Uuid::new_v4().to_string();
    let mut delete = async |id: &str| {
        let r = carl
            .creds
            .delete_credential(pb::DeleteCredentialRequest { id: id.into() })
            .await;
        expect_code(r, Code::NotFound, "CREDENTIAL_NOT_FOUND")
    };
    let (foreign, absent) = (delete(&mine).await, delete(&missing).await);
    assert_eq!(
        foreign.message().replace(&mine, "ID"),
        absent.message().replace(&missing, "ID")
    );
    assert!(credential_ids(&mut root).await.unwrap().contains(&mine));

    // (b) Attaching: bob's is no credential to alice, even where it would
    // allow the host; hers only where it allows the host, and never in the clear.
    let before = revision(&mut root).await;
    let r = create_as(
        &mut alice,
        with_cred("https://attacker.example/", &bobs),
        S::Discovered,
        true,
    )
    .await;
    refused(r, "connection.credential_id", "no credential");
    let r = create_as(
        &mut alice,
        with_cred("https://attacker.example/", &mine),
        S::Discovered,
        true,
    )
    .await;
    refused(r, "connection.credential_id", "attacker.example");
    let r = create_as(
        &mut alice,
        with_cred("http://alice.example/", &mine),
        S::Discovered,
        true,
    )
    .await;
    refused(r, "connection.credential_id", "cleartext");
    // Refused before any check is made: a loopback peer that would answer
    // sees no request, whether the credential is bob's or does not allow it.
    let peer = RoutedHttp::new_tls(|_| 200).await;
    let r = create_as(
        &mut alice,
        with_cred(&peer.url("/"), &bobs),
        S::Registered,
        false,
    )
    .await;
    refused(r, "connection.credential_id", "no credential");
    let r = create_as(
        &mut alice,
        with_cred(&peer.url("/"), &mine),
        S::Registered,
        false,
    )
    .await;
    refused(r, "connection.credential_id", "127.0.0.1");
    assert_eq!(peer.seen(), []);
    // Nothing was made.
    assert_eq!(revision(&mut root).await, before);
    assert!(listed(&mut root).await.unwrap().is_empty());
    // The peer is there to be seen: a credential of hers that allows it is sent.
    let local = credential(&mut root, "alice", &["127.0.0.1"])
        .await
        .unwrap()
        .id;
    let made = create_as(
        &mut alice,
        with_cred(&peer.url("/"), &local),
        S::Registered,
        false,
    )
    .await
    .expect("verified with her own credential");
    assert_eq!(made.state, S::Registered as i32);
    assert_eq!(
        peer.seen()
            .into_iter()
            .map(|r| r.authorization)
            .collect::<Vec<_>>(),
        [Some("Bearer s3cret".to_string())]
    );
}

async fn update_as(
    c: &mut As,
    id: &str,
    body: pb::Connection,
    paths: &[&str],
) -> Result<pb::Connection, tonic::Status> {
    c.conn
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: id.into(),
                ..body
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_credentialed_connection_moves_only_with_a_credential_for_the_new_place() {
    let s = Secured::start(|_| {}).await;
    let (mut root, mut alice) = (s.client("root"), s.client("alice"));
    let here = credential(&mut root, "alice", &["alice.example"])
        .await
        .unwrap()
        .id;
    let there = credential(&mut root, "alice", &["moved.example"])
        .await
        .unwrap()
        .id;
    let bobs = credential(&mut root, "bob", &["*.example"])
        .await
        .unwrap()
        .id;
    let made = create_as(
        &mut alice,
        with_cred("https://alice.example/api", &here),
        S::Discovered,
        true,
    )
    .await
    .unwrap();
    let url = |u: &str| pb::Connection {
        url: u.into(),
        ..Default::default()
    };

    let r = update_as(
        &mut alice,
        &made.id,
        url("https://attacker.example/api"),
        &["url"],
    )
    .await;
    refused(r, "connection.url", "attacker.example");
    let r = update_as(
        &mut alice,
        &made.id,
        url("http://alice.example/api"),
        &["url"],
    )
    .await;
    refused(r, "connection.url", "cleartext");
    let r = update_as(
        &mut alice,
        &made.id,
        pb::Connection {
            credential_id: bobs.clone(),
            ..Default::default()
        },
        &["credential_id"],
    )
    .await;
    refused(r, "connection.credential_id", "no credential");
    // Bob's credential would allow the new host, but is not hers to use.
    let r = update_as(
        &mut alice,
        &made.id,
        pb::Connection {
            credential_id: bobs.clone(),
            ..url("https://moved.example/")
        },
        &["url", "credential_id"],
    )
    .await;
    refused(r, "connection.credential_id", "no credential");
    let now = fetch(&mut alice, &made.id).await;
    assert_eq!(
        (now.url.as_str(), now.credential_id.as_str(), now.revision),
        (made.url.as_str(), here.as_str(), made.revision),
        "unchanged"
    );

    // Url and a credential that allows its host, together: accepted.
    let moved = update_as(
        &mut alice,
        &made.id,
        pb::Connection {
            credential_id: there.clone(),
            ..url("https://moved.example/")
        },
        &["url", "credential_id"],
    )
    .await
    .expect("moved with a credential for the new host");
    assert_eq!(
        (moved.url.as_str(), moved.credential_id.as_str()),
        ("https://moved.example/", there.as_str())
    );
    // And back without changing the credential: refused again.
    let r = update_as(
        &mut alice,
        &made.id,
        url("https://alice.example/api"),
        &["url"],
    )
    .await;
    refused(r, "connection.url", "alice.example");
    assert_eq!(
        fetch(&mut alice, &made.id).await.url,
        "https://moved.example/"
    );
}

async fn report(c: &mut As, body: pb::Connection) -> Result<pb::DiscoveryResult, tonic::Status> {
    let mut results = c
        .conn
        .report_discovered(pb::ReportDiscoveredRequest {
            source: "agent-7".into(),
            connections: vec![body],
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(results.len(), 1);
    Ok(results.remove(0))
}

#[tokio::test]
async fn a_discovery_report_cannot_steer_a_secret_and_a_discovery_agent_can_only_report() {
    let s = Secured::start(|_| {}).await;
    let (mut root, mut alice, mut dora) = (s.client("root"), s.client("alice"), s.client("dora"));
    let closed = ClosedPort::new();
    let local = credential(&mut root, "alice", &["127.0.0.1"])
        .await
        .unwrap()
        .id;
    let home = format!("https://{}/", closed.addr);
    let made = create_as(&mut alice, with_cred(&home, &local), S::Discovered, true)
        .await
        .unwrap();
    // A failed register attempt (nothing listens there) leaves it NOT_FOUND.
    let r = alice
        .conn
        .transition_connection(pb::TransitionConnectionRequest {
            id: made.id.clone(),
            target_state: S::Registered as i32,
            ..Default::default()
        })
        .await;
    let status = expect_code(r, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
    assert_eq!(error_info(&status).2["state"], "NOT_FOUND");
    let lost = fetch(&mut alice, &made.id).await;
    assert_eq!(lost.state, S::NotFound as i32);

    // Reported again elsewhere: found again, but it stays where it was.
    let found = report(
        &mut dora,
        pb::Connection {
            kind: "http".into(),
            identity: made.identity.clone(),
            url: "https://attacker.example/".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        found.outcome(),
        pb::DiscoveryOutcome::Rediscovered,
        "{found:?}"
    );
    let shown = found.connection.expect("dora sees alice's");
    assert_eq!(
        (
            shown.url.as_str(),
            shown.credential_id.as_str(),
            shown.state
        ),
        (home.as_str(), local.as_str(), S::Discovered as i32)
    );
    assert!(shown.state_reason.contains("its url is kept"), "{shown:?}");
    let now = fetch(&mut alice, &made.id).await;
    assert_eq!(
        (now.url.as_str(), now.state),
        (home.as_str(), S::Discovered as i32)
    );
    let after: Vec<_> = alice
        .conn
        .list_connection_events(pb::ListConnectionEventsRequest {
            connection_id: made.id.clone(),
            after_revision: lost.revision,
            page_size: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        after
            .iter()
            .map(|e| (e.r#type(), e.to_state(), e.actor.as_str()))
            .collect::<Vec<_>>(),
        [(pb::EventType::Transitioned, S::Discovered, "dora")],
        "one move back, signed by the agent, and no url change"
    );

    // Nor can a report attach a credential where it is not allowed, or one
    // the agent cannot see.
    let bobs = credential(&mut root, "bob", &["*.example"])
        .await
        .unwrap()
        .id;
    for (cred, says) in [(&local, "attacker.example"), (&bobs, "no credential")] {
        let r = report(&mut dora, with_cred("https://attacker.example/", cred))
            .await
            .unwrap();
        assert_eq!(r.outcome(), pb::DiscoveryOutcome::Rejected, "{r:?}");
        assert!(r.reason.contains(says), "{says:?} in {r:?}");
    }

    // (e) The agent reports; it does nothing else.
    let before = revision(&mut root).await;
    let id = made.id.clone();
    expect_code(
        dora.conn
            .get_connection(pb::GetConnectionRequest { id: id.clone() })
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    expect_code(
        update_as(
            &mut dora,
            &id,
            pb::Connection {
                url: "https://attacker.example/".into(),
                ..Default::default()
            },
            &["url"],
        )
        .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    for target in [S::Registered, S::Ignored] {
        let r = dora
            .conn
            .transition_connection(pb::TransitionConnectionRequest {
                id: id.clone(),
                target_state: target as i32,
                skip_verification: true,
                ..Default::default()
            })
            .await;
        expect_code(r, Code::PermissionDenied, "PERMISSION_DENIED");
    }
    let r = dora
        .conn
        .delete_connection(pb::DeleteConnectionRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::PermissionDenied, "PERMISSION_DENIED");
    assert_eq!(revision(&mut root).await, before, "nothing changed");
}

#[tokio::test]
async fn new_objects_belong_to_the_caller_or_an_owner_in_its_scope() {
    let s = Secured::start(|_| {}).await;
    let (mut root, mut alice, mut bob) = (s.client("root"), s.client("alice"), s.client("bob"));
    let before = revision(&mut root).await;
    let r = create_as(
        &mut alice,
        pb::Connection {
            owner: "bob".into(),
            ..conn("http", "")
        },
        S::Discovered,
        true,
    )
    .await;
    refused(r, "connection.owner", "bob");
    let r = credential(&mut s.client("carl"), "alice", &["x.example"]).await;
    let status = expect_code(r, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(error_info(&status).2["field"], "owner");
    assert_eq!(revision(&mut root).await, before, "nothing made");
    assert!(credential_ids(&mut root).await.unwrap().is_empty());
    // A discovery agent may name an owner it sees, not another.
    let mut dora = s.client("dora");
    let r = report(
        &mut dora,
        pb::Connection {
            owner: "bob".into(),
            ..conn("http", "https://b.example/")
        },
    )
    .await
    .unwrap();
    assert_eq!(r.outcome(), pb::DiscoveryOutcome::Rejected, "{r:?}");
    let r = report(
        &mut dora,
        pb::Connection {
            owner: "alice".into(),
            ..conn("http", "https://a.example/")
        },
    )
    .await
    .unwrap();
    assert_eq!(r.connection.expect("created").owner, "alice");

    // A taken identity: only a caller who sees its holder learns which it is.
    let body = conn("http", "");
    let held = create_as(&mut alice, body.clone(), S::Discovered, true)
        .await
        .unwrap();
    for (who, c, existing) in [
        ("bob", &mut bob, ""),
        ("alice", &mut alice, held.id.as_str()),
        ("root", &mut root, held.id.as_str()),
    ] {
        let r = create_as(c, body.clone(), S::Discovered, true).await;
        let status = expect_code(r, Code::AlreadyExists, "CONNECTION_ALREADY_EXISTS");
        assert_eq!(error_info(&status).2["existing_id"], existing, "{who}");
        assert!(!status.message().contains(&held.id), "{who}: {status:?}");
    }
}

#[tokio::test]
async fn request_ids_belong_to_their_caller() {
    let s = Secured::start(|_| {}).await;
    let (mut alice, mut bob) = (s.client("alice"), s.client("bob"));
    let create = |body: pb::Connection| pb::CreateConnectionRequest {
        connection: Some(body),
        request_id: "same-id".into(),
        ..Default::default()
    };
    let (body_a, body_b) = (conn("http", ""), conn("http", ""));
    let a = alice
        .conn
        .create_connection(create(body_a.clone()))
        .await
        .unwrap()
        .into_inner();
    // The same id from bob, with another body: his own request, not a reuse
    // of alice's, and not her answer.
    let b = bob
        .conn
        .create_connection(create(body_b.clone()))
        .await
        .expect("bob's request is his own")
        .into_inner();
    assert_ne!(a.id, b.id);
    assert_eq!((a.owner.as_str(), b.owner.as_str()), ("alice", "bob"));
    // Each retry gets its caller's first answer.
    for (c, body, first) in [(&mut alice, &body_a, &a), (&mut bob, &body_b, &b)] {
        let again = c
            .conn
            .create_connection(create(body.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (again.id.as_str(), again.revision),
            (first.id.as_str(), first.revision)
        );
    }
    // Within one caller, the id is still bound to its body.
    let r = alice.conn.create_connection(create(body_b.clone())).await;
    expect_code(r, Code::InvalidArgument, "REQUEST_ID_REUSED");

    // Transitions: alice's request id does not answer bob, on her
    // connection (not found to him) or on his.
    let ignore = |id: &str| pb::TransitionConnectionRequest {
        id: id.into(),
        target_state: S::Ignored as i32,
        request_id: "move-id".into(),
        ..Default::default()
    };
    let moved = alice
        .conn
        .transition_connection(ignore(&a.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.state, S::Ignored as i32);
    let r = bob.conn.transition_connection(ignore(&a.id)).await;
    expect_code(r, Code::NotFound, "CONNECTION_NOT_FOUND");
    let his = bob
        .conn
        .transition_connection(ignore(&b.id))
        .await
        .expect("bob's own move")
        .into_inner();
    assert_eq!(
        (his.id.as_str(), his.state),
        (b.id.as_str(), S::Ignored as i32)
    );
}

#[tokio::test]
async fn the_actor_is_the_authenticated_principal_whatever_the_header_says() {
    let s = Secured::start(|_| {}).await;
    let mut alice = s.client("alice");
    let mut request = tonic::Request::new(pb::CreateConnectionRequest {
        connection: Some(conn("http", "")),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("tether-actor", "root".parse().unwrap());
    let made = alice
        .conn
        .create_connection(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.owner, "alice");
    let mut request = tonic::Request::new(pb::TransitionConnectionRequest {
        id: made.id.clone(),
        target_state: S::Ignored as i32,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("tether-actor", "tether".parse().unwrap());
    alice.conn.transition_connection(request).await.unwrap();
    let events = alice
        .conn
        .list_connection_events(pb::ListConnectionEventsRequest {
            connection_id: made.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        events.iter().map(|e| e.actor.as_str()).collect::<Vec<_>>(),
        ["alice", "alice"]
    );
    // Nor does the header stand in for a token.
    let mut request = tonic::Request::new(pb::ListConnectionsRequest::default());
    request
        .metadata_mut()
        .insert("tether-actor", "root".parse().unwrap());
    let r = s.client("anon").conn.list_connections(request).await;
    expect_code(r, Code::Unauthenticated, "UNAUTHENTICATED");
}

// ---- 4. limits per principal ----

#[tokio::test]
async fn the_request_rate_is_limited_per_principal() {
    let s = Secured::start(|c| c.rate_limit = 3).await;
    let mut alice = s.client("alice");
    let count = |c: &mut As| {
        let mut c = c.conn.clone();
        async move {
            c.count_connections(pb::CountConnectionsRequest::default())
                .await
        }
    };
    // GCRA: a burst of 3 from a full bucket, then one more every 1/3 s.
    let start = Instant::now();
    let mut passed = 0;
    let refusal = loop {
        match count(&mut alice).await {
            Ok(_) => passed += 1,
            Err(status) => break status,
        }
        assert!(passed < 100, "never limited");
    };
    let elapsed = start.elapsed();
    assert!(passed >= 3, "the burst is the rate: {passed}");
    let earned = (elapsed.as_secs_f64() * 3.0).ceil() as usize;
    assert!(passed <= 3 + earned, "{passed} calls in {elapsed:?}");
    let (code, reason, _) = error_info(&refusal);
    assert_eq!(
        (code, reason.as_str()),
        (Code::ResourceExhausted, "RATE_LIMITED")
    );
    let retry = refusal
        .get_error_details()
        .retry_info()
        .expect("RetryInfo")
        .retry_delay
        .expect("a delay");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    // Another principal has its own budget; health is not counted.
    count(&mut s.client("bob"))
        .await
        .expect("bob is not limited");
    s.client("alice")
        .health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is not rate limited");
}

#[tokio::test]
async fn open_watches_are_capped_per_principal() {
    let s = Secured::start(|c| c.max_watches = 2).await;
    let mut alice = s.client("alice");
    let all = pb::WatchConnectionsRequest::default;
    let first = watch(&mut alice, all()).await.expect("first");
    let mut second = watch(&mut alice, all()).await.expect("second");
    let r = watch(&mut alice, all()).await;
    let status = expect_code(r, Code::ResourceExhausted, "RESOURCE_EXHAUSTED");
    assert!(status.message().contains('2'), "{status:?}");
    let mut bobs = watch(&mut s.client("bob"), all())
        .await
        .expect("bob may watch");
    assert!(snapshot(&mut bobs).await.is_empty());

    // Closing one frees its slot once the server sees the stream gone; the
    // cancel travels on the same connection, so a few attempts suffice.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut third = loop {
        match watch(&mut alice, all()).await {
            Ok(w) => break w,
            Err(status) => {
                expect_code(
                    Err::<(), _>(status),
                    Code::ResourceExhausted,
                    "RESOURCE_EXHAUSTED",
                );
                assert!(Instant::now() < deadline, "the slot was never freed");
                tokio::task::yield_now().await;
            }
        }
    };
    // Both open ones still work, and the cap holds again.
    assert!(snapshot(&mut second).await.is_empty());
    assert!(snapshot(&mut third).await.is_empty());
    let r = watch(&mut alice, all()).await;
    expect_code(r, Code::ResourceExhausted, "RESOURCE_EXHAUSTED");
}

// ---- 5. reloading the access file ----

/// Waits until `check` holds for a call made with `token`. The server polls
/// the access file every [`RELOAD`]; nothing observable tells when it has
/// read it, so this retries a call, sleeping 100 ms between tries, for at
/// most 15 s: a wait on file polling, not on anything the test could await.
async fn until(
    s: &Secured,
    token: &str,
    check: impl Fn(&Result<BTreeSet<String>, tonic::Status>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = listed(&mut As::new(&s.app.channel, Some(token))).await;
        if check(&r) {
            return;
        }
        assert!(Instant::now() < deadline, "not reloaded within 15 s: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_access_file_is_reloaded_and_a_bad_edit_keeps_the_last_good_one() {
    let s = Secured::start(|_| {}).await;
    let alices = make(&mut s.client("root"), labelled("http", "", "alice", "r"))
        .await
        .id;
    let newcomer = new_token("newcomer");
    let r = listed(&mut As::new(&s.app.channel, Some(&newcomer))).await;
    expect_code(r, Code::Unauthenticated, "UNAUTHENTICATED");

    let extra: &[(&str, &str, &[&str])] = &[("newcomer", &newcomer, &["viewer"])];
    write_atomically(&s.file, &access_file(&grants(&s.tokens, extra)));
    until(&s, &newcomer, |r| r.is_ok()).await;

    // A bad edit is refused as a whole: the old table stays. The poll
    // gives no sign that it read the file, so the old tokens are checked
    // over several poll periods.
    write_atomically(&s.file, "tokens: [{principal: alice, sha256: nothex}\n");
    let until_polled = Instant::now() + RELOAD * 4;
    while Instant::now() < until_polled {
        for who in ["alice", "root"] {
            listed(&mut s.client(who))
                .await
                .expect("old tokens still work");
        }
        listed(&mut As::new(&s.app.channel, Some(&newcomer)))
            .await
            .expect("as does the one added last");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A good edit after it is read again: dropping the newcomer revokes it,
    // and narrowing vera's owners narrows what she sees.
    let mut vera = s.client("vera");
    assert_eq!(listed(&mut vera).await.unwrap(), [alices.clone()].into());
    let mut veras_watch = watch(&mut vera, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    assert_eq!(snapshot(&mut veras_watch).await, [alices.clone()].into());
    let mut narrowed = grants(&s.tokens, &[]);
    narrowed
        .iter_mut()
        .filter(|g| g.principal == "vera")
        .for_each(|g| g.owners = &[]);
    write_atomically(&s.file, &access_file(&narrowed));
    until(&s, &newcomer, |r| {
        r.as_ref()
            .err()
            .is_some_and(|e| e.code() == Code::Unauthenticated)
    })
    .await;
    assert_eq!(listed(&mut vera).await.unwrap(), BTreeSet::new());
    // Her watch, opened under the old scope, ends rather than go on showing it.
    let ended = tokio::time::timeout(Duration::from_secs(10), veras_watch.message())
        .await
        .expect("the watch answers within 10 s");
    expect_code(ended, Code::PermissionDenied, "PERMISSION_DENIED");
    let r = vera
        .conn
        .get_connection(pb::GetConnectionRequest { id: alices.clone() })
        .await;
    expect_code(r, Code::NotFound, "CONNECTION_NOT_FOUND");
    assert_eq!(
        listed(&mut s.client("alice")).await.expect("alice stays"),
        [alices].into()
    );
}

// ---- found wrong by these tests, and fixed ----

#[tokio::test]
async fn deleting_a_connection_leaves_a_credential_outside_the_callers_scope() {
    let s = Secured::start(|_| {}).await;
    let (mut root, mut alice) = (s.client("root"), s.client("alice"));
    let bobs = credential(&mut root, "bob", &["*.example"])
        .await
        .unwrap()
        .id;
    // An admin may attach bob's credential to a connection of alice's.
    let made = make(
        &mut root,
        pb::Connection {
            owner: "alice".into(),
            credential_id: bobs.clone(),
            ..conn("http", "https://shared.example/")
        },
    )
    .await;
    // Alice may not delete bob's credential herself ...
    let r = alice
        .creds
        .delete_credential(pb::DeleteCredentialRequest { id: bobs.clone() })
        .await;
    expect_code(r, Code::PermissionDenied, "PERMISSION_DENIED");
    // ... nor, through her connection, as a side effect.
    alice
        .conn
        .delete_connection(pb::DeleteConnectionRequest {
            id: made.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        credential_ids(&mut root).await.unwrap().contains(&bobs),
        "bob's credential was deleted by alice"
    );
}

#[tokio::test]
async fn an_edit_right_after_start_is_not_missed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.yaml");
    let root = new_token("root");
    let newcomer = new_token("newcomer");
    let grant = |p, t, r| Grant {
        principal: p,
        token: t,
        roles: r,
        owners: &[],
    };
    write_atomically(&file, &access_file(&[grant("root", &root, &["admin"])]));
    let path = file.clone();
    let app = App::start_with(move |c| {
        c.auth_file = Some(path);
        c.reload_interval = RELOAD;
    })
    .await;
    // Edited as soon as the server is up (as it would be while a slow start
    // opens and migrates the database after reading the file).
    write_atomically(
        &file,
        &access_file(&[
            grant("root", &root, &["admin"]),
            grant("newcomer", &newcomer, &["viewer"]),
        ]),
    );
    let s = Secured {
        app,
        _dir: dir,
        file,
        tokens: HashMap::new(),
    };
    until(&s, &newcomer, |r| r.is_ok()).await;
}

#[tokio::test]
async fn revoking_a_token_ends_its_open_watches() {
    let s = Secured::start(|_| {}).await;
    let newcomer = new_token("newcomer");
    let extra: &[(&str, &str, &[&str])] = &[("newcomer", &newcomer, &["viewer"])];
    write_atomically(&s.file, &access_file(&grants(&s.tokens, extra)));
    until(&s, &newcomer, |r| r.is_ok()).await;
    let mut w = watch(
        &mut As::new(&s.app.channel, Some(&newcomer)),
        pb::WatchConnectionsRequest::default(),
    )
    .await
    .unwrap();
    assert!(snapshot(&mut w).await.is_empty());
    write_atomically(&s.file, &access_file(&grants(&s.tokens, &[])));
    until(&s, &newcomer, |r| {
        r.as_ref()
            .err()
            .is_some_and(|e| e.code() == Code::Unauthenticated)
    })
    .await;
    // Something the revoked principal would see, made after it lost access.
    make(&mut s.client("root"), labelled("http", "", "newcomer", "x")).await;
    let after = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("the stream answers within 10 s");
    let status = after.expect_err("the stream ends with an error, not another change");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn a_credential_in_use_does_not_name_a_connection_out_of_scope() {
    let s = Secured::start(|_| {}).await;
    let mut root = s.client("root");
    let carls = credential(&mut root, "carl", &["*.example"])
        .await
        .unwrap()
        .id;
    let made = make(
        &mut root,
        pb::Connection {
            owner: "alice".into(),
            credential_id: carls.clone(),
            ..conn("http", "https://shared.example/")
        },
    )
    .await;
    let r = s
        .client("carl")
        .creds
        .delete_credential(pb::DeleteCredentialRequest { id: carls.clone() })
        .await;
    let status = expect_code(r, Code::FailedPrecondition, "CREDENTIAL_IN_USE");
    let (_, _, metadata) = error_info(&status);
    assert!(
        !format!("{status:?} {metadata:?}").contains(&made.id),
        "carl learns the id of alice's connection: {metadata:?}"
    );
}
