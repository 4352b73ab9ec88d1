//! Signed notifications: with a subscription's signing secret, a rest-hook request carries
//! - `X-Signature`: hex HMAC-SHA256 of the exact body bytes (Medplum's header and encoding,
//!   so receivers written for Medplum verify it unchanged);
//! - `X-Signature-Timestamp`: the Unix time of the send, in seconds;
//! - `X-Signature-Timestamped`: hex HMAC-SHA256 of `"{timestamp}." + body`, so a receiver
//!   that also checks the timestamp is recent refuses a replayed request.
//!
//! A resend (a retry, or after a kill) is signed anew with its own timestamp.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signature headers for `body` sent at `timestamp`.
pub(crate) fn headers(secret: &str, body: &[u8], timestamp: i64) -> [(&'static str, String); 3] {
    let ts = timestamp.to_string();
    [
        ("X-Signature", hmac_hex(secret, &[body])),
        ("X-Signature-Timestamp", ts.clone()),
        (
            "X-Signature-Timestamped",
            hmac_hex(secret, &[ts.as_bytes(), b".", body]),
        ),
    ]
}

fn hmac_hex(secret: &str, parts: &[&[u8]]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let [(name, sig), (_, ts), (_, stamped)] =
            headers("Jefe", b"what do ya want for nothing?", 1_700_000_000);
        assert_eq!(name, "X-Signature");
        assert_eq!(
            sig,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(ts, "1700000000");
        assert_eq!(
            stamped,
            hmac_hex("Jefe", &[b"1700000000.what do ya want for nothing?"])
        );
        assert_ne!(stamped, sig);
    }
}
