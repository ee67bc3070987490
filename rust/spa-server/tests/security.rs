//! Security properties of the server, each against a real server on loopback (TLS unless a
//! test needs raw plain-HTTP framing): TLS-only port, constant-time key check, session isolation
//! between keys, limits (K, positions, frame size, sessions per key with Retry-After), and
//! timeouts for slow or oversized requests (slow loris on headers and on bodies, silent TLS
//! connections).

mod common;

use common::{create, error_frame, http, step_body, text, KEY, OTHER_KEY};
use spa_protocol::{ErrorCode, Limits};
use spa_server::{Keys, ServerConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Reads from `s` until EOF, an error or `limit`; returns the bytes and how long it took.
fn read_until_closed(s: &mut impl Read, limit: Duration) -> (Vec<u8>, Duration) {
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => break,
        }
    }
    (out, t0.elapsed())
}

fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// A blocking TLS (HTTP/1.1) connection to the server.
fn tls_conn(addr: SocketAddr) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut cfg = common::rustls_client_config();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, raw(addr));
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_port_speaks_no_plain_http() {
    let (srv, state) = common::start(common::config(), true).await;
    assert!(srv.url().starts_with("https://"));
    let addr = srv.addr;
    let (got, _) = tokio::task::spawn_blocking(move || {
        let mut s = raw(addr);
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        read_until_closed(&mut s, Duration::from_secs(15))
    })
    .await
    .unwrap();
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "the TLS port answered plain HTTP: {got:?}"
    );
    // The same request over TLS works.
    let r = http()
        .get(format!("{}/healthz", srv.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(state.metrics.rounds.load(Relaxed), 0);
    srv.shutdown().await;
}

#[test]
fn key_check_visits_every_key() {
    // 2,000 keys: an early-exit comparison would answer the first key ~2,000x faster than the
    // last. The check hashes the presented key and folds over every stored digest, so both
    // take the same time (min over many runs; a generous factor for a shared machine).
    let keys: Vec<String> = (0..2000).map(|i| format!("key-{i:05}")).collect();
    let k = Keys::new(&keys);
    let first = format!("Bearer {}", keys[0]);
    let last = format!("Bearer {}", keys[1999]);
    assert_eq!(k.check(Some(&first)), Some(0));
    assert_eq!(k.check(Some(&last)), Some(1999));
    assert_eq!(k.check(Some("Bearer key-0000")), None);
    let time = |h: &str| {
        (0..200)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(k.check(Some(std::hint::black_box(h))));
                t.elapsed()
            })
            .min()
            .unwrap()
    };
    let (a, b, c) = (time(&first), time(&last), time("Bearer nope"));
    eprintln!("key check: first {a:?}, last {b:?}, unknown {c:?}");
    for (x, y) in [(a, b), (a, c), (b, c)] {
        let r = x.as_secs_f64() / y.as_secs_f64();
        assert!(
            (0.33..3.0).contains(&r),
            "timing depends on the key: {x:?} vs {y:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_isolated_between_keys() {
    let (srv, state) = common::start(common::config(), true).await;
    let (url, h) = (srv.url(), http());
    let (_, id) = create(&h, &url, KEY).await;
    let id = id.unwrap();
    let prompt = text("The lighthouse keeper wrote in his log that");
    let n = prompt.len() as u64;
    let r = h
        .post(format!("{url}/v1/sessions/{id}/step"))
        .bearer_auth(KEY)
        .body(step_body(0, prompt.clone(), 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let owner_resp = r.bytes().await.unwrap();
    // The other key: step (read the session's state), layer, delete. Each answers exactly
    // like an unknown id, and nothing is computed.
    let unknown = "00000000000000000000000000000000";
    for sid in [id.as_str(), unknown] {
        let step = h
            .post(format!("{url}/v1/sessions/{sid}/step"))
            .bearer_auth(OTHER_KEY)
            .body(step_body(n, vec![prompt[0]], 2))
            .send()
            .await
            .unwrap();
        let st = step.status();
        let e = error_frame(&step.bytes().await.unwrap());
        assert_eq!((st.as_u16(), e.code), (404, ErrorCode::NotFound as i32));
        let del = h
            .delete(format!("{url}/v1/sessions/{sid}"))
            .bearer_auth(OTHER_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(del.status(), 404);
        let layer = h
            .post(format!("{url}/v1/sessions/{sid}/layer"))
            .bearer_auth(OTHER_KEY)
            .body(spa_protocol::encode_frame(
                spa_protocol::FrameKind::LayerRequest,
                &spa_protocol::LayerRequest::default(),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(layer.status(), 404);
    }
    assert_eq!(state.metrics.rounds.load(Relaxed), 1);
    // The owner's session is intact: the same step again gives the same answer (its cache
    // still holds every position, nothing was truncated by the other key).
    let again = h
        .post(format!("{url}/v1/sessions/{id}/step"))
        .bearer_auth(KEY)
        .body(step_body(0, prompt.clone(), 2))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let again = again.bytes().await.unwrap();
    let strip = |b: &[u8]| {
        let mut r: spa_protocol::StepResponse = spa_protocol::decode_frame(
            b,
            spa_protocol::FrameKind::StepResponse,
            &Limits::default(),
        )
        .unwrap();
        r.compute_us = 0;
        r
    };
    assert_eq!(strip(&again), strip(&owner_resp));
    let del = h
        .delete(format!("{url}/v1/sessions/{id}"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_413_and_429_with_retry_after() {
    let cfg = ServerConfig {
        max_sessions_per_key: 2,
        limits: Limits {
            max_frame_bytes: 64 << 10,
            max_positions_per_round: 64,
            max_draft: 8,
            ..Limits::default()
        },
        ..common::config()
    };
    let (srv, state) = common::start(cfg, true).await;
    let (url, h) = (srv.url(), http());
    let (_, id) = create(&h, &url, KEY).await;
    let id = id.unwrap();
    let step = |body: Vec<u8>| {
        h.post(format!("{url}/v1/sessions/{id}/step"))
            .bearer_auth(KEY)
            .body(body)
            .send()
    };
    // K above the limit, a prompt over the positions per round, K = 0.
    for (tokens, k) in [
        (vec![1u32; 4], 9u32),
        (vec![1u32; 60], 5),
        (vec![1u32; 4], 0),
    ] {
        let r = step(step_body(0, tokens.clone(), k)).await.unwrap();
        let st = r.status().as_u16();
        let e = error_frame(&r.bytes().await.unwrap());
        assert_eq!(st, 413, "{} tokens, K {k}", tokens.len());
        assert_eq!(e.code, ErrorCode::Limit as i32);
    }
    // Taps in an encoding the protocol does not have: a typed 400, nothing computed.
    let bad_bits = spa_protocol::encode_frame(
        spa_protocol::FrameKind::StepRequest,
        &spa_protocol::StepRequest {
            position: 0,
            tokens: vec![1, 2],
            draft: 2,
            tap_bits: 3,
            ..Default::default()
        },
    );
    let r = step(bad_bits).await.unwrap();
    assert_eq!(r.status(), 400);
    let e = error_frame(&r.bytes().await.unwrap());
    assert_eq!(e.code, ErrorCode::BadRequest as i32);
    assert!(e.message.contains("tap_bits 3"), "{}", e.message);
    // A prompt that fits the round but not the model's context is a typed 400.
    let ctx = common::world().base.max_positions() as u64;
    let r = step(step_body(ctx - 2, vec![1, 2], 4)).await.unwrap();
    assert!(matches!(r.status().as_u16(), 400 | 409), "{}", r.status());
    // Frames over the size limit: declared length, and a body without a declared length
    // (a stream) that grows past it. Neither reaches the handler.
    let big = vec![0u8; 100 << 10];
    let r = step(big.clone()).await.unwrap();
    assert_eq!(r.status(), 413);
    let (addr, path) = (srv.addr, format!("/v1/sessions/{id}/step"));
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = tls_conn(addr);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        // Exactly the limit in 4 KiB chunks, then one byte over it and nothing more: the server
        // has read everything sent when it answers, so its close is a FIN. (Bytes still unread
        // when it closes would make it reset the connection, and a reset may discard the 413
        // before the client reads it.)
        for _ in 0..16 {
            if s.write_all(b"1000\r\n").is_err() || s.write_all(&[7u8; 4096]).is_err() {
                break;
            }
            let _ = s.write_all(b"\r\n");
        }
        let _ = s.write_all(b"1\r\nX");
        let _ = s.flush();
        read_until_closed(&mut s, Duration::from_secs(10)).0
    })
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "chunked body: {answer:?}"
    );
    assert_eq!(
        state.metrics.rounds.load(Relaxed),
        0,
        "nothing was computed"
    );
    // Sessions per key: at the cap, while every session of the key is busy (a step holds
    // it), the third gets 429 with Retry-After; another key is unaffected.
    let (st2, id2) = create(&h, &url, KEY).await;
    assert_eq!(st2, 200);
    let id2 = id2.unwrap();
    let hold = |id: &str| match state.sessions.lock().unwrap().get(id, 0) {
        spa_server::Lookup::Found(s) => s,
        other => panic!("session {id} not live: {other:?}"),
    };
    let busy = [hold(&id), hold(&id2)];
    let create_raw = || {
        h.post(format!("{url}/v1/sessions"))
            .bearer_auth(KEY)
            .body(spa_protocol::encode_frame(
                spa_protocol::FrameKind::CreateSessionRequest,
                &spa_protocol::CreateSessionRequest { mode: 0 },
            ))
            .send()
    };
    let r = create_raw().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let e = error_frame(&r.bytes().await.unwrap());
    assert_eq!((e.code, e.retry_after_ms), (ErrorCode::Limit as i32, 1000));
    assert_eq!(create(&h, &url, OTHER_KEY).await.0, 200);
    // Once idle, the key's least-recently-used session makes room; its device gets 410.
    drop(busy);
    assert_eq!(create_raw().await.unwrap().status(), 200);
    let r = step(step_body(0, vec![1, 2, 3], 2)).await.unwrap();
    assert_eq!(r.status(), 410, "the reclaimed session answers 410");
    assert_eq!(state.sessions.lock().unwrap().ended.reclaimed, 1);
    assert!(state.metrics.limited.load(Relaxed) >= 6);
    srv.shutdown().await;
}

fn short_timeouts() -> ServerConfig {
    ServerConfig {
        header_timeout: Duration::from_secs(2),
        body_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        ..common::config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_and_silent_connections_time_out() {
    let (srv, state) = common::start(short_timeouts(), true).await;
    let addr = srv.addr;
    let bound = Duration::from_secs(8);
    let results = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        // 1. Connects and never starts TLS.
        let mut s = raw(addr);
        out.push(("silent TCP", read_until_closed(&mut s, bound)));
        // 2. TLS, then half a request line, then nothing.
        let mut s = tls_conn(addr);
        s.write_all(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .unwrap();
        out.push(("slow headers", read_until_closed(&mut s, bound)));
        // 3. TLS, full headers announcing 200 bytes, 10 bytes, then nothing.
        let mut s = tls_conn(addr);
        let head = format!(
            "POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Length: 200\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&[0u8; 10]).unwrap();
        out.push(("slow body", read_until_closed(&mut s, bound)));
        // 4. TLS, then no request at all.
        let mut s = tls_conn(addr);
        out.push(("idle TLS", read_until_closed(&mut s, bound)));
        out
    })
    .await
    .unwrap();
    for (what, (bytes, took)) in &results {
        let text = String::from_utf8_lossy(bytes);
        eprintln!("{what}: closed after {took:?}: {:?}", text.lines().next());
        assert!(*took < bound, "{what}: still open after {took:?}");
        assert!(
            *took >= Duration::from_millis(1500),
            "{what}: closed too early ({took:?})"
        );
    }
    let body = String::from_utf8_lossy(&results[2].1 .0);
    assert!(body.starts_with("HTTP/1.1 408"), "slow body: {body:?}");
    assert_eq!(state.metrics.body_timeouts.load(Relaxed), 1);
    assert_eq!(state.sessions.lock().unwrap().len(), 0);
    // The server still serves normal requests.
    let r = http()
        .get(format!("{}/healthz", srv.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    srv.shutdown().await;
}
