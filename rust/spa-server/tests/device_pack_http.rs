//! `GET /v1/device-pack` at the HTTP level: key required, strong ETag and 304, byte ranges
//! (206 / 416), the manifest's sha256 and size, 404 when no pack is published.

mod common;
use common::*;
use spa_protocol::{decode_frame, FrameKind, Limits, Manifest};
use spa_server::AppState;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_pack_http_semantics() {
    let w = world();
    // The server serves the bytes as they are: any content exercises the HTTP layer.
    let pack: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let sha = spa_model::sha256_hex(&pack);
    let state = Arc::new(
        AppState::new(w.base.clone(), w.proj.clone(), config()).with_device_pack(pack.clone()),
    );
    let srv = spa_server::start(state, "127.0.0.1:0".parse().unwrap(), Some(&w.cert))
        .await
        .unwrap();
    let url = format!("{}/v1/device-pack", srv.url());
    let http = http();

    let m = http
        .get(format!("{}/v1/model", srv.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let m: Manifest = decode_frame(&m, FrameKind::Manifest, &Limits::default()).unwrap();
    assert_eq!(
        (m.device_pack_sha256.as_str(), m.device_pack_bytes),
        (sha.as_str(), 100_000)
    );

    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401, "no key");

    let r = http.get(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{sha}\""));
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.bytes().await.unwrap(), pack);

    let r = http
        .get(&url)
        .bearer_auth(KEY)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await.unwrap().is_empty());

    let r = http
        .get(&url)
        .bearer_auth(KEY)
        .header("range", "bytes=99990-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 99990-99999/100000");
    assert_eq!(r.bytes().await.unwrap(), pack[99_990..]);

    let r = http
        .get(&url)
        .bearer_auth(KEY)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), pack[10..20]);

    let r = http
        .get(&url)
        .bearer_auth(KEY)
        .header("range", "bytes=100000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */100000");

    // No pack published: 404, and the manifest says so.
    let (plain, _) = start(config(), true).await;
    let r = http
        .get(format!("{}/v1/device-pack", plain.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
