//! Session table: ownership by API key, unguessable ids, KV memory accounting with a global
//! bound and least-recently-used eviction. Evicted ids are remembered (bounded) so the device
//! gets a typed "session gone" and re-prefills, instead of a generic 404.

use spa_model::KvCache;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One session's state; locked while a step runs.
#[derive(Debug)]
pub struct Session {
    /// Base KV cache.
    pub cache: KvCache,
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

/// Result of a lookup.
#[derive(Debug)]
pub enum Lookup {
    /// Found and owned by the caller.
    Found(Arc<Mutex<Session>>),
    /// Evicted earlier (owned by the caller).
    Gone,
    /// Unknown, or owned by another key (indistinguishable on purpose).
    NotFound,
}

/// All sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: HashMap<String, Entry>,
    evicted: HashMap<String, usize>,
    evicted_order: VecDeque<String>,
    /// Total evictions so far.
    pub evictions: u64,
}

const EVICTED_MEMORY: usize = 4096;

impl Sessions {
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

    /// Finds `id` for `owner` and marks it used.
    pub fn get(&mut self, id: &str, owner: usize) -> Lookup {
        match self.map.get_mut(id) {
            Some(e) if e.owner == owner => {
                e.last_used = Instant::now();
                Lookup::Found(e.session.clone())
            }
            Some(_) => Lookup::NotFound,
            None => match self.evicted.get(id) {
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
                true
            }
            _ => false,
        }
    }

    /// Records the KV bytes of `id` after a step.
    pub fn set_bytes(&mut self, id: &str, bytes: usize) {
        if let Some(e) = self.map.get_mut(id) {
            e.bytes = bytes;
        }
    }

    /// KV bytes of all sessions.
    pub fn total_bytes(&self) -> usize {
        self.map.values().map(|e| e.bytes).sum()
    }

    /// Evicts least-recently-used sessions (never `keep`) until the total is within `budget`.
    pub fn evict_to(&mut self, budget: usize, keep: &str) -> usize {
        let mut n = 0;
        while self.total_bytes() > budget {
            let victim = self
                .map
                .iter()
                // Sessions holding no KV memory (new, or first step in flight) free nothing.
                .filter(|(id, e)| id.as_str() != keep && e.bytes > 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| id.clone());
            let Some(id) = victim else { break };
            if let Some(e) = self.map.remove(&id) {
                log::info!("evicting session {}.. ({} KV bytes)", &id[..8], e.bytes);
                self.evicted.insert(id.clone(), e.owner);
                self.evicted_order.push_back(id);
                if self.evicted_order.len() > EVICTED_MEMORY {
                    if let Some(old) = self.evicted_order.pop_front() {
                        self.evicted.remove(&old);
                    }
                }
                self.evictions += 1;
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            cache: KvCache::new(1, 8),
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
    }
}
