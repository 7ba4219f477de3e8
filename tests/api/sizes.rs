//! Requests too large to serve, over the real gRPC surface: a message over
//! the limit and metadata over the limit answer RESOURCE_EXHAUSTED with the
//! size and the limit (metadata before the caller is authenticated), exactly
//! at the limits they are served, and metadata past the HTTP/2 limit fails
//! the call while the server goes on.

use crate::common::*;
use prost::Message;
use tether::pb::tether::v1 as pb;
use tether::service::sizes::{HTTP2_MAX_HEADER_LIST, MAX_MESSAGE_BYTES, MAX_METADATA_BYTES};
use tonic::Code;

/// A `GetConnectionRequest` whose encoding is exactly `size` bytes.
fn get_of_size(size: usize) -> pb::GetConnectionRequest {
    let mut id_len = size;
    loop {
        let r = pb::GetConnectionRequest {
            id: "x".repeat(id_len),
        };
        match r.encoded_len() {
            n if n == size => return r,
            n if n > size => id_len -= n - size,
            _ => panic!("no GetConnectionRequest encodes to {size} bytes"),
        }
    }
}

#[tokio::test]
async fn a_request_message_over_the_limit_is_resource_exhausted_and_says_the_size_and_limit() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let over = MAX_MESSAGE_BYTES + 1;
    let status = c
        .get_connection(get_of_size(over))
        .await
        .expect_err("refused");
    let (code, reason, metadata) = error_info(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::ResourceExhausted, "MESSAGE_TOO_LARGE"),
        "{status:?}"
    );
    assert_eq!(metadata["size"], over.to_string());
    assert_eq!(metadata["limit"], MAX_MESSAGE_BYTES.to_string());
    assert!(
        status.message().contains(&over.to_string())
            && status.message().contains(&MAX_MESSAGE_BYTES.to_string()),
        "the message says the size and the limit: {:?}",
        status.message()
    );

    // A server-streaming call and health (which needs no caller) alike.
    let r = c
        .watch_connections(pb::WatchConnectionsRequest {
            ids: vec!["x".repeat(MAX_MESSAGE_BYTES)],
            ..Default::default()
        })
        .await;
    expect_code(r, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    let r = tonic_health::pb::health_client::HealthClient::new(app.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "x".repeat(MAX_MESSAGE_BYTES),
        })
        .await;
    expect_code(r, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");

    // Exactly at the limit the message is decoded and the handler answers
    // (an id that long is not an id).
    let r = c.get_connection(get_of_size(MAX_MESSAGE_BYTES)).await;
    let field = invalid_field(r);
    assert_eq!(field, "id");

    // The refusals cost the client nothing but the call.
    create(&mut c, conn("http", "")).await;
}

/// A server with authentication on and one operator; its token.
async fn secured() -> (App, tempfile::TempDir, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let token = format!("alice-{}", uuid::Uuid::new_v4().simple());
    let file = dir.path().join("access.yaml");
    let text = access_file(&[Grant {
        principal: "alice",
        token: &token,
        roles: &["operator"],
        owners: &[],
    }]);
    std::fs::write(&file, text).expect("write access file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let app = App::start_with(move |c| c.auth_file = Some(file)).await;
    (app, dir, token)
}

/// `ListConnections` as `token` (none: anonymous) with one more header,
/// `x-padding`, of `padding` bytes.
async fn list_padded(app: &App, token: Option<&str>, padding: usize) -> Result<(), tonic::Status> {
    let mut c = As::new(&app.channel, token).conn;
    let mut request = tonic::Request::new(pb::ListConnectionsRequest::default());
    request
        .metadata_mut()
        .insert("x-padding", "p".repeat(padding).parse().unwrap());
    c.list_connections(request).await.map(|_| ())
}

/// The `size` a METADATA_TOO_LARGE refusal reports.
fn refused_size(r: Result<(), tonic::Status>) -> usize {
    let status = expect_code(r, Code::ResourceExhausted, "METADATA_TOO_LARGE");
    let (_, _, metadata) = error_info(&status);
    assert_eq!(metadata["limit"], MAX_METADATA_BYTES.to_string());
    assert!(
        status.message().contains(&MAX_METADATA_BYTES.to_string()),
        "{status:?}"
    );
    metadata["size"].parse().expect("a size")
}

#[tokio::test]
async fn request_metadata_over_the_limit_is_resource_exhausted_before_authentication() {
    let (app, _dir, token) = secured().await;
    // Without a token a call is refused by the gate; with a header that
    // takes the metadata over the limit, before the gate.
    let r = list_padded(&app, None, 100).await;
    expect_code(r, Code::Unauthenticated, "UNAUTHENTICATED");
    let size = refused_size(list_padded(&app, None, MAX_METADATA_BYTES).await);
    assert!(size > MAX_METADATA_BYTES, "{size}");
    // Health, which asks for no caller, is held to it too.
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let mut check = tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());
    check
        .metadata_mut()
        .insert("x-padding", "p".repeat(MAX_METADATA_BYTES).parse().unwrap());
    let r = health.check(check).await;
    expect_code(r, Code::ResourceExhausted, "METADATA_TOO_LARGE");

    // The boundary, for a caller with a token: what the refusal reports is
    // the padding plus everything else the client sends, so the padding
    // that brings the total to the limit exactly is known.
    let size = refused_size(list_padded(&app, Some(&token), MAX_METADATA_BYTES).await);
    let others = size - MAX_METADATA_BYTES;
    let fits = MAX_METADATA_BYTES - others;
    list_padded(&app, Some(&token), fits)
        .await
        .expect("metadata of exactly the limit is served");
    let one_over = refused_size(list_padded(&app, Some(&token), fits + 1).await);
    assert_eq!(one_over, MAX_METADATA_BYTES + 1);
}

/// `GetConnection` of `id` with one more header, `x-padding`, of `padding` bytes.
async fn get_padded(c: &mut Client, id: &str, padding: usize) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(pb::GetConnectionRequest { id: id.into() });
    request
        .metadata_mut()
        .insert("x-padding", "p".repeat(padding).parse().unwrap());
    c.get_connection(request).await.map(|_| ())
}

#[tokio::test]
async fn metadata_past_the_http2_limit_fails_the_call_and_the_server_goes_on() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let before = create(&mut c, conn("http", "")).await;
    let limit = HTTP2_MAX_HEADER_LIST as usize;
    // Between our limit and the HTTP/2 one: our answer.
    let r = get_padded(&mut c, &before.id, limit - 1024).await;
    expect_code(r, Code::ResourceExhausted, "METADATA_TOO_LARGE");
    // Past it, HTTP/2 refuses the stream itself (HTTP 431): no status of
    // ours, and the connection goes on serving.
    let status = get_padded(&mut c, &before.id, limit + 1024)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(status.message().contains("431"), "{status:?}");
    assert_eq!(get(&mut c, &before.id).await, before);
    // Far past it, HTTP/2 closes the connection (GOAWAY); the client's
    // next call connects again and is served.
    get_padded(&mut c, &before.id, 4 * limit + 1024)
        .await
        .expect_err("refused");
    assert_eq!(get(&mut c, &before.id).await, before);
}
