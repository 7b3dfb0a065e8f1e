//! The status page: one HTML document with its style and script inline, embedded in the binary
//! (no build step, no CDN). Every value from Notion or from an error is inserted as text
//! (`textContent`), never as markup.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("assets/status.html");

pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page loads nothing from elsewhere and runs only its own inline script.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        INDEX,
    )
}
