//! Keys: HMAC secrets (`whsec_`), Ed25519 signing keys (`whsk_`) and public keys (`whpk_`),
//! each the standard base64 of its bytes after the prefix, as the Standard Webhooks libraries
//! write them.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::{DecodePaddingMode, general_purpose};
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::KeyPair as _;

/// Standard base64 that accepts input with or without `=` padding (the official libraries
/// accept both).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Bytes of a generated [`Secret`]. The spec asks for 24 to 64.
pub const GENERATED_SECRET_LEN: usize = 32;
/// Smallest secret accepted, bytes (the spec's lower bound).
pub const MIN_SECRET_LEN: usize = 24;
/// Largest secret accepted, bytes (the spec's upper bound).
pub const MAX_SECRET_LEN: usize = 64;

/// Why a key could not be parsed or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text after the prefix is not base64.
    #[error("{what} is not valid base64")]
    Base64 {
        /// Which kind of key.
        what: &'static str,
    },
    /// The key has the wrong number of bytes.
    #[error("{what} has {got} bytes; {want}")]
    Length {
        /// Which kind of key.
        what: &'static str,
        /// Bytes found.
        got: usize,
        /// What is accepted.
        want: &'static str,
    },
    /// The bytes are not a valid key of that kind.
    #[error("{what} is not a valid key")]
    Invalid {
        /// Which kind of key.
        what: &'static str,
    },
    /// The system random generator failed.
    #[error("the system random generator failed")]
    Random,
}

impl KeyError {
    /// True only for [`KeyError::Random`]: the others are configuration mistakes that give
    /// the same answer every time.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Random)
    }
}

fn decode(text: &str, prefix: &str, what: &'static str) -> Result<Vec<u8>, KeyError> {
    let text = text.trim();
    let b64 = text.strip_prefix(prefix).unwrap_or(text);
    LENIENT.decode(b64).map_err(|_| KeyError::Base64 { what })
}

fn random<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut buf = [0u8; N];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| KeyError::Random)?;
    Ok(buf)
}

/// A random `u64` from the system random generator (jitter, message ids).
pub(crate) fn random_u64() -> Result<u64, KeyError> {
    random::<8>().map(u64::from_le_bytes)
}

/// A new message id, `msg_` and 32 hex digits (128 random bits). A message keeps its id
/// across every retry; receivers use it to drop duplicates.
pub fn new_message_id() -> Result<String, KeyError> {
    let bytes = random::<16>()?;
    let mut id = String::with_capacity(4 + 32);
    id.push_str("msg_");
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(id)
}

/// A symmetric signing secret (HMAC-SHA256, signature version `v1`).
///
/// Written `whsec_<base64>`; plain base64 is accepted too. 24 to 64 bytes. `Debug` never
/// shows the key; `Display` does (it is how a secret is handed to a receiver).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The text prefix, `whsec_`.
    pub const PREFIX: &'static str = "whsec_";

    /// A new random secret of [`GENERATED_SECRET_LEN`] bytes from the system generator.
    pub fn generate() -> Result<Self, KeyError> {
        random::<GENERATED_SECRET_LEN>().map(|b| Self(b.to_vec()))
    }

    /// A secret from its raw bytes (24 to 64).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&bytes.len()) {
            return Err(KeyError::Length {
                what: "webhook secret",
                got: bytes.len(),
                want: "24 to 64 are accepted",
            });
        }
        Ok(Self(bytes))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = KeyError;
    /// Parses `whsec_<base64>` or plain base64 (padding optional).
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_bytes(decode(s, Self::PREFIX, "webhook secret")?)
    }
}

impl fmt::Display for Secret {
    /// `whsec_<base64>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, STANDARD.encode(&self.0))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(whsec_<redacted, {} bytes>)", self.0.len())
    }
}

/// An Ed25519 signing key (signature version `v1a`), written `whsk_<base64 of the 32-byte
/// seed>` (plain base64 accepted). Receivers verify with its [`PublicKey`]
/// ([`SigningKey::public_key`]), written `whpk_<base64 of the 32-byte public key>`. `Debug`
/// never shows the seed.
#[derive(Clone)]
pub struct SigningKey {
    seed: [u8; 32],
    pair: Arc<ring::signature::Ed25519KeyPair>,
}

impl SigningKey {
    /// The text prefix, `whsk_`.
    pub const PREFIX: &'static str = "whsk_";

    /// A new random key from the system generator.
    pub fn generate() -> Result<Self, KeyError> {
        Self::from_seed(random::<32>()?)
    }

    /// The key with this 32-byte seed (RFC 8032 private key).
    pub fn from_seed(seed: [u8; 32]) -> Result<Self, KeyError> {
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| {
            KeyError::Invalid {
                what: "ed25519 signing key",
            }
        })?;
        Ok(Self {
            seed,
            pair: Arc::new(pair),
        })
    }

    /// The public key receivers verify `v1a` signatures with.
    pub fn public_key(&self) -> PublicKey {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(pk)
    }

    /// Signs `msg` (64 bytes).
    pub(crate) fn sign(&self, msg: &[u8]) -> ring::signature::Signature {
        self.pair.sign(msg)
    }
}

impl FromStr for SigningKey {
    type Err = KeyError;
    /// Parses `whsk_<base64 of the 32-byte seed>` or plain base64.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bytes = decode(s, Self::PREFIX, "ed25519 signing key")?;
        let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length {
            what: "ed25519 signing key",
            got: bytes.len(),
            want: "the seed is 32",
        })?;
        Self::from_seed(seed)
    }
}

impl fmt::Display for SigningKey {
    /// `whsk_<base64 of the seed>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, STANDARD.encode(self.seed))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SigningKey(whsk_<redacted>, public {})",
            self.public_key()
        )
    }
}

/// An Ed25519 public key, written `whpk_<base64 of 32 bytes>` (plain base64 accepted).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The text prefix, `whpk_`.
    pub const PREFIX: &'static str = "whpk_";

    /// The 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    /// Parses `whpk_<base64>` or plain base64 of the 32 bytes.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bytes = decode(s, Self::PREFIX, "ed25519 public key")?;
        let pk: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length {
            what: "ed25519 public key",
            got: bytes.len(),
            want: "a public key is 32",
        })?;
        Ok(Self(pk))
    }
}

impl fmt::Display for PublicKey {
    /// `whpk_<base64>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Standard padded base64, as signatures are written.
pub(crate) fn b64(bytes: &[u8]) -> String {
    general_purpose::STANDARD.encode(bytes)
}

/// Decodes a signature's base64 (padding optional); `None` when it is not base64.
pub(crate) fn unb64(text: &str) -> Option<Vec<u8>> {
    LENIENT.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_hide_in_debug() {
        let s = Secret::generate().unwrap();
        assert_eq!(s.as_bytes().len(), GENERATED_SECRET_LEN);
        let text = s.to_string();
        assert!(text.starts_with("whsec_"));
        assert_eq!(text.parse::<Secret>().unwrap(), s);
        // Plain base64, unpadded too.
        let plain = &text["whsec_".len()..];
        assert_eq!(plain.parse::<Secret>().unwrap(), s);
        assert_eq!(plain.trim_end_matches('=').parse::<Secret>().unwrap(), s);
        let dbg = format!("{s:?}");
        assert!(!dbg.contains(plain) && !dbg.contains(plain.trim_end_matches('=')));
        assert_ne!(Secret::generate().unwrap(), s);
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(matches!(
            "whsec_not base64!".parse::<Secret>(),
            Err(KeyError::Base64 { .. })
        ));
        // 3 bytes.
        assert!(matches!(
            "whsec_AAAA".parse::<Secret>(),
            Err(KeyError::Length { got: 3, .. })
        ));
        assert!(Secret::from_bytes(vec![7; 65]).is_err());
        assert!(Secret::from_bytes(vec![7; 24]).is_ok());
    }

    #[test]
    fn signing_keys_round_trip_and_publish_their_public_key() {
        let k = SigningKey::generate().unwrap();
        let text = k.to_string();
        assert!(text.starts_with("whsk_"));
        let back: SigningKey = text.parse().unwrap();
        assert_eq!(back.public_key(), k.public_key());
        let pk = k.public_key().to_string();
        assert!(pk.starts_with("whpk_"));
        assert_eq!(pk.parse::<PublicKey>().unwrap(), k.public_key());
        assert!(!format!("{k:?}").contains(&text["whsk_".len()..]));
        assert!(matches!(
            "whsk_AAAA".parse::<SigningKey>(),
            Err(KeyError::Length { got: 3, .. })
        ));
    }

    #[test]
    fn rfc8032_test_vector_1() {
        // RFC 8032 section 7.1, TEST 1: the seed's public key and the signature of "".
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let seed = hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let k = SigningKey::from_seed(seed.try_into().unwrap()).unwrap();
        assert_eq!(
            k.public_key().as_bytes().to_vec(),
            hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        );
        assert_eq!(
            k.sign(b"").as_ref().to_vec(),
            hex(concat!(
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155",
                "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
            ))
        );
    }

    #[test]
    fn message_ids_are_unique_and_header_safe() {
        let a = new_message_id().unwrap();
        let b = new_message_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert!(a.starts_with("msg_") && a[4..].bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
