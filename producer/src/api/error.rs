//! Errors as JSON (`{"error": {"code", "message", "field"}}`), and extractors that turn every bad
//! body, query or path into a 400 naming the offending field.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `bad_request`, `unauthorized`, `not_found`, `unavailable`, `bad_gateway` or `internal`.
    pub code: String,
    pub message: String,
    /// The offending field of the body, query or path, when one is to blame.
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, code: "not_found", message: message.into(), field: None }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "a valid bearer token is required (Authorization: Bearer <token>)".into(),
            field: None,
        }
    }

    /// 401 with a specific reason (a webhook's signature, say).
    pub fn unauthorized_with(message: impl Into<String>) -> Self {
        Self { message: message.into(), ..Self::unauthorized() }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self { status: StatusCode::FORBIDDEN, code: "forbidden", message: message.into(), field: None }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self { status: StatusCode::CONFLICT, code: "conflict", message: message.into(), field: None }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: message.into(),
            field: None,
        }
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_GATEWAY, code: "bad_gateway", message: message.into(), field: None }
    }

    /// A failure on our side: logged in full, answered without internals.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "An API request failed.");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "the request failed on the server; see the producer's log".into(),
            field: None,
        }
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        // PostgreSQL being away is an outage, not a bug: 503, so clients retry.
        let text = e.to_string();
        if matches!(e, sea_orm::DbErr::ConnectionAcquire(_) | sea_orm::DbErr::Conn(_)) {
            tracing::warn!(error = %text, "PostgreSQL is unavailable for an API request.");
            return Self::unavailable("PostgreSQL is unavailable; try again");
        }
        Self::internal(text)
    }
}

impl From<super::model::FieldError> for ApiError {
    fn from(e: super::model::FieldError) -> Self {
        Self::bad_request(e.field, format!("{}: {}", e.field, e.message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail { code: self.code.into(), message: self.message, field: self.field },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The field a serde error names: the path where it happened, or the field in backticks of
/// "missing field `x`" / "unknown field `x`" at the top level.
fn field_of(path: &str, message: &str) -> Option<String> {
    if !path.is_empty() && path != "." {
        return Some(path.to_string());
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// The path of the first string or key in `value` that holds a NUL character.
fn nul_in(value: &serde_json::Value, path: &str) -> Option<String> {
    let join = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match value {
        serde_json::Value::String(s) if s.contains('\0') => Some(path.to_string()),
        serde_json::Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, v)| nul_in(v, &join(&i.to_string())))
        }
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') { Some(join(&k.replace('\0', "\\0"))) } else { nul_in(v, &join(k)) }
        }),
        _ => None,
    }
}

/// A 400 naming the field a deserialization failed on (`whole` when no field is to blame).
fn deserialize_error<E: std::fmt::Display>(e: &serde_path_to_error::Error<E>, whole: &str) -> ApiError {
    let message = e.inner().to_string();
    let field = field_of(&e.path().to_string(), &message).unwrap_or_else(|| whole.into());
    ApiError::bad_request(field.clone(), format!("{field}: {message}"))
}

/// A JSON body; anything wrong with it (size, syntax, types, unknown or missing fields) is a
/// 400 naming the field.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json =
            req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(
                |ct| ct.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")),
            );
        if !is_json {
            return Err(ApiError::bad_request(
                "body",
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::bad_request("body", "the body is too large")
            } else {
                ApiError::bad_request("body", format!("the body could not be read: {}", e.body_text()))
            }
        })?;
        // PostgreSQL text cannot hold NUL: refuse it here rather than fail on the write.
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(field) = nul_in(&value, "")
        {
            let field = if field.is_empty() { "body".to_string() } else { field };
            return Err(ApiError::bad_request(
                field.clone(),
                format!("{field}: NUL characters are not accepted"),
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de).map(ApiJson).map_err(|e| deserialize_error(&e, "body"))
    }
}

/// Query parameters; a wrong type, an unknown value or an unknown parameter is a 400 naming it.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(ApiQuery).map_err(|e| deserialize_error(&e, "query"))
    }
}

/// The `{id}` path segment as a Notion id (dashes optional); anything else is a 400 on `id`.
pub struct IdPath(pub uuid::Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) = axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("id", format!("id: {}", e.body_text())))?;
        super::model::parse_id(&raw).map(IdPath).map_err(|m| ApiError::bad_request("id", format!("id: {m}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_found_with_their_path() {
        let v = serde_json::json!({"a": "ok", "b": {"c": ["x", "y\0"]}});
        assert_eq!(nul_in(&v, ""), Some("b.c.1".into()));
        assert_eq!(nul_in(&serde_json::json!({"integration": "fine"}), ""), None);
    }

    #[test]
    fn the_field_comes_from_the_path_or_the_message() {
        assert_eq!(field_of("mode", "unknown variant `x`"), Some("mode".into()));
        assert_eq!(field_of(".", "missing field `database`"), Some("database".into()));
        assert_eq!(field_of("", "unknown field `extra`, expected one of"), Some("extra".into()));
        assert_eq!(field_of(".", "EOF while parsing"), None);
    }
}
