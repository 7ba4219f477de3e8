//! The egress policy seen through the API: a verification never connects to
//! a destination the policy denies, however the url names it, and says so.
//! Every peer here is on loopback: 127.0.0.1 is allowed and 127.0.0.2 (also
//! loopback) is the denied address, so nothing can leave the machine even
//! if the policy failed.

use crate::common::*;
use std::net::IpAddr;
use std::sync::Arc;
use tether::config::InjectedResolver;
use tether::probe::StubResolver;
use tokio::net::TcpListener;
use tonic::Code;

/// A server denying 127.0.0.2, where `rebind.test` resolves to 127.0.0.2
/// and `ok.test` to 127.0.0.1.
async fn guarded_app() -> App {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let names = StubResolver::new()
        .with("rebind.test", &[ip("127.0.0.2")])
        .with("ok.test", &[ip("127.0.0.1")]);
    App::start_with(|c| {
        c.egress_deny = vec!["127.0.0.2/32".into()];
        c.resolver = Some(InjectedResolver(Arc::new(names)));
    })
    .await
}

/// Whether nothing but our own sentinel connection reached `listener`: the
/// backlog is accepted in arrival order, so the first connection accepted
/// after the checks is ours only if no check came before it.
async fn only_the_sentinel_arrived(listener: &TcpListener) -> bool {
    let sentinel = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (_, from) = listener.accept().await.unwrap();
    from == sentinel.local_addr().unwrap()
}

#[tokio::test]
async fn a_verification_never_reaches_a_denied_address() {
    let app = guarded_app().await;
    let mut c = app.client.clone();
    let denied = TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let port = denied.local_addr().unwrap().port();

    for url in [
        format!("tcp://127.0.0.2:{port}"),
        format!("tcp://[::ffff:127.0.0.2]:{port}"),
        // DNS rebinding: the name is harmless, the address it resolves to is not.
        format!("tcp://rebind.test:{port}"),
    ] {
        let made = create(&mut c, conn("tcp", &url)).await;
        let r = transition(&mut c, &made.id, S::Registered).await;
        let meta = assert_error(r, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
        assert!(
            meta["detail"].ends_with("denied by egress policy"),
            "{url}: {meta:?}"
        );
    }
    assert!(
        only_the_sentinel_arrived(&denied).await,
        "a check connected"
    );
}

#[tokio::test]
async fn a_verification_reaches_an_allowed_address() {
    let app = guarded_app().await;
    let mut c = app.client.clone();
    let open = OpenPort::new().await;
    let port = open.addr.port();
    for url in [open.url(), format!("tcp://ok.test:{port}")] {
        let made = create(&mut c, conn("tcp", &url)).await;
        let registered = transition(&mut c, &made.id, S::Registered)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}"));
        assert_eq!(registered.state, S::Registered as i32, "{url}");
    }
}

#[tokio::test]
async fn an_unreadable_rule_stops_the_server_at_start() {
    let mut config = test_config();
    let dir = tempfile::tempdir().unwrap();
    config.db = Some(dir.path().join("tether.db"));
    config.egress_deny = vec!["10.0.0.0/33".into()];
    let err = tether::server::Server::open(config)
        .await
        .err()
        .expect("a bad rule is refused");
    let text = err.to_string();
    assert!(
        text.contains("egress-deny") && text.contains("10.0.0.0/33"),
        "{text}"
    );
}

#[tokio::test]
async fn a_failed_verification_names_the_failure_not_the_peers_words() {
    let app = guarded_app().await;
    let mut c = app.client.clone();
    let closed = ClosedPort::new();
    for (kind, url) in [
        ("tcp", format!("tcp://{}", closed.addr)),
        ("http", format!("http://{}/", closed.addr)),
        ("tcp", format!("tcp://nowhere.test:{}", closed.addr.port())),
    ] {
        let made = create(&mut c, conn(kind, &url)).await;
        let r = transition(&mut c, &made.id, S::Registered).await;
        let meta = assert_error(r, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
        let detail = &meta["detail"];
        assert!(
            detail.contains(": refused after ") || detail.ends_with(": name did not resolve"),
            "{url}: {detail}"
        );
        assert!(
            !detail.contains("os error") && !detail.contains("Connection refused"),
            "{url}: {detail}"
        );
    }
}
