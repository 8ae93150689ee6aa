//! Signing: the `webhook-signature` value and the three Standard Webhooks headers.

use crate::keys::{Secret, SigningKey, b64};

/// Header carrying the message id, stable across retries of one message.
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the signing time, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the space-separated signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// The content every signature covers: `{id}.{timestamp}.{body}`.
pub(crate) fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(id.len() + 22 + body.len());
    out.extend_from_slice(id.as_bytes());
    out.push(b'.');
    out.extend_from_slice(timestamp.to_string().as_bytes());
    out.push(b'.');
    out.extend_from_slice(body);
    out
}

/// HMAC-SHA256 of `content` under `secret`.
pub(crate) fn hmac(secret: &Secret, content: &[u8]) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, content)
}

/// The three headers of one signed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookHeaders {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`, Unix seconds.
    pub timestamp: i64,
    /// `webhook-signature`: `v1,<base64>` per secret, then `v1a,<base64>` when an Ed25519
    /// key is configured, separated by single spaces.
    pub signature: String,
}

impl WebhookHeaders {
    /// `(name, value)` pairs, in the order `webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`.
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        [
            (HEADER_ID, self.id.clone()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_SIGNATURE, self.signature.clone()),
        ]
    }
}

/// Why a [`Signer`] could not be made or a message not signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// Neither a secret nor an Ed25519 key was given.
    #[error("no webhook secret or signing key is configured")]
    NoKeys,
    /// The message id is empty, longer than 256 bytes, or has a character outside
    /// printable ASCII (it travels in a header and in the signed content).
    #[error("bad webhook message id {0:?}")]
    BadId(String),
}

impl SignError {
    /// Always false: these are configuration or caller mistakes.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Signs messages with every configured key. Cheap to clone; needs no runtime.
#[derive(Debug, Clone)]
pub struct Signer {
    secrets: Vec<Secret>,
    ed25519: Option<SigningKey>,
}

impl Signer {
    /// A signer with `secrets` (one `v1` signature each, in this order: during a rotation
    /// list the new secret and the old one) and an optional Ed25519 key (`v1a`). At least one
    /// key is required.
    pub fn new(secrets: Vec<Secret>, ed25519: Option<SigningKey>) -> Result<Self, SignError> {
        if secrets.is_empty() && ed25519.is_none() {
            return Err(SignError::NoKeys);
        }
        Ok(Self { secrets, ed25519 })
    }

    /// The `webhook-signature` value for message `id` signed at `timestamp` (Unix seconds)
    /// with `body` (the exact bytes sent): `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
    /// per secret, then `v1a,<base64 Ed25519 signature of the same content>`, space-separated.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> Result<String, SignError> {
        check_id(id)?;
        let content = signed_content(id, timestamp, body);
        let mut parts: Vec<String> = self
            .secrets
            .iter()
            .map(|s| format!("v1,{}", b64(hmac(s, &content).as_ref())))
            .collect();
        if let Some(k) = &self.ed25519 {
            parts.push(format!("v1a,{}", b64(k.sign(&content).as_ref())));
        }
        Ok(parts.join(" "))
    }

    /// The three headers for message `id` signed at `timestamp` with `body`.
    pub fn headers(
        &self,
        id: &str,
        timestamp: i64,
        body: &[u8],
    ) -> Result<WebhookHeaders, SignError> {
        Ok(WebhookHeaders {
            id: id.to_owned(),
            timestamp,
            signature: self.signature(id, timestamp, body)?,
        })
    }
}

fn check_id(id: &str) -> Result<(), SignError> {
    let ok = !id.is_empty() && id.len() <= 256 && id.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SignError::BadId(id.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_vector() {
        // The example in the Standard Webhooks libraries' test suites.
        let secret: Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let signer = Signer::new(vec![secret], None).unwrap();
        let sig = signer
            .signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#,
            )
            .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn one_entry_per_key_in_order() {
        let a = Secret::generate().unwrap();
        let b = Secret::generate().unwrap();
        let k = SigningKey::generate().unwrap();
        let s = Signer::new(vec![a.clone(), b.clone()], Some(k)).unwrap();
        let h = s.headers("msg_1", 1700000000, b"{}").unwrap();
        let parts: Vec<&str> = h.signature.split(' ').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts[0].starts_with("v1,") && parts[1].starts_with("v1,"));
        assert!(parts[2].starts_with("v1a,"));
        let only_a = Signer::new(vec![a], None).unwrap();
        assert_eq!(
            only_a.signature("msg_1", 1700000000, b"{}").unwrap(),
            parts[0]
        );
        assert_eq!(h.pairs()[1], ("webhook-timestamp", "1700000000".to_owned()));
    }

    #[test]
    fn refuses_no_keys_and_bad_ids() {
        assert_eq!(Signer::new(vec![], None).unwrap_err(), SignError::NoKeys);
        let s = Signer::new(vec![Secret::generate().unwrap()], None).unwrap();
        for id in ["", "msg 1", "msg\n1", "é"] {
            assert!(matches!(s.signature(id, 1, b""), Err(SignError::BadId(_))));
        }
    }
}
