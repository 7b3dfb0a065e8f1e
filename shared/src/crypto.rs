//! Encryption of Notion tokens at rest with AES-256-GCM.
//!
//! The stored form is `nonce (12 bytes) || ciphertext+tag`. A fresh random nonce is drawn for every
//! encryption, so the same token never encrypts to the same bytes twice.

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("encryption key must be base64 of exactly 32 bytes")]
    BadKey,
    #[error("stored token could not be decrypted (wrong encryption key or corrupted row)")]
    Decrypt,
    #[error("token could not be encrypted")]
    Encrypt,
}

/// Encrypts and decrypts integration tokens. Its `Debug` never prints the key.
#[derive(Clone)]
pub struct TokenCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCipher([REDACTED])")
    }
}

impl TokenCipher {
    pub fn from_base64(key: &SecretString) -> Result<Self, CryptoError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.expose_secret().trim())
            .map_err(|_| CryptoError::BadKey)?;
        if bytes.len() != 32 {
            return Err(CryptoError::BadKey);
        }
        Ok(Self { cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)) })
    }

    /// A new random key, base64-encoded, for `syncfleet-producer keygen` and tests.
    pub fn generate_key() -> SecretString {
        let key = Aes256Gcm::generate_key(OsRng);
        SecretString::from(base64::engine::general_purpose::STANDARD.encode(key))
    }

    pub fn encrypt(&self, token: &SecretString) -> Result<Vec<u8>, CryptoError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(&nonce, token.expose_secret().as_bytes())
            .map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    pub fn decrypt(&self, stored: &[u8]) -> Result<SecretString, CryptoError> {
        if stored.len() <= NONCE_LEN {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ciphertext) = stored.split_at(NONCE_LEN);
        let plain =
            self.cipher.decrypt(Nonce::from_slice(nonce), ciphertext).map_err(|_| CryptoError::Decrypt)?;
        String::from_utf8(plain).map(SecretString::from).map_err(|_| CryptoError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_a_wrong_key() {
        let cipher = TokenCipher::from_base64(&TokenCipher::generate_key()).expect("fresh key");
        let stored = cipher.encrypt(&SecretString::from("secret_abc")).expect("encrypts");
        assert!(!stored.windows(10).any(|w| w == b"secret_abc"));
        assert_eq!(cipher.decrypt(&stored).expect("decrypts").expose_secret(), "secret_abc");
        let other = TokenCipher::from_base64(&TokenCipher::generate_key()).expect("fresh key");
        assert!(matches!(other.decrypt(&stored), Err(CryptoError::Decrypt)));
        assert!(matches!(
            TokenCipher::from_base64(&SecretString::from("c2hvcnQ=")),
            Err(CryptoError::BadKey)
        ));
    }
}
