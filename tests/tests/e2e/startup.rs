//! Wrong configuration and dead servers give a clear error naming the service, with passwords
//! masked, and a non-zero exit; secrets never reach the logs.

use std::process::Stdio;
use std::time::Duration;

use secrecy::SecretString;
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::{TestEnv, binary};
use syncfleet_tests::sim::SimConfig;

use crate::LONG;

async fn run_worker(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(binary("syncfleet-worker").expect("built"));
    cmd.env_remove("RUST_LOG").stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("exits in time")
        .expect("runs");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_malformed_setting_names_the_key_and_exits_2() {
    let (code, err) = run_worker(&[("SYNCFLEET_WORKER__CONCURRENCY", "lots")]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("worker.concurrency"), "{err}");
    let (code, err) = run_worker(&[("SYNCFLEET_WORKER__CONCURRENCY", "0")]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("between 1 and 512"), "{err}");
    let (code, err) = run_worker(&[("SYNCFLEET_ENCRYPTION_KEY", "dG9vIHNob3J0")]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("encryption_key") && !err.contains("dG9vIHNob3J0"), "{err}");
}

#[tokio::test]
async fn dead_servers_are_named_with_their_password_masked() {
    let pg = "postgres://app:pg-hunter2@127.0.0.1:1/syncfleet";
    let cases = [
        (
            vec![("SYNCFLEET_DATABASE__URL", pg)],
            "PostgreSQL",
            "postgres://app:****@127.0.0.1:1/syncfleet",
            "pg-hunter2",
        ),
        (
            vec![
                ("SYNCFLEET_DATABASE__URL", "postgres://postgres@127.0.0.1:5432/postgres"),
                ("SYNCFLEET_REDIS__URL", "redis://:rd-hunter2@127.0.0.1:1"),
            ],
            "Redis",
            "redis://:****@127.0.0.1:1",
            "rd-hunter2",
        ),
        (
            vec![
                ("SYNCFLEET_DATABASE__URL", "postgres://postgres@127.0.0.1:5432/postgres"),
                ("SYNCFLEET_AMQP__URL", "amqp://guest:mq-hunter2@127.0.0.1:1/%2f"),
            ],
            "RabbitMQ",
            "amqp://guest:****@127.0.0.1:1/%2f",
            "mq-hunter2",
        ),
    ];
    for (env, service, shown, secret) in cases {
        let (code, err) = run_worker(&env).await;
        assert_eq!(code, Some(1), "{service}: {err}");
        assert!(err.contains(service) && err.contains(shown), "{service}: {err}");
        assert!(!err.contains(secret), "{service} leaked its password: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test]
async fn an_unreachable_notion_is_a_clear_error_for_the_producer() {
    let env = TestEnv::start(SimConfig { pages: 1, ..SimConfig::default() }).await.expect("env");
    let mut settings = env.settings.clone();
    settings.notion.base_url = "http://127.0.0.1:1".into();
    settings.notion.max_transient_retries = 0;
    syncfleet_producer::commands::integration::save(
        &settings,
        "acme",
        None,
        None,
        None,
        &SecretString::from("secret_x".to_string()),
    )
    .await
    .expect("save");
    let err = syncfleet_producer::commands::database::add(
        &settings,
        "acme",
        uuid::Uuid::new_v4(),
        None,
        None,
        false,
    )
    .await
    .expect_err("Notion is down");
    let text = format!("{err:#}");
    assert!(text.contains("Notion") && text.contains("http://127.0.0.1:1"), "{text}");
    assert!(!text.contains("secret_x"), "{text}");
    env.cleanup().await;
}

#[tokio::test]
async fn tokens_keys_and_passwords_never_appear_in_worker_logs() {
    let token = "secret_ZXhfdG9rZW5fdmFsdWU";
    let sim = SimConfig { pages: 200, rate: 0.0, tokens: vec![token.into()], ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    // Trust auth ignores the password, so it can ride along in the URL and be checked for.
    let url = format!("postgres://postgres:pw-Zq81x@127.0.0.1:5432/{}", env.name);
    env.settings.database.url = SecretString::from(url);
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.sim_admin("faults", serde_json::json!({"status": 503, "count": 1})).await.expect("fault");
    let mut cmd = env.worker_command(1).expect("command");
    cmd.env("SYNCFLEET_LOG_FORMAT", "json").env("SYNCFLEET_LOG_LEVEL", "debug");
    let mut child = cmd.spawn().expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(run, LONG).await.expect("run").status, "succeeded");
    let _ = child.kill().await;
    let log = env.log();
    assert!(log.lines().count() > 3, "{log}");
    assert!(log.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "JSON lines:\n{log}");
    use secrecy::ExposeSecret;
    let key = env.settings.encryption_key.as_ref().expect("key").expose_secret().to_string();
    for secret in [token, "pw-Zq81x", key.as_str()] {
        assert!(!log.contains(secret), "log leaks {secret}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn urls_whose_credentials_no_redaction_could_mask_are_refused_without_echo() {
    let cases = [
        ("SYNCFLEET_AMQP__URL", "amqp:guest:s3cret-mq@127.0.0.1", "amqp.url", "s3cret-mq"),
        ("SYNCFLEET_DATABASE__URL", "postgres:/u:s3cret-pg@db", "database.url", "s3cret-pg"),
        ("SYNCFLEET_REDIS__URL", "redis:x:s3cret-rd@r", "redis.url", "s3cret-rd"),
        (
            "SYNCFLEET_NOTION__BASE_URL",
            "https://proxy:s3cret-nt@notion.example",
            "notion.base_url",
            "s3cret-nt",
        ),
    ];
    for (key, value, named, secret) in cases {
        let (code, err) = run_worker(&[(key, value)]).await;
        assert_eq!(code, Some(2), "{key}: {err}");
        assert!(err.contains(named), "{key}: {err}");
        assert!(!err.contains(secret), "{key} echoed its credentials: {err}");
    }
}
