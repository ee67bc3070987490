//! Session table: ownership by API key, unguessable ids, KV memory accounting with a global
//! bound, and the three ways a session ends besides an explicit delete:
//! - **idle expiry**: a session not used for the idle TTL is dropped;
//! - **cap reclaim**: when a key is at its session cap, its least-recently-used idle session
//!   makes room for the new one;
//! - **KV eviction**: above the global KV budget, least-recently-used sessions go, idle ones
//!   first.
//!
//! Ended ids are remembered (bounded) so the device gets a typed "session gone" (410) and
//! re-prefills from the history it keeps, instead of a generic 404. A session is *busy* while a
//! request holds it (a step in flight); busy sessions are never expired or reclaimed, and are
//! evicted only when idle ones cannot free enough memory.

use crate::base_engine::Sequence;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One session's state; locked while a step runs.
#[derive(Debug)]
pub struct Session {
    /// Base KV cache (the engine's sequence; always a candle [`spa_model::KvCache`] for
    /// layer-split sessions).
    pub cache: Box<dyn Sequence>,
    /// Mode requested at creation (spa / lst / layer-split).
    pub mode: i32,
    /// Layer-split baseline: the residual stream of the token in flight.
    pub layer_state: Option<(u64, u32, Vec<f32>)>,
}

#[derive(Debug)]
struct Entry {
    owner: usize,
    session: Arc<Mutex<Session>>,
    last_used: Instant,
    bytes: usize,
}

impl Entry {
    /// A request holds the session (the table's own reference is the only other one).
    fn busy(&self) -> bool {
        Arc::strong_count(&self.session) > 1
    }
}

/// Result of a lookup.
#[derive(Debug)]
pub enum Lookup {
    /// Found and owned by the caller.
    Found(Arc<Mutex<Session>>),
    /// Ended by expiry, reclaim or eviction earlier (owned by the caller): re-prefill.
    Gone,
    /// Unknown, or owned by another key (indistinguishable on purpose).
    NotFound,
}

/// Why a session ended without being deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Idle longer than the TTL.
    Expired,
    /// Made room for a new session of its key at the per-key cap.
    Reclaimed,
    /// Freed KV memory under the global budget.
    Evicted,
}

/// Counters of ended sessions (monotonic, exported in /metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EndCounts {
    /// Deleted by their device (`DELETE /v1/sessions/{id}`).
    pub deleted: u64,
    /// Expired after the idle TTL.
    pub expired: u64,
    /// Reclaimed at the per-key cap.
    pub reclaimed: u64,
    /// Evicted under the KV budget.
    pub evicted: u64,
}

/// All sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: HashMap<String, Entry>,
    gone: HashMap<String, usize>,
    gone_order: VecDeque<String>,
    /// Sessions ended so far, by reason.
    pub ended: EndCounts,
    /// Idle time after which a session expires (`None`: never).
    pub idle_ttl: Option<Duration>,
}

/// Ended ids remembered for a typed 410.
const GONE_MEMORY: usize = 4096;

impl Sessions {
    /// An empty table whose sessions expire after `idle_ttl` without use.
    pub fn with_idle_ttl(idle_ttl: Option<Duration>) -> Self {
        Self {
            idle_ttl,
            ..Self::default()
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Sessions owned by key `owner`.
    pub fn count_for(&self, owner: usize) -> usize {
        self.map.values().filter(|e| e.owner == owner).count()
    }

    /// Inserts a new session for `owner`; returns its id (128 random bits, hex).
    pub fn create(&mut self, owner: usize, session: Session) -> String {
        let id: String = (0..16)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        self.map.insert(
            id.clone(),
            Entry {
                owner,
                session: Arc::new(Mutex::new(session)),
                last_used: Instant::now(),
                bytes: 0,
            },
        );
        id
    }

    fn idle_too_long(&self, e: &Entry, now: Instant) -> bool {
        self.idle_ttl
            .is_some_and(|ttl| !e.busy() && now.saturating_duration_since(e.last_used) > ttl)
    }

    /// Finds `id` for `owner` and marks it used. A session idle past the TTL is expired here
    /// (so expiry does not depend on the sweeper's timing) and reported as gone.
    pub fn get(&mut self, id: &str, owner: usize) -> Lookup {
        let now = Instant::now();
        let expired = match self.map.get(id) {
            Some(e) if e.owner == owner => self.idle_too_long(e, now),
            Some(_) => return Lookup::NotFound,
            None => false,
        };
        if expired {
            self.end(id, EndReason::Expired);
        }
        match self.map.get_mut(id) {
            Some(e) => {
                e.last_used = now;
                Lookup::Found(e.session.clone())
            }
            None => match self.gone.get(id) {
                Some(&o) if o == owner => Lookup::Gone,
                _ => Lookup::NotFound,
            },
        }
    }

    /// Removes `id` if `owner` owns it.
    pub fn delete(&mut self, id: &str, owner: usize) -> bool {
        match self.map.get(id) {
            Some(e) if e.owner == owner => {
                self.map.remove(id);
                self.ended.deleted += 1;
                true
            }
            _ => false,
        }
    }

    /// Ends live session `id` for `reason`, remembering it as gone.
    fn end(&mut self, id: &str, reason: EndReason) {
        let Some(e) = self.map.remove(id) else { return };
        log::info!(
            "session {}.. ended ({reason:?}, {} KV bytes)",
            &id[..id.len().min(8)],
            e.bytes
        );
        self.gone.insert(id.to_string(), e.owner);
        self.gone_order.push_back(id.to_string());
        if self.gone_order.len() > GONE_MEMORY {
            if let Some(old) = self.gone_order.pop_front() {
                self.gone.remove(&old);
            }
        }
        match reason {
            EndReason::Expired => self.ended.expired += 1,
            EndReason::Reclaimed => self.ended.reclaimed += 1,
            EndReason::Evicted => self.ended.evicted += 1,
        }
    }

    /// Records the KV bytes of `id` after a request and marks it used (its idle time starts
    /// when the request ends, not when it began).
    pub fn set_bytes(&mut self, id: &str, bytes: usize) {
        if let Some(e) = self.map.get_mut(id) {
            e.bytes = bytes;
            e.last_used = Instant::now();
        }
    }

    /// KV bytes of all sessions.
    pub fn total_bytes(&self) -> usize {
        self.map.values().map(|e| e.bytes).sum()
    }

    /// The least-recently-used idle session passing `filter`.
    fn lru_idle(&self, filter: impl Fn(&str, &Entry) -> bool) -> Option<String> {
        self.map
            .iter()
            .filter(|(id, e)| !e.busy() && filter(id, e))
            .min_by_key(|(_, e)| e.last_used)
            .map(|(id, _)| id.clone())
    }

    /// Expires every idle session unused for longer than the TTL; returns how many.
    pub fn expire_idle(&mut self) -> usize {
        let now = Instant::now();
        let ids: Vec<String> = self
            .map
            .iter()
            .filter(|(_, e)| self.idle_too_long(e, now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.end(id, EndReason::Expired);
        }
        ids.len()
    }

    /// Makes room for one more session of `owner` under `cap`: ends the key's
    /// least-recently-used idle session while the key is at the cap. False when every session
    /// of the key is busy (real overload: the caller answers 429).
    pub fn make_room(&mut self, owner: usize, cap: usize) -> bool {
        while self.count_for(owner) >= cap {
            match self.lru_idle(|_, e| e.owner == owner) {
                Some(id) => self.end(&id, EndReason::Reclaimed),
                None => return false,
            }
        }
        true
    }

    /// Evicts sessions holding memory (never `keep`) until the total is within `budget`,
    /// idle ones first, least recently used first; returns how many. A session evicted while a
    /// step holds it still answers that step; its device gets 410 on the next one.
    pub fn evict_to(&mut self, budget: usize, keep: &str) -> usize {
        let mut n = 0;
        while self.total_bytes() > budget {
            let victim = self
                .map
                .iter()
                // Sessions holding no KV memory (new, or first step in flight) free nothing.
                .filter(|(id, e)| id.as_str() != keep && e.bytes > 0)
                .min_by_key(|(_, e)| (e.busy(), e.last_used))
                .map(|(id, _)| id.clone());
            let Some(id) = victim else { break };
            self.end(&id, EndReason::Evicted);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            cache: Box::new(spa_model::KvCache::new(1, 8)),
            mode: 0,
            layer_state: None,
        }
    }

    #[test]
    fn ownership_eviction_and_gone() {
        let mut s = Sessions::default();
        let a = s.create(0, session());
        let b = s.create(0, session());
        let c = s.create(1, session());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        // another key's session is indistinguishable from an unknown one
        assert!(matches!(s.get(&c, 0), Lookup::NotFound));
        assert!(!s.delete(&c, 0));
        s.set_bytes(&a, 100);
        s.set_bytes(&c, 100);
        // b holds nothing: evicting it would free nothing, so the LRU session with memory goes
        assert_eq!(s.evict_to(150, &c), 1);
        assert!(matches!(s.get(&a, 0), Lookup::Gone));
        assert!(matches!(s.get(&a, 1), Lookup::NotFound));
        assert!(matches!(s.get(&b, 0), Lookup::Found(_)));
        assert_eq!(s.total_bytes(), 100);
        assert_eq!(s.count_for(0), 1);
        assert!(s.delete(&b, 0));
        assert_eq!(
            s.ended,
            EndCounts {
                deleted: 1,
                evicted: 1,
                ..EndCounts::default()
            }
        );
    }

    #[test]
    fn idle_sessions_are_evicted_before_busy_ones() {
        let mut s = Sessions::default();
        let a = s.create(0, session());
        std::thread::sleep(Duration::from_millis(2));
        let b = s.create(0, session());
        s.set_bytes(&a, 100);
        std::thread::sleep(Duration::from_millis(2));
        s.set_bytes(&b, 100);
        // a is the least recently used, but a step holds it: b goes first.
        let Lookup::Found(held) = s.get(&a, 0) else {
            panic!("a is live")
        };
        assert_eq!(s.evict_to(100, ""), 1);
        assert!(matches!(s.get(&b, 0), Lookup::Gone));
        // Only a busy session left: it goes when the budget demands it.
        assert_eq!(s.evict_to(0, ""), 1);
        drop(held);
        assert!(matches!(s.get(&a, 0), Lookup::Gone));
    }

    #[test]
    fn idle_sessions_expire_unless_busy() {
        let mut s = Sessions::with_idle_ttl(Some(Duration::from_millis(30)));
        let a = s.create(0, session());
        let b = s.create(0, session());
        let c = s.create(1, session());
        let Lookup::Found(held) = s.get(&b, 0) else {
            panic!("b is live")
        };
        std::thread::sleep(Duration::from_millis(60));
        // A lookup past the TTL finds the session gone, before any sweep.
        assert!(matches!(s.get(&a, 0), Lookup::Gone));
        // Only the idle one goes: b is held by a request.
        assert_eq!(s.expire_idle(), 1);
        assert!(matches!(s.get(&c, 1), Lookup::Gone));
        // The request ends (the server records its KV bytes, which marks it used).
        drop(held);
        s.set_bytes(&b, 0);
        assert!(matches!(s.get(&b, 0), Lookup::Found(_)), "b was in use");
        assert_eq!(s.ended.expired, 2);
        assert_eq!(s.len(), 1);
        // No TTL: nothing expires.
        let mut forever = Sessions::with_idle_ttl(None);
        forever.create(0, session());
        assert_eq!(forever.expire_idle(), 0);
    }

    #[test]
    fn the_cap_reclaims_the_keys_lru_idle_session() {
        let mut s = Sessions::default();
        let old = s.create(0, session());
        std::thread::sleep(Duration::from_millis(2));
        let newer = s.create(0, session());
        let other = s.create(1, session());
        std::thread::sleep(Duration::from_millis(2));
        // Using `old` makes `newer` the least recently used.
        assert!(matches!(s.get(&old, 0), Lookup::Found(_)));
        assert!(s.make_room(0, 2));
        assert!(matches!(s.get(&newer, 0), Lookup::Gone));
        assert!(
            matches!(s.get(&other, 1), Lookup::Found(_)),
            "another key's"
        );
        assert_eq!(s.count_for(0), 1);
        assert_eq!(s.ended.reclaimed, 1);
        // Under the cap: nothing to do.
        assert!(s.make_room(0, 2));
        assert_eq!(s.ended.reclaimed, 1);
        // Every session of the key busy: no room (429), nothing ended.
        let Lookup::Found(held) = s.get(&old, 0) else {
            panic!("old is live")
        };
        assert!(!s.make_room(0, 1));
        assert_eq!(s.count_for(0), 1);
        drop(held);
        assert!(s.make_room(0, 1));
        assert_eq!(s.count_for(0), 0);
    }
}
