//! Bearer-key authentication with constant-time comparison of key digests.

use sha2::{Digest, Sha256};

/// The accepted API keys, stored as sha256 digests.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    digests: Vec<[u8; 32]>,
}

impl Keys {
    /// From plain keys (empty strings are ignored).
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Self {
        Self {
            digests: keys
                .iter()
                .map(|k| k.as_ref().trim())
                .filter(|k| !k.is_empty())
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
        }
    }

    /// Reads keys from a file: one per line, `#` comments allowed.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let keys: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect();
        Ok(Self::new(&keys))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The index of the key in an `Authorization: Bearer <key>` header value. Every configured
    /// key is compared (no early exit) in constant time.
    pub fn check(&self, header: Option<&str>) -> Option<usize> {
        let key = header?.strip_prefix("Bearer ")?.trim();
        let d: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = usize::MAX;
        for (i, k) in self.digests.iter().enumerate() {
            let diff = k
                .iter()
                .zip(d.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            let eq = (diff == 0) as usize;
            found = eq * i + (1 - eq) * found;
        }
        (found != usize::MAX).then_some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn keys() {
        let k = Keys::new(&["alpha", "beta", ""]);
        assert_eq!(k.len(), 2);
        assert_eq!(k.check(Some("Bearer beta")), Some(1));
        assert_eq!(k.check(Some("Bearer alpha")), Some(0));
        assert_eq!(k.check(Some("Bearer gamma")), None);
        assert_eq!(k.check(Some("beta")), None);
        assert_eq!(k.check(None), None);
    }
}
