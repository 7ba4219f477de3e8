//! A Rust client of the API, as the README shows it: create, a refused move
//! and its ErrorInfo, a watch to SYNCED, delete. Run it against a server with
//! `cargo run --example client` (TETHER_ENDPOINT, default 127.0.0.1:50051).

use tether::pb::tether::v1 as pb;
use tether::pb::tether::v1::connection_service_client::ConnectionServiceClient;
use tonic_types::StatusExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("TETHER_ENDPOINT").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let mut client = ConnectionServiceClient::connect(format!("http://{addr}")).await?;

    // The server's own port is really reachable: the check before REGISTERED passes.
    let conn = client
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(pb::Connection {
                kind: "tcp".into(),
                url: format!("tcp://{addr}"),
                name: "from rust".into(),
                ..Default::default()
            }),
            initial_state: pb::ConnectionState::Registered.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("created {}", conn.state().as_str_name());

    // A refused move carries a google.rpc.ErrorInfo in its status details.
    let refused = client
        .transition_connection(pb::TransitionConnectionRequest {
            id: conn.id.clone(),
            target_state: pb::ConnectionState::Discovered.into(),
            ..Default::default()
        })
        .await
        .expect_err("DISCOVERED is not a move a user may make from REGISTERED");
    if let Some(info) = refused.get_details_error_info() {
        let (code, allowed) = (refused.code(), &info.metadata["allowed"]);
        println!("refused {code:?} {} allowed: {allowed}", info.reason);
    }

    // A snapshot of what matches, SYNCED, then every change as it happens.
    let mut watch = client
        .watch_connections(pb::WatchConnectionsRequest {
            ids: vec![conn.id.clone()],
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(msg) = watch.message().await? {
        let name = msg.connection.as_ref().map_or("", |c| c.name.as_str());
        println!("watch {} {name}", msg.r#type().as_str_name());
        if msg.r#type() == pb::WatchEventType::Synced {
            break;
        }
    }

    let gone = client
        .delete_connection(pb::DeleteConnectionRequest {
            id: conn.id,
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("deleted {}", gone.state().as_str_name());
    Ok(())
}
