//! Bearer-token authentication for `/v1/*`.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::Modify;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::AppState;
use super::error::ApiError;

/// The accepted tokens, kept only as SHA-256 digests.
pub struct Tokens(Vec<[u8; 32]>);

impl Tokens {
    pub fn new(tokens: &[SecretString]) -> Self {
        Self(tokens.iter().map(|t| digest(t.expose_secret().as_bytes())).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `presented` is one of the tokens. Every stored digest is compared, in constant
    /// time, whatever matches.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let d = digest(presented);
        self.0.iter().fold(subtle::Choice::from(0), |found, t| found | t.ct_eq(&d)).into()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Refuses a request without a valid `Authorization: Bearer <token>` with a JSON 401.
pub async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match presented {
        Some(token) if !token.is_empty() && state.tokens.accepts(token.as_bytes()) => next.run(request).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Declares the `bearer` security scheme in the document.
pub struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_tokens_are_accepted() {
        let tokens = Tokens::new(&[SecretString::from("alpha"), SecretString::from("beta-longer")]);
        assert!(tokens.accepts(b"alpha"));
        assert!(tokens.accepts(b"beta-longer"));
        assert!(!tokens.accepts(b"alph"));
        assert!(!tokens.accepts(b"alphaa"));
        assert!(!tokens.accepts(b""));
        assert!(!Tokens::new(&[]).accepts(b""));
    }
}
