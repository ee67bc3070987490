//! Cross-session batching: concurrent steps submit their forward passes to one engine thread,
//! which runs everything queued as one batch ([`BaseModel::forward_batch`]): every weight matrix
//! is read once per batch instead of once per session, which is what limits decode speed.

use spa_model::{BaseModel, BaseOutput, KvCache, Result as ModelResult, SpaError};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

struct Job {
    tokens: Vec<u32>,
    cache: KvCache,
    reply: mpsc::Sender<(ModelResult<BaseOutput>, KvCache)>,
}

/// Handle to the engine thread.
#[derive(Debug)]
pub struct Batcher {
    tx: Mutex<mpsc::Sender<Job>>,
    /// Largest batch run so far.
    pub max_batch_seen: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl Batcher {
    /// Starts the engine thread over `base`; at most `max_batch` sequences per batch.
    pub fn start(base: Arc<BaseModel>, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen2 = seen.clone();
        std::thread::Builder::new()
            .name("spa-engine".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < max_batch.max(1) {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    seen2.fetch_max(jobs.len(), std::sync::atomic::Ordering::Relaxed);
                    run_batch(&base, jobs);
                }
            })
            .expect("spawn engine thread");
        Self {
            tx: Mutex::new(tx),
            max_batch_seen: seen,
        }
    }

    /// Runs `tokens` on `cache` through the engine (blocking; call from a blocking thread).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> ModelResult<BaseOutput> {
        let (rtx, rrx) = mpsc::channel();
        let owned = std::mem::replace(cache, KvCache::new(0, 0));
        let job = Job {
            tokens: tokens.to_vec(),
            cache: owned,
            reply: rtx,
        };
        let sent = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(job);
        if let Err(mpsc::SendError(job)) = sent {
            *cache = job.cache;
            return Err(SpaError::InvalidConfig("engine thread stopped".into()));
        }
        match rrx.recv() {
            Ok((res, c)) => {
                *cache = c;
                res
            }
            Err(_) => Err(SpaError::InvalidConfig("engine thread stopped".into())),
        }
    }
}

fn run_batch(base: &BaseModel, jobs: Vec<Job>) {
    // Validate each job alone so one bad request cannot fail the others.
    let mut ok = Vec::new();
    for j in jobs {
        let check = base
            .tokenizer()
            .check_ids(&j.tokens)
            .and_then(|_| j.cache.check_room(j.tokens.len()));
        match check {
            Ok(()) if !j.tokens.is_empty() => ok.push(j),
            Ok(()) => {
                let _ = j
                    .reply
                    .send((Err(SpaError::InvalidConfig("no tokens".into())), j.cache));
            }
            Err(e) => {
                let _ = j.reply.send((Err(e), j.cache));
            }
        }
    }
    if ok.is_empty() {
        return;
    }
    let mut caches: Vec<KvCache> = ok
        .iter_mut()
        .map(|j| std::mem::replace(&mut j.cache, KvCache::new(0, 0)))
        .collect();
    let res = {
        let mut pairs: Vec<(&[u32], &mut KvCache)> = ok
            .iter()
            .map(|j| j.tokens.as_slice())
            .zip(caches.iter_mut())
            .collect();
        base.forward_batch(&mut pairs)
    };
    match res {
        Ok(outs) => {
            for ((j, c), o) in ok.into_iter().zip(caches).zip(outs) {
                let _ = j.reply.send((Ok(o), c));
            }
        }
        Err(e) => {
            log::error!("batched forward failed: {e}");
            let msg = e.to_string();
            for (j, c) in ok.into_iter().zip(caches) {
                let _ = j.reply.send((Err(SpaError::InvalidConfig(msg.clone())), c));
            }
        }
    }
}
