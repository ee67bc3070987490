//! Cross-session batching with a lane per API key: concurrent steps of one key submit their
//! forward passes to that key's engine thread, which runs everything queued as one batch
//! ([`BaseEngine::forward_batch`]): every weight matrix is read once per batch instead of once
//! per session. Keys do not share a queue: a key flooding the server fills its own lane, while
//! another key's lane runs beside it on its own worker threads and the OS shares the cores
//! between them, so one key's backlog cannot starve another.

use crate::base_engine::{BaseEngine, EngineOutput, Sequence};
use spa_model::{BaseModel, Result as ModelResult, SpaError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Reply = (ModelResult<EngineOutput>, Box<dyn Sequence>);

struct Job {
    tokens: Vec<u32>,
    cache: Box<dyn Sequence>,
    reply: mpsc::Sender<Reply>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// One queue and engine thread per key, each running batches of what its key has queued.
struct Lanes<J> {
    senders: Mutex<HashMap<usize, mpsc::Sender<J>>>,
    max_batch: usize,
    run: Arc<dyn Fn(Vec<J>) + Send + Sync>,
    max_batch_seen: Arc<AtomicUsize>,
}

impl<J: Send + 'static> Lanes<J> {
    fn new(max_batch: usize, run: Arc<dyn Fn(Vec<J>) + Send + Sync>) -> Self {
        Self {
            senders: Mutex::new(HashMap::new()),
            max_batch: max_batch.max(1),
            run,
            max_batch_seen: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn spawn_lane(&self, key: usize) -> std::io::Result<mpsc::Sender<J>> {
        let (tx, rx) = mpsc::channel::<J>();
        let (run, max_batch, seen) = (
            self.run.clone(),
            self.max_batch,
            self.max_batch_seen.clone(),
        );
        // Each lane computes on its own worker threads (as many as the global pool has), so
        // the OS shares the cores between busy lanes; in one shared pool a flooding key's
        // many matrix tasks would queue ahead of another key's.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(move |i| format!("spa-engine-{key}-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        std::thread::Builder::new()
            .name(format!("spa-engine-{key}"))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < max_batch {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    seen.fetch_max(jobs.len(), Relaxed);
                    // A panic fails this batch's jobs (their reply channels close, so their
                    // callers get an error), never the lane: later jobs still run.
                    let batch = std::panic::AssertUnwindSafe(|| pool.install(|| run(jobs)));
                    if std::panic::catch_unwind(batch).is_err() {
                        log::error!("a batch on engine lane {key} panicked; its jobs failed");
                    }
                }
            })?;
        Ok(tx)
    }

    /// Queues `job` on `key`'s lane (started on first use); gives the job back when the lane
    /// cannot take it.
    fn submit(&self, key: usize, job: J) -> Result<(), J> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        let tx = match senders.get(&key) {
            Some(tx) => tx.clone(),
            None => match self.spawn_lane(key) {
                Ok(tx) => {
                    senders.insert(key, tx.clone());
                    tx
                }
                Err(e) => {
                    log::error!("cannot start an engine thread: {e}");
                    return Err(job);
                }
            },
        };
        tx.send(job).map_err(|mpsc::SendError(job)| {
            // The lane's thread ended (a panic in a batch): the next job starts a new one.
            senders.remove(&key);
            job
        })
    }
}

/// Handle to the engine lanes.
pub struct Batcher {
    lanes: Lanes<Job>,
    /// Largest batch run so far.
    pub max_batch_seen: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_batch", &self.lanes.max_batch)
            .finish()
    }
}

impl Batcher {
    /// Batches forward passes of `engine` (ids checked against `base`'s tokenizer), at most
    /// `max_batch` sequences per batch and lane.
    pub fn start(base: Arc<BaseModel>, engine: Arc<dyn BaseEngine>, max_batch: usize) -> Self {
        let lanes = Lanes::new(
            max_batch,
            Arc::new(move |jobs: Vec<Job>| run_batch(&base, engine.as_ref(), jobs)),
        );
        Self {
            max_batch_seen: lanes.max_batch_seen.clone(),
            lanes,
        }
    }

    /// Runs `tokens` on `cache` through `key`'s lane (blocking; call from a blocking thread).
    pub fn forward(
        &self,
        key: usize,
        tokens: &[u32],
        cache: &mut Box<dyn Sequence>,
    ) -> ModelResult<EngineOutput> {
        let (rtx, rrx) = mpsc::channel();
        let owned = std::mem::replace(cache, Box::new(Taken));
        let job = Job {
            tokens: tokens.to_vec(),
            cache: owned,
            reply: rtx,
        };
        if let Err(job) = self.lanes.submit(key, job) {
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

/// Stands in for a sequence while its job is on an engine lane.
#[derive(Debug)]
struct Taken;

impl Sequence for Taken {
    fn len(&self) -> usize {
        0
    }
    fn max_len(&self) -> usize {
        0
    }
    fn truncate(&mut self, _: usize) {}
    fn capacity_bytes(&self) -> usize {
        0
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

fn run_batch(base: &BaseModel, engine: &dyn BaseEngine, jobs: Vec<Job>) {
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
    let mut caches: Vec<Box<dyn Sequence>> = ok
        .iter_mut()
        .map(|j| std::mem::replace(&mut j.cache, Box::new(Taken)))
        .collect();
    let res = {
        let mut pairs: Vec<(&[u32], &mut (dyn Sequence + 'static))> = ok
            .iter()
            .map(|j| j.tokens.as_slice())
            .zip(caches.iter_mut().map(|c| c.as_mut()))
            .collect();
        engine.forward_batch(&mut pairs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Key 0 floods its lane with jobs that cannot finish (their batch waits on `release`);
    /// key 1's job still runs at once, and key 0's backlog then drains in batches.
    #[test]
    fn one_keys_backlog_does_not_block_another_key() {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let (done_tx, done_rx) = mpsc::channel::<(usize, usize)>();
        let done_tx = Mutex::new(done_tx);
        let lanes = Lanes::new(
            4,
            Arc::new(move |jobs: Vec<(usize, usize)>| {
                if jobs[0].0 == 0 {
                    let _ = release_rx.lock().unwrap().recv();
                }
                for j in jobs {
                    done_tx.lock().unwrap().send(j).unwrap();
                }
            }),
        );
        for i in 0..10 {
            lanes.submit(0, (0, i)).unwrap();
        }
        lanes.submit(1, (1, 0)).unwrap();
        assert_eq!(
            done_rx.recv_timeout(Duration::from_secs(10)),
            Ok((1, 0)),
            "key 1 waited behind key 0's backlog"
        );
        assert!(done_rx.try_recv().is_err(), "key 0 is still held");
        for _ in 0..10 {
            release_tx.send(()).unwrap();
        }
        let mut drained: Vec<usize> = (0..10)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap().1)
            .collect();
        drained.sort();
        assert_eq!(drained, (0..10).collect::<Vec<_>>());
        // Batches are capped at 4: the backlog of 10 ran as several batches.
        assert_eq!(lanes.max_batch_seen.load(Relaxed), 4);
    }

    #[test]
    fn a_panicking_batch_fails_its_jobs_and_the_lane_goes_on() {
        let lanes = Lanes::new(
            1,
            Arc::new(|jobs: Vec<(bool, mpsc::Sender<()>)>| {
                let (panic, reply) = &jobs[0];
                assert!(!panic, "a bug in a batch");
                reply.send(()).unwrap();
            }),
        );
        let (tx, failed) = mpsc::channel();
        lanes.submit(7, (true, tx)).unwrap();
        assert_eq!(
            failed.recv_timeout(Duration::from_secs(10)),
            Err(mpsc::RecvTimeoutError::Disconnected),
            "the failed job's reply channel closes"
        );
        let (tx, ok) = mpsc::channel();
        lanes.submit(7, (false, tx)).unwrap();
        assert_eq!(ok.recv_timeout(Duration::from_secs(10)), Ok(()));
    }
}
