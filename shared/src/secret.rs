//! Helpers that keep secrets out of logs, metrics, traces and errors.

/// Masks the password of a connection URL: `postgres://u:****@host/db`.
///
/// A string that does not parse as a URL might still hold a secret, so it is not echoed at all.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Setting a password only fails for URLs that cannot have one, which had none.
                let _ = url.set_password(Some("****"));
            }
            url.set_query(None);
            url.to_string()
        }
        Err(_) => "<unparseable URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn masks_passwords_and_drops_queries() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:****@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("redis://:pw@r:6379/0?password=x"), "redis://:****@r:6379/0");
        assert_eq!(redact_url("not a url with secret"), "<unparseable URL>");
    }
}
