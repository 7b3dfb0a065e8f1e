//! Notion's webhook signatures: `X-Notion-Signature: sha256=<hex>`, the HMAC-SHA256 of the raw
//! request body keyed with the subscription's verification token. Shared by the producer, which
//! checks them, and `notion-sim`, which signs what it sends.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header Notion signs its deliveries in.
pub const SIGNATURE_HEADER: &str = "x-notion-signature";

/// HMAC-SHA256 keyed with `token` (HMAC takes keys of any length, so this is always `Some`).
fn keyed(token: &[u8]) -> Option<Hmac<Sha256>> {
    Hmac::<Sha256>::new_from_slice(token).ok()
}

/// The header value for `body` signed with `token`.
pub fn sign(token: &[u8], body: &[u8]) -> Option<String> {
    let mut mac = keyed(token)?;
    mac.update(body);
    Some(format!("sha256={}", hex::encode(mac.finalize().into_bytes())))
}

/// Whether `header` is `body`'s signature under `token`, compared in constant time. Anything
/// malformed (no `sha256=` prefix, not hex, wrong length) is simply not a match.
pub fn verify(token: &[u8], body: &[u8], header: &str) -> bool {
    let Some(digest) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(digest) = hex::decode(digest) else {
        return false;
    };
    let Some(mut mac) = keyed(token) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

/// A token shown in logs: its first characters and its length, never the rest.
pub fn mask(token: &str) -> String {
    let shown: String = token.chars().take(8).collect();
    format!("{shown}… ({} characters)", token.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_anything_else_does_not() {
        let body = br#"{"id":"e1","type":"page.created"}"#;
        let header = sign(b"secret_token", body).expect("signed");
        assert!(header.starts_with("sha256=") && header.len() == 7 + 64);
        assert!(verify(b"secret_token", body, &header));
        assert!(verify(b"secret_token", body, &format!(" {header} ")));
        assert!(!verify(b"other_token", body, &header));
        assert!(!verify(b"secret_token", b"{}", &header));
        for bad in
            ["", "sha256=", "sha256=zz", "md5=00", &header[7..], &header[..header.len() - 2], "sha256=Ω"]
        {
            assert!(!verify(b"secret_token", body, bad), "{bad:?}");
        }
    }

    #[test]
    fn a_masked_token_keeps_only_its_start() {
        let masked = mask("secret_abcdefghijklmnopqrstuvwxyz");
        assert!(masked.starts_with("secret_a") && !masked.contains("bcdefgh"), "{masked}");
    }
}
