//! Malformed messages go to the dead-letter queue with a reason and never stop the worker.

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use syncfleet_shared::amqp::{self, Topology};
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;
use uuid::Uuid;

use crate::LONG;

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_a_reason_and_the_worker_keeps_serving() {
    let sim = SimConfig { pages: 50, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(2).expect("worker");
    let base = |data: serde_json::Value| {
        serde_json::json!({"specversion": "1.0", "type": "dev.syncfleet.sync_database.v1", "source": "urn:other-service",
                           "id": Uuid::new_v4(), "data": data})
    };
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not JSON"),
        (serde_json::json!({"specversion": "1.0", "type": "com.example.unknown", "source": "x", "id": Uuid::new_v4(), "data": {}}).to_string().into_bytes(), "unknown event type"),
        (base(serde_json::json!({"integration": "acme", "mode": "full"})).to_string().into_bytes(), "missing field"),
        (base(serde_json::json!({"integration": "acme", "database_id": db, "mode": 42})).to_string().into_bytes(), "invalid job"),
        (base(serde_json::json!({"integration": "acme", "database_id": Uuid::new_v4(), "mode": "full"})).to_string().into_bytes(), "unknown database"),
        (vec![0xff, 0x00, 0xfe], "not JSON"),
    ];
    let conn = amqp::connect(&env.settings.amqp, "poison-test").await.expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    let topology = Topology::new(&env.settings.amqp);
    topology.declare(&channel).await.expect("declare");
    for (body, _) in &bodies {
        channel
            .basic_publish(
                topology.jobs_exchange().as_str().into(),
                amqp::ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    // A valid job behind them still runs.
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(run, LONG).await.expect("run").status, "succeeded");
    let dead = env.drain_dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), bodies.len(), "{dead:?}");
    for (reason, body) in &dead {
        let reason = reason.as_deref().expect("every dead letter has a reason header");
        let (_, expected) = bodies.iter().find(|(b, _)| b == body).expect("the original body is kept");
        assert!(reason.contains(expected), "reason {reason:?} should mention {expected:?}");
    }
    assert!(env.log().contains("not a valid sync job"), "rejections are logged");
    assert!(!env.log().contains("panicked"));
    env.cleanup().await;
}
