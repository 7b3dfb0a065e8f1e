//! The Redis connection pool (coordination only: rate budgets, locks, leader leases), for a
//! single server, a Sentinel-managed primary or a Redis Cluster (`redis.mode`).
//!
//! Every key the fleet touches carries a hash tag (`{integration}`, `{database}`), and every
//! script and transaction touches keys of one tag only, so all three work unchanged on a
//! Cluster. Under Sentinel, a connection that fails is dropped by the pool and the next one is
//! made to whichever server the sentinels name as primary at that moment.

use std::time::Duration;

use deadpool_redis::{Runtime, cluster, sentinel};
use redis::aio::ConnectionLike;
use secrecy::ExposeSecret;

use crate::config::{RedisMode, RedisSettings};

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("cannot connect to Redis at {url}: {message}")]
    Connect { url: String, message: String },
}

/// A pool over whichever kind of deployment is configured. Cheap to clone.
#[derive(Clone)]
pub enum RedisPool {
    Standalone(deadpool_redis::Pool),
    Sentinel(sentinel::Pool),
    Cluster(cluster::Pool),
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::Standalone(_) => "standalone",
            Self::Sentinel(_) => "sentinel",
            Self::Cluster(_) => "cluster",
        };
        f.debug_tuple("RedisPool").field(&kind).finish()
    }
}

/// A pooled connection; it goes back to its pool when dropped. (The larger kinds are boxed so
/// every future that holds one stays small.)
pub enum RedisConnection {
    Standalone(deadpool_redis::Connection),
    Sentinel(Box<sentinel::Connection>),
    Cluster(Box<cluster::Connection>),
}

impl RedisPool {
    /// A connection from the pool (made anew when none is idle). The sentinel and cluster
    /// pools' futures are large, so they are boxed.
    pub async fn get(&self) -> Result<RedisConnection, deadpool_redis::PoolError> {
        Ok(match self {
            Self::Standalone(pool) => RedisConnection::Standalone(pool.get().await?),
            Self::Sentinel(pool) => RedisConnection::Sentinel(Box::new(Box::pin(pool.get()).await?)),
            Self::Cluster(pool) => RedisConnection::Cluster(Box::new(Box::pin(pool.get()).await?)),
        })
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Sentinel(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Sentinel(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Sentinel mode: the primary's (user, password). Configured ones win; otherwise those of the
/// first sentinel URL, percent-decoded as redis-rs decodes a URL's (`p%40ss` is `p@ss` for both
/// the sentinels and the primary). The URL's user goes with the URL's password only.
fn node_credentials(settings: &RedisSettings) -> (Option<String>, Option<String>) {
    let first = settings.urls().first().and_then(|u| url::Url::parse(u).ok());
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let from_url = first.as_ref().and_then(|u| u.password().map(|p| (decode(u.username()), decode(p))));
    let (password, url_user) = match (&settings.node_password, from_url) {
        (Some(p), _) => (Some(p.expose_secret().to_string()), None),
        (None, Some((user, p))) => (Some(p), Some(user).filter(|u| !u.is_empty())),
        (None, None) => (None, None),
    };
    (settings.node_username.clone().or(url_user), password)
}

/// The pool for `settings.mode`, unchecked (no server is contacted yet).
fn build(settings: &RedisSettings) -> Result<RedisPool, String> {
    let urls: Vec<String> = settings.urls().into_iter().map(str::to_string).collect();
    match settings.mode {
        RedisMode::Standalone => deadpool_redis::Config::from_url(urls.first().cloned().unwrap_or_default())
            .create_pool(Some(Runtime::Tokio1))
            .map(RedisPool::Standalone)
            .map_err(|e| e.to_string()),
        RedisMode::Cluster => cluster::Config::from_urls(urls)
            .create_pool(Some(Runtime::Tokio1))
            .map(RedisPool::Cluster)
            .map_err(|e| e.to_string()),
        RedisMode::Sentinel => {
            let (username, password) = node_credentials(settings);
            let node = sentinel::SentinelNodeConnectionInfo {
                tls_mode: None,
                redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                    db: settings.db,
                    username,
                    password,
                    protocol: Default::default(),
                }),
            };
            sentinel::Config::from_urls(
                urls,
                settings.sentinel_master.clone(),
                sentinel::SentinelServerType::Master,
            )
            .with_node_connection_info(Some(node))
            .create_pool(Some(Runtime::Tokio1))
            .map(RedisPool::Sentinel)
            .map_err(|e| e.to_string())
        }
    }
}

/// Creates a pool and checks that the server answers `PING` (under Sentinel: that the
/// sentinels name a primary and it answers).
pub async fn connect(settings: &RedisSettings) -> Result<RedisPool, RedisError> {
    let raw = settings.url.expose_secret();
    let fail = |message: String| {
        let mut message = crate::secret::scrub(&message, raw);
        for url in settings.urls() {
            message = crate::secret::scrub(&message, url);
        }
        if let Some(password) =
            settings.node_password.as_ref().map(|p| p.expose_secret()).filter(|p| p.len() >= 2)
        {
            message = message.replace(password, "****");
        }
        RedisError::Connect { url: settings.display_url(), message }
    };
    let pool = build(settings).map_err(fail)?;
    let ping = async {
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), ping).await {
        Ok(Ok(_)) => Ok(pool),
        Ok(Err(message)) => Err(fail(message)),
        Err(_) => Err(fail("no answer within 5s".into())),
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    fn settings(url: &str, node_password: Option<&str>) -> RedisSettings {
        RedisSettings {
            mode: RedisMode::Sentinel,
            url: SecretString::from(url.to_string()),
            node_password: node_password.map(|p| SecretString::from(p.to_string())),
            ..RedisSettings::default()
        }
    }

    #[test]
    fn the_primary_gets_decoded_url_credentials_or_the_configured_password_alone() {
        let s = settings("redis://:p%40ss@s1:26379,redis://s2:26379", None);
        assert_eq!(node_credentials(&s), (None, Some("p@ss".to_string())));
        let s = settings("redis://sentinel-user:spw@s1:26379", None);
        assert_eq!(node_credentials(&s), (Some("sentinel-user".into()), Some("spw".into())));
        // A configured password does not borrow the sentinels' user.
        let s = settings("redis://sentinel-user:spw@s1:26379", Some("nodepw"));
        assert_eq!(node_credentials(&s), (None, Some("nodepw".into())));
        let s = settings("redis://s1:26379", None);
        assert_eq!(node_credentials(&s), (None, None));
    }
}
