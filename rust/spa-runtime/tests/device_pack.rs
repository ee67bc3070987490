//! The device pack through a real HTTPS server on loopback: the first fetch downloads it with
//! progress, the second reuses it, a damaged cached file is fetched again, a part left by an
//! interrupted download is resumed with a Range request (also after a connection cut mid-body
//! by the netsim proxy), and the device model built from it matches the server.

mod common;
use common::*;
use spa_model::{DevicePack, GateMode, GgufFile, PersonalVocab, QuantMode};
use spa_runtime::netsim::{Fault, FaultPlan, NetConfig, Proxy};
use spa_runtime::{ClientConfig, DeviceModel, RuntimeError};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

fn pack_bytes() -> Vec<u8> {
    let w = world();
    let g = GgufFile::read(model_path()).unwrap();
    spa_model::build_device_pack(&g, w.proj.fingerprint(), QuantMode::Q8).unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("spa-pack-dl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_pack_downloads_resumes_verifies_and_is_reused() {
    let w = world();
    let bytes = pack_bytes();
    let total = bytes.len() as u64;
    let state = Arc::new(common::state(server_config()).with_device_pack(bytes.clone()));
    let srv = spa_server::start(state.clone(), "127.0.0.1:0".parse().unwrap(), Some(&w.cert))
        .await
        .unwrap();
    let c = client(&srv.url(), KEY);
    let m = c.manifest().await.unwrap();
    assert_eq!(m.device_pack_bytes, total);
    assert_eq!(m.device_pack_sha256, spa_model::sha256_hex(&bytes));
    let dir = scratch("main");

    // 1. First connect: downloaded, with progress up to the total.
    let mut seen = Vec::new();
    let path = c
        .device_pack(&m, &dir, &mut |d, t| seen.push((d, t)))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(
        seen.len() > 2 && seen.windows(2).all(|p| p[1].0 >= p[0].0),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&(total, total)));
    let down = c.traffic.down.load(Relaxed);
    assert!(down >= total, "{down} < {total}");
    let pack = DevicePack::load_verified(&path, &m.device_pack_sha256).unwrap();
    let dev = DeviceModel::from_pack(
        &pack,
        &w.plugin,
        QuantMode::Q8,
        GateMode::Learned,
        PersonalVocab::default(),
    )
    .unwrap();
    dev.check_manifest(&m).unwrap();
    // The same tokens and head rows as the device built from the base itself.
    let reference = device(GateMode::Learned, &[]);
    let text = "The capital of France is Paris.";
    assert_eq!(
        dev.tokenizer.encode(text).unwrap(),
        reference.tokenizer.encode(text).unwrap()
    );
    let h: Vec<f32> = (0..576)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
        .collect();
    assert_eq!(dev.head.full(&h).unwrap(), reference.head.full(&h).unwrap());

    // 2. Second connect: the cached pack, no request.
    let before = (
        c.traffic.requests.load(Relaxed),
        c.traffic.down.load(Relaxed),
    );
    let mut seen = Vec::new();
    assert_eq!(
        c.device_pack(&m, &dir, &mut |d, t| seen.push((d, t)))
            .await
            .unwrap(),
        path
    );
    assert_eq!(
        (
            c.traffic.requests.load(Relaxed),
            c.traffic.down.load(Relaxed)
        ),
        before
    );
    assert_eq!(seen, [(total, total)]);

    // 3. A damaged cached pack is detected and fetched again.
    let mut damaged = bytes.clone();
    damaged[1000] ^= 0x20;
    std::fs::write(&path, &damaged).unwrap();
    let d0 = c.traffic.down.load(Relaxed);
    c.device_pack(&m, &dir, &mut |_, _| {}).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(c.traffic.down.load(Relaxed) - d0 >= total);

    // 4. A part left by an interrupted download is resumed from where it stopped.
    std::fs::remove_file(&path).unwrap();
    let third = bytes.len() / 3;
    std::fs::write(
        dir.join(format!("{}.part", m.device_pack_sha256)),
        &bytes[..third],
    )
    .unwrap();
    let d0 = c.traffic.down.load(Relaxed);
    let mut first = None;
    c.device_pack(&m, &dir, &mut |d, _| {
        first.get_or_insert(d);
    })
    .await
    .unwrap();
    assert_eq!(
        first,
        Some(third as u64),
        "did not resume at the part's length"
    );
    let fetched = c.traffic.down.load(Relaxed) - d0;
    assert_eq!(
        fetched,
        total - third as u64,
        "resumed download fetched {fetched} bytes"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(!dir.join(format!("{}.part", m.device_pack_sha256)).exists());

    // 5. A connection cut mid-body (netsim proxy): the retry resumes and the pack is whole.
    std::fs::remove_file(&path).unwrap();
    let cfg = NetConfig {
        faults: FaultPlan::Schedule(vec![(1, Fault::Truncate)]),
        // A burst of 64 KiB counts as the (first) response: the cut lands inside the body.
        min_response_bytes: 64 * 1024,
        ..NetConfig::default()
    };
    let proxy = Proxy::start(srv.addr, cfg).await.unwrap();
    let mut cc = ClientConfig::new(format!("https://{}", proxy.addr), KEY);
    cc.extra_root_pem = Some(w.cert.cert_pem.clone());
    cc.backoff = Duration::from_millis(10);
    let pc = spa_runtime::Client::new(cc).unwrap();
    let got = pc.device_pack(&m, &dir, &mut |_, _| {}).await.unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), bytes);
    assert!(proxy.stats.faults() >= 1, "the proxy injected no fault");
    assert!(
        pc.traffic.requests.load(Relaxed) >= 2,
        "no retry after the cut"
    );

    // 6. A server without a pack: a typed error, nothing written.
    let (plain, _) = start_server(server_config()).await;
    let pc = client(&plain.url(), KEY);
    let pm = pc.manifest().await.unwrap();
    assert!(pm.device_pack_sha256.is_empty());
    let empty = scratch("none");
    assert!(matches!(
        pc.device_pack(&pm, &empty, &mut |_, _| {}).await,
        Err(RuntimeError::Incompatible(_))
    ));
    // A manifest naming a pack the server does not have: NotFound is Incompatible too.
    let mut fake = pm.clone();
    fake.device_pack_sha256 = "ab".repeat(32);
    fake.device_pack_bytes = 10;
    assert!(matches!(
        pc.device_pack(&fake, &empty, &mut |_, _| {}).await,
        Err(RuntimeError::Incompatible(_))
    ));
    // A wrong key is Unauthorized.
    let bad = client(&srv.url(), "not-a-key");
    assert!(matches!(
        bad.device_pack(&m, &scratch("key"), &mut |_, _| {}).await,
        Err(RuntimeError::Unauthorized)
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
