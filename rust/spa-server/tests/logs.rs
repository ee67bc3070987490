//! No secret and no user content in the server's logs at info level: every record the server
//! emits while serving keys, prompts, evictions, refusals and timeouts is captured and searched
//! for the API keys (right and wrong), the session ids and the prompt's token ids.

mod common;

use common::{create, http, step_body, text, KEY};
use spa_server::ServerConfig;
use std::sync::Mutex;
use std::time::Duration;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            LINES
                .lock()
                .unwrap()
                .push(format!("{} {}: {}", r.level(), r.target(), r.args()));
        }
    }
    fn flush(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_logs_hold_no_keys_ids_or_tokens() {
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let wrong = "sk-wrong-4d1f9e0b2c7a";
    let (srv, state) = common::start(
        ServerConfig {
            // Below one session's bytes on either engine (candle: ~2.9 MB at once; llama.cpp:
            // 23 KB per position), so the second session evicts the first.
            kv_budget_bytes: 64 << 10,
            body_timeout: Duration::from_secs(1),
            limits: spa_protocol::Limits {
                max_frame_bytes: 64 << 10,
                ..Default::default()
            },
            ..common::config()
        },
        true,
    )
    .await;
    let (url, h) = (srv.url(), http());
    let prompt = text("My bank PIN is 4711 and my secret diary says that");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, id) = create(&h, &url, KEY).await;
        let id = id.unwrap();
        let r = h
            .post(format!("{url}/v1/sessions/{id}/step"))
            .bearer_auth(KEY)
            .body(step_body(0, prompt.clone(), 4))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        ids.push(id);
    }
    // The first session was evicted: 410.
    let r = h
        .post(format!("{url}/v1/sessions/{}/step", ids[0]))
        .bearer_auth(KEY)
        .body(step_body(prompt.len() as u64, vec![prompt[0]], 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    assert!(state.sessions.lock().unwrap().ended.evicted >= 1);
    // Wrong key, oversized frame, K over the limit, deletes.
    assert_eq!(create(&h, &url, wrong).await.0, 401);
    let r = h
        .post(format!("{url}/v1/sessions/{}/step", ids[1]))
        .bearer_auth(KEY)
        .body(vec![1u8; 100 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = h
        .post(format!("{url}/v1/sessions/{}/step", ids[1]))
        .bearer_auth(KEY)
        .body(step_body(0, prompt.clone(), 500))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    for id in &ids {
        let _ = h
            .delete(format!("{url}/v1/sessions/{id}"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
    }
    srv.shutdown().await;

    let lines = LINES.lock().unwrap().clone();
    for l in &lines {
        eprintln!("captured: {l}");
    }
    assert!(
        lines.iter().any(|l| l.contains("ended (Evicted")),
        "the capture saw no server log at all"
    );
    let joined = |sep: &str| {
        prompt
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(sep)
    };
    let mut secrets = vec![
        KEY.to_string(),
        common::OTHER_KEY.to_string(),
        wrong.to_string(),
        "diary".to_string(),
        joined(", "),
        joined(" "),
        joined(","),
    ];
    secrets.extend(ids.iter().cloned());
    for l in &lines {
        for s in &secrets {
            assert!(!l.contains(s.as_str()), "log line leaks {s:?}: {l}");
        }
    }
}
