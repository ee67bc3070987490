//! TLS trust problems are configuration errors with a reason that says what to do, not
//! "network error" after every retry: a self-signed server without its certificate, and a
//! certificate given as a file path instead of its PEM text.

mod common;
use common::*;
use spa_runtime::{Client, ClientConfig, RuntimeError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificates_and_non_pem_roots_are_config_errors() {
    let (srv, _) = start_server(server_config()).await;
    // No extra root: the dev server's self-signed certificate is not trusted.
    let c = Client::new(ClientConfig::new(srv.url(), KEY)).unwrap();
    match c.manifest().await {
        Err(RuntimeError::Config(m)) => assert!(m.contains("not trusted"), "{m}"),
        other => panic!("expected a TLS trust error, got {other:?}"),
    }
    assert_eq!(
        c.traffic
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "a trust error was retried"
    );
    // A file path where the PEM text belongs.
    let mut cfg = ClientConfig::new(srv.url(), KEY);
    cfg.extra_root_pem = Some("/data/user/0/app/files/dev-cert.pem".into());
    match Client::new(cfg) {
        Err(RuntimeError::Config(m)) => assert!(m.contains("no PEM certificate"), "{m}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    // The right certificate works.
    assert!(client(&srv.url(), KEY).manifest().await.is_ok());
}
