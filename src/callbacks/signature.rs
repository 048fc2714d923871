//! The `wfq-signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//! `<t>.<body>`, keyed with the `[callbacks]` secret. Signing the timestamp
//! with the body lets a receiver refuse old (replayed) deliveries.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "wfq-signature";

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value for `body` sent at `timestamp` (unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// Checks a received header against the exact body bytes: the `v1`
/// signature must match (compared in constant time) and `t` must be within
/// `tolerance_secs` of `now` (unix seconds). For receivers written in Rust.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64, tolerance_secs: i64) -> bool {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return false;
    };
    if (now - timestamp).abs() > tolerance_secs {
        return false;
    }
    signatures
        .iter()
        .any(|s| mac(secret, timestamp, body).verify_slice(s).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec-test-0123456789";
    const BODY: &[u8] = br#"{"id":42,"state":"succeeded"}"#;

    #[test]
    fn signature_matches_a_reference_implementation() {
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"whsec-test-0123456789",
        //   b"1764072000." + b"{\"id\":42,\"state\":\"succeeded\"}", hashlib.sha256).hexdigest())'
        assert_eq!(
            sign(SECRET, 1_764_072_000, BODY),
            "t=1764072000,v1=aac74e8c9adb9b634824cb6ce623ae7bc1fb98580cb10b06bfca8e4fbc30e0e4"
        );
    }

    #[test]
    fn verify_accepts_the_signature_and_refuses_changes_and_replays() {
        let header = sign(SECRET, 1_764_072_000, BODY);
        assert!(verify(SECRET, &header, BODY, 1_764_072_010, 300));
        // another body, another secret, another time in the header
        assert!(!verify(
            SECRET,
            &header,
            br#"{"id":43,"state":"succeeded"}"#,
            1_764_072_010,
            300
        ));
        assert!(!verify(
            b"another-secret-000000",
            &header,
            BODY,
            1_764_072_010,
            300
        ));
        let moved = header.replace("t=1764072000", "t=1764072005");
        assert!(!verify(SECRET, &moved, BODY, 1_764_072_010, 300));
        // a replay after the tolerance, and headers that are not signatures
        assert!(!verify(SECRET, &header, BODY, 1_764_072_301, 300));
        assert!(!verify(SECRET, "v1=00", BODY, 1_764_072_000, 300));
        assert!(!verify(SECRET, "", BODY, 1_764_072_000, 300));
        assert!(!verify(
            SECRET,
            "t=1764072000,v1=zz",
            BODY,
            1_764_072_000,
            300
        ));
    }
}
