//! API keys and worker tokens, stored as SHA-256 hashes, and per-key rate limits.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Hashes a secret for storage in config: `sha256:<hex>`.
pub fn hash_secret(secret: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())))
}

/// A set of hashed secrets. Comparison is on hashes, so the plain secrets never live in the
/// server's memory past the request that presents them.
#[derive(Debug, Clone, Default)]
pub struct SecretSet {
    hashes: Vec<[u8; 32]>,
}

/// A configured secret hash that is not `sha256:<64 hex digits>`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not a secret hash (expected sha256:<64 hex digits>): {0:?}")]
#[non_exhaustive]
pub struct BadHash(pub String);

impl SecretSet {
    /// Parses `sha256:<hex>` entries.
    pub fn from_hashes<I, S>(hashes: I) -> Result<Self, BadHash>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Vec::new();
        for h in hashes {
            let h = h.as_ref();
            let hexpart = h.strip_prefix("sha256:").ok_or_else(|| BadHash(h.into()))?;
            let mut buf = [0u8; 32];
            hex::decode_to_slice(hexpart, &mut buf).map_err(|_| BadHash(h.into()))?;
            out.push(buf);
        }
        Ok(Self { hashes: out })
    }

    /// Whether no secret is configured.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The index of the matching secret, if any. Constant-time per entry.
    pub fn check(&self, secret: &str) -> Option<usize> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for (i, h) in self.hashes.iter().enumerate() {
            let mut diff = 0u8;
            for (a, b) in h.iter().zip(digest.iter()) {
                diff |= a ^ b;
            }
            if diff == 0 && found.is_none() {
                found = Some(i);
            }
        }
        found
    }
}

/// The bearer token of an `Authorization` header value.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// A token bucket per key: `per_minute` requests a minute, bursts up to `burst`.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_minute: u32,
    burst: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub(crate) fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute,
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub(crate) fn check(&self, key: &str) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let rate = f64::from(self.per_minute) / 60.0;
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.clear();
        }
        let (tokens, at) = map
            .entry(key.to_owned())
            .or_insert((f64::from(self.burst), now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(f64::from(self.burst));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip() {
        let set = SecretSet::from_hashes([hash_secret("a"), hash_secret("b")]).unwrap();
        assert_eq!(set.check("b"), Some(1));
        assert_eq!(set.check("c"), None);
        assert!(SecretSet::from_hashes(["plain"]).is_err());
        assert!(SecretSet::from_hashes(["sha256:zz"]).is_err());
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn limiter_refuses_past_the_burst() {
        let l = RateLimiter::new(60, 2);
        assert!(l.check("k").is_ok());
        assert!(l.check("k").is_ok());
        let wait = l.check("k").unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        assert!(l.check("other").is_ok());
    }
}
