//! Helpers that keep secrets out of logs, metrics, traces and errors.

/// Masks the password of a connection URL: `postgres://u:****@host/db`.
///
/// A string that does not parse as a URL might still hold a secret, so it is not echoed at all;
/// neither is one without a host (`amqp:guest:s3cret@host`, `postgres:/u:pw@db` parse with the
/// credentials in the path, where no password field can mask them).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(url) if !url.has_host() => format!("{}:<URL without a host, not shown>", url.scheme()),
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

/// Whether a URL has the `scheme://…` form of a connection URL (the host may be empty, as in
/// `postgres:///db?host=/run/postgresql`); forms without `//` (`amqp:guest:pw@host`) keep
/// credentials in the path, where no redaction finds them.
pub fn has_authority(raw: &str) -> bool {
    url::Url::parse(raw).is_ok() && raw.split_once(':').is_some_and(|(_, rest)| rest.starts_with("//"))
}

/// Removes a URL's secrets from a message that may quote it (a client library's error): the
/// whole URL, its password and its user-info are replaced by masks.
pub fn scrub(message: &str, raw_url: &str) -> String {
    let mut out = message.replace(raw_url, &redact_url(raw_url));
    if let Ok(url) = url::Url::parse(raw_url)
        && let Some(password) = url.password().filter(|p| p.len() >= 2)
    {
        out = out.replace(password, "****");
    }
    // A URL without a host keeps everything after the scheme in its path.
    if let Some((_, rest)) = raw_url.split_once(':')
        && let Some(at) = rest.rfind('@')
    {
        if rest.len() >= 3 {
            out = out.replace(rest, "<not shown>");
        }
        let userinfo = rest[..at].trim_start_matches('/');
        if let Some((_, password)) = userinfo.split_once(':')
            && password.len() >= 2
        {
            out = out.replace(password, "****");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{has_authority, redact_url, scrub};

    #[test]
    fn urls_without_a_host_are_never_echoed() {
        for raw in ["amqp:guest:s3cret@host", "postgres:/u:pw@db", "redis:x:hunter2@r"] {
            let shown = redact_url(raw);
            assert!(
                !shown.contains("s3cret") && !shown.contains("pw@") && !shown.contains("hunter2"),
                "{shown}"
            );
            assert!(!has_authority(raw), "{raw}");
        }
        assert!(has_authority("amqp://guest:guest@127.0.0.1:5672/%2f"));
        assert!(
            has_authority("postgres:///syncfleet?host=/run/postgresql&user=app"),
            "unix sockets stay possible"
        );
        assert!(has_authority("redis+unix:///run/redis.sock"));
    }

    #[test]
    fn scrub_removes_quoted_credentials() {
        let raw = "amqp:guest:s3cret@host";
        let message = format!("Invalid URL: '{raw}' (s3cret)");
        let clean = scrub(&message, raw);
        assert!(!clean.contains("s3cret"), "{clean}");
        let raw = "postgres://u:pw-long@db/x";
        let clean = scrub("error connecting to postgres://u:pw-long@db/x: pw-long", raw);
        assert!(!clean.contains("pw-long"), "{clean}");
    }

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
