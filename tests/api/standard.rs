//! The standard services: server reflection (v1 and v1alpha) and health.

use crate::common::*;
use tonic_reflection::pb::{v1, v1alpha};

#[tokio::test]
async fn reflection_v1_lists_services_and_resolves_error_details() {
    let app = App::start().await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let ask = |r: v1::server_reflection_request::MessageRequest| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r),
    };
    let requests = vec![
        ask(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ask(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "google.rpc.ErrorInfo".into(),
            ),
        ),
    ];
    let mut replies = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection v1")
        .into_inner();
    let listed = replies.message().await.unwrap().unwrap();
    let names: Vec<String> = match listed.message_response.unwrap() {
        v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("{other:?}"),
    };
    for want in ["tether.v1.ConnectionService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    match replies
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
    {
        v1::server_reflection_response::MessageResponse::FileDescriptorResponse(f) => {
            assert!(!f.file_descriptor_proto.is_empty())
        }
        other => panic!("google.rpc.ErrorInfo is resolvable: {other:?}"),
    }
}

#[tokio::test]
async fn reflection_v1alpha_lists_services() {
    let app = App::start().await;
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    match replies
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
    {
        v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            assert!(
                l.service
                    .iter()
                    .any(|s| s.name == "tether.v1.ConnectionService")
            );
        }
        other => panic!("{other:?}"),
    }
}
