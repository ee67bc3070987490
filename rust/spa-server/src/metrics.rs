//! Prometheus text metrics: sessions, tokens, rounds, bytes, step latency histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const BUCKETS_MS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// Counters updated by the handlers.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Tokens received from devices (prompt + corrections).
    pub tokens_in: AtomicU64,
    /// Draft positions sent.
    pub drafts_out: AtomicU64,
    /// Steps served.
    pub rounds: AtomicU64,
    /// Request body bytes.
    pub bytes_in: AtomicU64,
    /// Response body bytes.
    pub bytes_out: AtomicU64,
    /// Requests refused for auth.
    pub unauthorized: AtomicU64,
    /// Layer-split round trips.
    pub layer_rounds: AtomicU64,
    /// Requests whose body did not arrive within the body timeout (408).
    pub body_timeouts: AtomicU64,
    /// Requests refused for size or rate limits (413/429).
    pub limited: AtomicU64,
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Metrics {
    /// Records one step latency.
    pub fn observe_step(&self, us: u64) {
        let ms = us as f64 / 1000.0;
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Renders the Prometheus exposition text.
    pub fn render(
        &self,
        sessions: usize,
        kv_bytes: usize,
        ended: &crate::sessions::EndCounts,
    ) -> String {
        let mut s = String::new();
        let mut g = |name: &str, help: &str, kind: &str, v: f64| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        };
        g("spa_sessions", "Live sessions.", "gauge", sessions as f64);
        g(
            "spa_kv_bytes",
            "KV cache bytes held by all sessions.",
            "gauge",
            kv_bytes as f64,
        );
        g(
            "spa_evictions_total",
            "Sessions evicted to respect the KV bound.",
            "counter",
            ended.evicted as f64,
        );
        g(
            "spa_sessions_expired_total",
            "Sessions expired after the idle TTL.",
            "counter",
            ended.expired as f64,
        );
        g(
            "spa_sessions_reclaimed_total",
            "Idle sessions reclaimed to make room at a key's session cap.",
            "counter",
            ended.reclaimed as f64,
        );
        g(
            "spa_sessions_deleted_total",
            "Sessions deleted by their device.",
            "counter",
            ended.deleted as f64,
        );
        g(
            "spa_body_timeouts_total",
            "Requests whose body did not arrive in time (408).",
            "counter",
            self.body_timeouts.load(Relaxed) as f64,
        );
        g(
            "spa_limited_total",
            "Requests refused by a size or rate limit (413/429).",
            "counter",
            self.limited.load(Relaxed) as f64,
        );
        g(
            "spa_tokens_in_total",
            "Tokens received.",
            "counter",
            self.tokens_in.load(Relaxed) as f64,
        );
        g(
            "spa_drafts_out_total",
            "Draft positions sent.",
            "counter",
            self.drafts_out.load(Relaxed) as f64,
        );
        g(
            "spa_rounds_total",
            "Steps served.",
            "counter",
            self.rounds.load(Relaxed) as f64,
        );
        g(
            "spa_layer_rounds_total",
            "Layer-split round trips served.",
            "counter",
            self.layer_rounds.load(Relaxed) as f64,
        );
        g(
            "spa_bytes_in_total",
            "Request body bytes.",
            "counter",
            self.bytes_in.load(Relaxed) as f64,
        );
        g(
            "spa_bytes_out_total",
            "Response body bytes.",
            "counter",
            self.bytes_out.load(Relaxed) as f64,
        );
        g(
            "spa_unauthorized_total",
            "Requests refused for a missing or wrong key.",
            "counter",
            self.unauthorized.load(Relaxed) as f64,
        );
        s.push_str("# HELP spa_step_latency_ms Step compute latency.\n# TYPE spa_step_latency_ms histogram\n");
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            s.push_str(&format!(
                "spa_step_latency_ms_bucket{{le=\"{b}\"}} {}\n",
                self.buckets[i].load(Relaxed)
            ));
        }
        let c = self.count.load(Relaxed);
        s.push_str(&format!("spa_step_latency_ms_bucket{{le=\"+Inf\"}} {c}\n"));
        s.push_str(&format!(
            "spa_step_latency_ms_sum {}\n",
            self.sum_us.load(Relaxed) as f64 / 1000.0
        ));
        s.push_str(&format!("spa_step_latency_ms_count {c}\n"));
        s
    }
}
