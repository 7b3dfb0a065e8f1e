//! Publishing sync jobs: record the run as `queued`, then publish with confirms and `mandatory`.

use syncfleet_shared::Settings;
use syncfleet_shared::amqp::{self, Destination, PublishMeta, Publisher, Topology};
use syncfleet_shared::job::{JobEnvelope, SyncDatabaseJob};

/// A connected publisher with the topology declared.
pub struct JobPublisher {
    _connection: lapin::Connection,
    publisher: Publisher,
}

impl JobPublisher {
    pub async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let connection = amqp::connect(&settings.amqp, "syncfleet-producer").await?;
        let channel = connection.create_channel().await?;
        Topology::new(&settings.amqp).declare(&channel).await?;
        let publisher = Publisher::new(&connection, &settings.amqp).await?;
        Ok(Self { _connection: connection, publisher })
    }

    /// Records the run, publishes the job and waits for the broker's confirm.
    pub async fn publish(
        &self,
        db: &sea_orm::DatabaseConnection,
        source: &str,
        data: SyncDatabaseJob,
    ) -> anyhow::Result<JobEnvelope> {
        let job = JobEnvelope::new(source, data);
        syncfleet_shared::db::runs::insert_queued(db, &job).await?;
        let meta = PublishMeta { attempt: 1, app_id: "syncfleet-producer".into(), trace_headers: Vec::new() };
        if let Err(e) = self.publisher.publish_job(&job, &Destination::Work, &meta).await {
            let message = e.to_string();
            let _ = syncfleet_shared::db::runs::set_status(
                db,
                job.id,
                syncfleet_shared::db::entities::sync_run::status::FAILED,
                Some(("publish_failed", &message)),
            )
            .await;
            return Err(e.into());
        }
        Ok(job)
    }
}
