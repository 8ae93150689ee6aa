//! Verification of received deliveries, as a receiver does it.

use std::time::Duration;

use crate::keys::{PublicKey, Secret, unb64};
use crate::sign::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, signed_content};

/// How far a delivery's timestamp may be from the receiver's clock, either way: 5 minutes,
/// as the spec and its libraries use.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Why a delivery did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A required header is absent, empty or not text.
    #[error("missing or unreadable header {0}")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not an integer.
    #[error("webhook-timestamp {0:?} is not Unix seconds")]
    BadTimestamp(String),
    /// The timestamp is older than the tolerance allows (a replay, or a clock far behind).
    #[error("message timestamp too old ({age_s} s, tolerance {tolerance_s} s)")]
    TooOld {
        /// Seconds between the timestamp and now.
        age_s: i64,
        /// The tolerance, seconds.
        tolerance_s: u64,
    },
    /// The timestamp is further in the future than the tolerance allows.
    #[error("message timestamp too new ({ahead_s} s ahead, tolerance {tolerance_s} s)")]
    TooNew {
        /// Seconds the timestamp is ahead of now.
        ahead_s: i64,
        /// The tolerance, seconds.
        tolerance_s: u64,
    },
    /// No signature in `webhook-signature` matches any configured key.
    #[error("no matching signature found")]
    NoMatchingSignature,
    /// The verifier has neither a secret nor a public key.
    #[error("no webhook secret or public key to verify with")]
    NoKeys,
}

impl VerifyError {
    /// True when the signature itself was checked and did not match (as opposed to a
    /// malformed or stale delivery).
    pub fn is_signature_mismatch(&self) -> bool {
        matches!(self, Self::NoMatchingSignature)
    }

    /// True when the delivery is outside the timestamp tolerance.
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::TooOld { .. } | Self::TooNew { .. })
    }
}

/// Verifies deliveries against secrets (`v1`) and Ed25519 public keys (`v1a`): one matching
/// signature of any listed key is enough, so a receiver may list the old and the new secret
/// during a rotation. Comparison is constant-time.
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<Secret>,
    public_keys: Vec<PublicKey>,
    tolerance: Duration,
}

impl Verifier {
    /// A verifier with these keys and the [`DEFAULT_TOLERANCE`].
    pub fn new(secrets: Vec<Secret>, public_keys: Vec<PublicKey>) -> Self {
        Self {
            secrets,
            public_keys,
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    /// The same verifier with another timestamp tolerance.
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Verifies a delivery from its headers (names are case-insensitive in a `HeaderMap`)
    /// and exact body bytes; `now` is the receiver's clock, Unix seconds.
    pub fn verify_headers(
        &self,
        headers: &http::HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<(), VerifyError> {
        let get = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or(VerifyError::MissingHeader(name))
        };
        self.verify(
            get(HEADER_ID)?,
            get(HEADER_TIMESTAMP)?,
            get(HEADER_SIGNATURE)?,
            body,
            now,
        )
    }

    /// Verifies a delivery from the three header values and the exact body bytes; `now` is
    /// the receiver's clock, Unix seconds. Entries of `signature` with other versions, or
    /// malformed ones, are skipped.
    pub fn verify(
        &self,
        id: &str,
        timestamp: &str,
        signature: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(), VerifyError> {
        if self.secrets.is_empty() && self.public_keys.is_empty() {
            return Err(VerifyError::NoKeys);
        }
        if id.is_empty() {
            return Err(VerifyError::MissingHeader(HEADER_ID));
        }
        let ts: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| VerifyError::BadTimestamp(timestamp.chars().take(32).collect()))?;
        self.check_time(ts, now)?;
        let content = signed_content(id, ts, body);
        let keys: Vec<ring::hmac::Key> = self
            .secrets
            .iter()
            .map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.as_bytes()))
            .collect();
        for entry in signature.split(' ') {
            let Some((version, sig)) = entry.split_once(',') else {
                continue;
            };
            let Some(sig) = unb64(sig) else { continue };
            let ok = match version {
                // ring::hmac::verify compares in constant time.
                "v1" => keys
                    .iter()
                    .any(|k| ring::hmac::verify(k, &content, &sig).is_ok()),
                "v1a" => self.public_keys.iter().any(|pk| {
                    ring::signature::UnparsedPublicKey::new(
                        &ring::signature::ED25519,
                        pk.as_bytes(),
                    )
                    .verify(&content, &sig)
                    .is_ok()
                }),
                _ => false,
            };
            if ok {
                return Ok(());
            }
        }
        Err(VerifyError::NoMatchingSignature)
    }

    fn check_time(&self, ts: i64, now: i64) -> Result<(), VerifyError> {
        let tol = i64::try_from(self.tolerance.as_secs()).unwrap_or(i64::MAX);
        let tolerance_s = self.tolerance.as_secs();
        let age = now.saturating_sub(ts);
        if age > tol {
            return Err(VerifyError::TooOld {
                age_s: age,
                tolerance_s,
            });
        }
        let ahead = ts.saturating_sub(now);
        if ahead > tol {
            return Err(VerifyError::TooNew {
                ahead_s: ahead,
                tolerance_s,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use crate::sign::Signer;

    const NOW: i64 = 1_780_000_000;

    fn keys() -> (Secret, Secret, SigningKey) {
        (
            Secret::generate().unwrap(),
            Secret::generate().unwrap(),
            SigningKey::generate().unwrap(),
        )
    }

    #[test]
    fn verifies_what_the_signer_signs_with_any_listed_key() {
        let (a, b, k) = keys();
        let signer = Signer::new(vec![a.clone(), b.clone()], Some(k.clone())).unwrap();
        let h = signer.headers("msg_x", NOW, b"{\"a\":1}").unwrap();
        let ts = h.timestamp.to_string();
        for v in [
            Verifier::new(vec![a.clone()], vec![]),
            Verifier::new(vec![b.clone()], vec![]),
            Verifier::new(vec![], vec![k.public_key()]),
        ] {
            v.verify(&h.id, &ts, &h.signature, b"{\"a\":1}", NOW + 10)
                .unwrap();
        }
        let mut map = http::HeaderMap::new();
        for (n, val) in h.pairs() {
            map.insert(n, val.parse().unwrap());
        }
        Verifier::new(vec![a], vec![])
            .verify_headers(&map, b"{\"a\":1}", NOW)
            .unwrap();
    }

    #[test]
    fn refuses_tampering_wrong_keys_and_stale_messages() {
        let (a, b, k) = keys();
        let signer = Signer::new(vec![a.clone()], Some(k.clone())).unwrap();
        let h = signer.headers("msg_x", NOW, b"body").unwrap();
        let ts = h.timestamp.to_string();
        let v = Verifier::new(vec![a.clone()], vec![k.public_key()]);
        let err = |id: &str, ts: &str, sig: &str, body: &[u8], now| {
            v.verify(id, ts, sig, body, now).unwrap_err()
        };
        assert!(err(&h.id, &ts, &h.signature, b"bodz", NOW).is_signature_mismatch());
        assert!(err("msg_y", &ts, &h.signature, b"body", NOW).is_signature_mismatch());
        let other_ts = (NOW + 1).to_string();
        assert!(err(&h.id, &other_ts, &h.signature, b"body", NOW).is_signature_mismatch());
        assert!(err(&h.id, &ts, "v1,AAAA v2,zzz garbage", b"body", NOW).is_signature_mismatch());
        // A v1a entry is not accepted as v1, nor the reverse.
        let swapped = h.signature.replace("v1,", "vX,").replace("v1a,", "v1,");
        assert!(err(&h.id, &ts, &swapped, b"body", NOW).is_signature_mismatch());
        let wrong = Verifier::new(vec![b], vec![SigningKey::generate().unwrap().public_key()]);
        assert_eq!(
            wrong.verify(&h.id, &ts, &h.signature, b"body", NOW),
            Err(VerifyError::NoMatchingSignature)
        );
        assert!(err(&h.id, &ts, &h.signature, b"body", NOW + 301).is_stale());
        assert!(err(&h.id, &ts, &h.signature, b"body", NOW - 301).is_stale());
        v.verify(&h.id, &ts, &h.signature, b"body", NOW + 300)
            .unwrap();
        assert!(matches!(
            err(&h.id, "12a", &h.signature, b"body", NOW),
            VerifyError::BadTimestamp(_)
        ));
        assert_eq!(
            Verifier::new(vec![], vec![]).verify(&h.id, &ts, &h.signature, b"body", NOW),
            Err(VerifyError::NoKeys)
        );
        // Extreme timestamps are stale, not a panic.
        for (ts, now) in [(i64::MAX, i64::MIN), (i64::MIN, i64::MAX)] {
            assert!(err(&h.id, &ts.to_string(), &h.signature, b"body", now).is_stale());
        }
        let strict = v.clone().with_tolerance(Duration::from_secs(5));
        assert!(
            strict
                .verify(&h.id, &ts, &h.signature, b"body", NOW + 6)
                .is_err()
        );
        assert_eq!(
            Verifier::new(vec![a], vec![]).verify_headers(&http::HeaderMap::new(), b"", NOW),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
    }

    proptest::proptest! {
        #[test]
        fn any_signed_message_verifies_and_any_changed_byte_does_not(
            id in "[!-~]{1,64}",
            ts in -1_000_000_000_000i64..1_000_000_000_000,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            flip in proptest::num::usize::ANY,
        ) {
            let secret = Secret::from_bytes(vec![0x5a; 32]).unwrap();
            let key = SigningKey::from_seed([7; 32]).unwrap();
            let signer = Signer::new(vec![secret.clone()], Some(key.clone())).unwrap();
            let sig = signer.signature(&id, ts, &body).unwrap();
            let ts_text = ts.to_string();
            for v in [
                Verifier::new(vec![secret.clone()], vec![]),
                Verifier::new(vec![], vec![key.public_key()]),
            ] {
                proptest::prop_assert_eq!(v.verify(&id, &ts_text, &sig, &body, ts), Ok(()));
                if !body.is_empty() {
                    let mut changed = body.clone();
                    changed[flip % body.len()] ^= 1;
                    proptest::prop_assert_eq!(
                        v.verify(&id, &ts_text, &sig, &changed, ts),
                        Err(VerifyError::NoMatchingSignature)
                    );
                }
            }
        }
    }
}
