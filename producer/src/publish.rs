//! Publishing sync jobs: record the run as `queued`, then publish with confirms and `mandatory`,
//! inside a `publish syncfleet.jobs` producer span whose context travels in the AMQP headers.

use std::sync::Arc;

use syncfleet_shared::Settings;
use syncfleet_shared::amqp::{self, Destination, PublishMeta, Publisher, Topology};
use syncfleet_shared::job::{JobEnvelope, SyncDatabaseJob};
use syncfleet_shared::metrics::Metrics;
use syncfleet_shared::telemetry;
use tracing::Instrument;

/// A connected publisher with the topology declared.
pub struct JobPublisher {
    _connection: lapin::Connection,
    publisher: Publisher,
    queue: String,
    metrics: Arc<Metrics>,
}

impl JobPublisher {
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let connection = amqp::connect(&settings.amqp, "syncfleet-producer").await?;
        let channel = connection.create_channel().await?;
        let topology = Topology::new(&settings.amqp);
        topology.declare(&channel).await?;
        let publisher = Publisher::new(&connection, &settings.amqp).await?;
        Ok(Self { _connection: connection, publisher, queue: topology.jobs_queue().to_string(), metrics })
    }

    /// Records the run, publishes the job and waits for the broker's confirm.
    pub async fn publish(
        &self,
        db: &sea_orm::DatabaseConnection,
        source: &str,
        data: SyncDatabaseJob,
    ) -> anyhow::Result<JobEnvelope> {
        let job = JobEnvelope::new(source, data);
        let span = tracing::info_span!(
            "publish syncfleet.jobs",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.destination.name = %self.queue,
            messaging.message.id = %job.id,
            database = %job.data.database_id,
            job.reason = job.data.reason.as_str(),
        );
        let reason = job.data.reason.as_str();
        self.publish_in(db, job, span.clone())
            .instrument(span)
            .await
            .inspect(|_| self.metrics.job_published(reason))
    }

    async fn publish_in(
        &self,
        db: &sea_orm::DatabaseConnection,
        job: JobEnvelope,
        span: tracing::Span,
    ) -> anyhow::Result<JobEnvelope> {
        syncfleet_shared::db::runs::insert_queued(db, &job).await?;
        let meta = PublishMeta {
            attempt: 1,
            app_id: "syncfleet-producer".into(),
            trace_headers: telemetry::inject(&span),
        };
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
