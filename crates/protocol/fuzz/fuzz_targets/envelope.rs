//! Fuzz the envelope decoder: any text must decode to an envelope or a typed error, never
//! panic, and whatever decodes must survive `encode` and decode again to the same envelope.
//!
//! `cd crates/protocol/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run envelope -- -runs=1000000`
#![no_main]

use kiln_protocol::Envelope;
use libfuzzer_sys::fuzz_target;

/// The frame limit the gateway uses by default.
const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(env) = Envelope::decode(text, MAX) else {
        return;
    };
    let again = Envelope::decode(&env.encode(), usize::MAX)
        .unwrap_or_else(|e| panic!("an encoded envelope does not decode: {e}"));
    assert_eq!(env, again, "encode/decode changed the envelope");
});
