//! Session lifecycle with one API key, as a chat app uses it: a conversation per chat,
//! dropped after use. Dropping deletes the server session; idle sessions expire; at the key's
//! cap the least-recently-used idle session is reclaimed. A device whose session ended that way
//! re-prefills and continues with exactly the tokens it would have produced.
//!
//! Real SmolLM2 base, real TLS server on loopback, the real device runtime.
//! `SPA_LIFECYCLE_CHATS` overrides the number of conversations (1,000).

mod common;

use spa_model::GateMode;
use spa_runtime::{DeviceModel, GenerationStats, Mode, RuntimeParams, SpaSession};
use spa_server::{AppState, ServerConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn tokens(text: &str) -> Vec<u32> {
    common::world().base.tokenizer().encode(text).unwrap()
}

fn device(prompt: &[u32]) -> Arc<DeviceModel> {
    Arc::new(common::device(GateMode::Learned, prompt))
}

fn params(max_tokens: usize, draft: u32) -> RuntimeParams {
    RuntimeParams {
        max_tokens,
        draft,
        ..Default::default()
    }
}

fn live(state: &AppState) -> usize {
    state.sessions.lock().unwrap().len()
}

/// Two turns on `s`, with `pause` between them; returns both turns' tokens and the second
/// turn's statistics.
async fn two_turns(
    s: &mut SpaSession,
    first: &[u32],
    second: &[u32],
    pause: Duration,
) -> (Vec<u32>, Vec<u32>, GenerationStats) {
    let p = params(6, 3);
    let (t1, _) = s.generate(first, &p, None, |_| true).await.unwrap();
    tokio::time::sleep(pause).await;
    let (t2, st2) = s.generate(second, &p, None, |_| true).await.unwrap();
    (t1, t2, st2)
}

/// The case: a thousand chats with one key, each opened, used for a few tokens and
/// dropped (no explicit reset or delete). Before: the 65th failed ("too many sessions").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_dropped_conversations_with_one_key() {
    let chats: usize = std::env::var("SPA_LIFECYCLE_CHATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    const CAP: usize = 8;
    let (srv, state) = common::start_server(ServerConfig {
        max_sessions_per_key: CAP,
        ..common::server_config()
    })
    .await;
    let client = common::client(&srv.url(), common::KEY);
    let prompt = tokens("Hello");
    let dev = device(&prompt);
    let t0 = Instant::now();
    let mut most_live = 0;
    for i in 0..chats {
        let mut chat = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
        let (out, _) = chat
            .generate(&prompt, &params(1, 1), None, |_| true)
            .await
            .unwrap_or_else(|e| panic!("chat {i} failed: {e}"));
        assert_eq!(out.len(), 1, "chat {i}");
        drop(chat);
        let n = live(&state);
        assert!(n <= CAP, "chat {i}: {n} live sessions above the cap {CAP}");
        most_live = most_live.max(n);
    }
    // The last drops' deletes run in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    while live(&state) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = state.sessions.lock().unwrap().ended;
    eprintln!(
        "{chats} chats in {:.1?}: at most {most_live} live sessions (cap {CAP}); {ended:?}",
        t0.elapsed()
    );
    assert_eq!(
        live(&state),
        0,
        "dropped conversations left sessions behind"
    );
    // Every session ended by its drop's delete, or (a delete still in flight when the key hit
    // its cap) by reclaim; none leaked to expiry.
    assert_eq!(ended.deleted + ended.reclaimed, chats as u64);
    assert!(
        ended.deleted >= chats as u64 * 9 / 10,
        "only {} of {chats} drops deleted their session",
        ended.deleted
    );
    srv.shutdown().await;
}

/// A conversation idle past the TTL finds its session expired (410), re-prefills, and
/// continues with the same tokens as one that never paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_idle_past_the_ttl_continues_with_the_same_tokens() {
    let ttl = Duration::from_millis(400);
    let (srv, state) = common::start_server(ServerConfig {
        session_idle_ttl: Some(ttl),
        ..common::server_config()
    })
    .await;
    let (first, second) = (
        tokens("The old lighthouse keeper"),
        tokens(" Later that night,"),
    );
    let dev = device(&first);
    let client = common::client(&srv.url(), common::KEY);
    let mut quick = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
    let reference = two_turns(&mut quick, &first, &second, Duration::ZERO).await;
    assert_eq!(reference.2.reprefills, 0, "no pause, no expiry");
    drop(quick);

    let mut idle = SpaSession::new(client, dev, Mode::Spa);
    let paused = two_turns(&mut idle, &first, &second, ttl * 3).await;
    let ended = state.sessions.lock().unwrap().ended;
    eprintln!("idle: {ended:?}, second turn {:?}", paused.2);
    assert!(ended.expired >= 1, "the idle session did not expire");
    assert_eq!(paused.2.reprefills, 1, "the device re-prefilled once");
    assert_eq!((&paused.0, &paused.1), (&reference.0, &reference.1));
    let mut whole = first.clone();
    whole.extend_from_slice(&paused.0);
    whole.extend_from_slice(&second);
    whole.extend_from_slice(&paused.1);
    assert_eq!(idle.history(), &whole[..]);
    srv.shutdown().await;
}

/// At the key's cap a new conversation reclaims the least-recently-used idle one, whose
/// device re-prefills on its next turn and continues with the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_reclaims_the_least_recently_used_conversation() {
    let (srv, state) = common::start_server(ServerConfig {
        max_sessions_per_key: 2,
        ..common::server_config()
    })
    .await;
    let (first, second) = (tokens("Our garden in June"), tokens(" Next spring"));
    let dev = device(&first);
    let client = common::client(&srv.url(), common::KEY);
    let p = params(6, 3);

    let mut reference = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
    let expected = two_turns(&mut reference, &first, &second, Duration::ZERO).await;
    drop(reference);
    tokio::time::sleep(Duration::from_millis(200)).await; // its delete lands
    assert_eq!(live(&state), 0);

    // a, then b, then c: c's session takes a's place (a is the least recently used).
    let mut a = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
    let (a1, _) = a.generate(&first, &p, None, |_| true).await.unwrap();
    let mut b = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
    b.generate(&first, &p, None, |_| true).await.unwrap();
    let mut c = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
    c.generate(&first, &p, None, |_| true).await.unwrap();
    assert_eq!(live(&state), 2);
    assert_eq!(state.sessions.lock().unwrap().ended.reclaimed, 1);

    let (a2, st) = a.generate(&second, &p, None, |_| true).await.unwrap();
    assert_eq!(st.reprefills, 1, "a's session was reclaimed");
    assert_eq!((a1, a2), (expected.0, expected.1));
    // a's new session reclaimed b's in turn: the key never holds more than its cap.
    assert_eq!(live(&state), 2);
    assert_eq!(state.sessions.lock().unwrap().ended.reclaimed, 2);
    srv.shutdown().await;
}
