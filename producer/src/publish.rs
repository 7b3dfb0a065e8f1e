//! Publishing sync jobs: record the run as `queued`, then publish with confirms and `mandatory`,
//! inside a `publish syncfleet.jobs` producer span whose context travels in the AMQP headers.
//!
//! The connection is reopened when it fails (a broker restart), with capped, jittered backoff
//! between attempts, so a long-running `serve` keeps publishing after the broker comes back.
//! A publish whose confirm never came is *unknown*, not failed: the broker may hold the message,
//! and a worker will run it. Only a nack or an unroutable return marks the run failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;

use syncfleet_shared::Settings;
use syncfleet_shared::amqp::{self, AmqpError, Destination, PublishMeta, Publisher, Topology};
use syncfleet_shared::config::AmqpSettings;
use syncfleet_shared::db::entities::sync_run::status;
use syncfleet_shared::db::runs::{self, StatusChange};
use syncfleet_shared::job::{JobEnvelope, SyncDatabaseJob};
use syncfleet_shared::metrics::Metrics;
use syncfleet_shared::telemetry;
use tokio::sync::Mutex;
use tracing::Instrument;

/// An open connection with the topology declared and a confirm channel.
struct Connected {
    connection: lapin::Connection,
    publisher: Publisher,
}

/// When the connection is down: when to try again, and the backoff that chose it.
struct Reconnect {
    at: Instant,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

struct State {
    connected: Option<Connected>,
    reconnect: Option<Reconnect>,
    /// Bumped with every new connection, so a failed publish discards only its own.
    generation: u64,
}

/// A publisher that keeps its RabbitMQ connection alive.
pub struct JobPublisher {
    settings: AmqpSettings,
    state: Mutex<State>,
    queue: String,
    metrics: Arc<Metrics>,
}

/// Why a job was not (certainly) published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused or could not route it, or it was never sent: the run is `failed`.
    #[error("the job was not published: {0}")]
    Rejected(String),
    /// Sent, but the broker's confirm never came: it may run. The run stays `queued`.
    #[error("the publish of job {job_id} is unconfirmed (the job may still run): {message}")]
    Unconfirmed { job_id: uuid::Uuid, message: String },
    #[error("PostgreSQL: {0}")]
    Db(#[from] sea_orm::DbErr),
}

/// Messages waiting in RabbitMQ, by queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueCounts {
    /// Ready in `<prefix>.jobs`.
    pub ready: u32,
    /// Ready in `<prefix>.jobs.high`.
    pub high_ready: u32,
    /// Parked by the per-integration cap, coming back after the park delay.
    pub parked: u32,
    /// Consumers of `<prefix>.jobs` (one per worker process).
    pub consumers: u32,
}

impl JobPublisher {
    /// Connects (failing fast when the broker is unreachable at start) and declares the topology.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let connected = open(&settings.amqp).await?;
        let queue = Topology::new(&settings.amqp).jobs_queue();
        Ok(Self {
            settings: settings.amqp.clone(),
            state: Mutex::new(State { connected: Some(connected), reconnect: None, generation: 0 }),
            queue,
            metrics,
        })
    }

    /// The current publisher, reconnecting when the connection is gone and the backoff allows.
    async fn publisher(&self) -> Result<(Publisher, u64), AmqpError> {
        let mut state = self.state.lock().await;
        if let Some(c) = &state.connected
            && c.connection.status().connected()
        {
            return Ok((c.publisher.clone(), state.generation));
        }
        state.connected = None;
        if let Some(r) = &state.reconnect
            && Instant::now() < r.at
        {
            let wait = r.at.saturating_duration_since(Instant::now());
            return Err(AmqpError::Unavailable(format!("reconnecting in {wait:?}")));
        }
        match open(&self.settings).await {
            Ok(c) => {
                tracing::info!("Reconnected to RabbitMQ.");
                self.metrics.amqp_reconnects.inc();
                let publisher = c.publisher.clone();
                state.connected = Some(c);
                state.reconnect = None;
                state.generation += 1;
                Ok((publisher, state.generation))
            }
            Err(e) => {
                let r = state.reconnect.get_or_insert_with(|| Reconnect {
                    at: Instant::now(),
                    delays: Box::new(syncfleet_shared::retry::delays(
                        Duration::from_millis(500),
                        Duration::from_secs(30),
                    )),
                });
                let delay = r.delays.next().unwrap_or(Duration::from_secs(30));
                r.at = Instant::now() + delay;
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Cannot reach RabbitMQ.");
                Err(e)
            }
        }
    }

    /// The work queues' ready messages, the parked ones and the consumers (passive declares on
    /// a channel of its own, so a failure cannot close the publishing channel).
    pub async fn queue_depth(&self) -> Result<QueueCounts, AmqpError> {
        // Bounded: a wedged broker must not hold the publishing lock (or a status page) long.
        let limit = Duration::from_secs(2);
        let slow = || AmqpError::Unavailable(format!("RabbitMQ did not answer within {limit:?}"));
        let channel = {
            let state = self.state.lock().await;
            let c = state
                .connected
                .as_ref()
                .filter(|c| c.connection.status().connected())
                .ok_or_else(|| AmqpError::Unavailable("not connected to RabbitMQ".into()))?;
            tokio::time::timeout(limit, c.connection.create_channel())
                .await
                .map_err(|_| slow())?
                .map_err(|source| AmqpError::Protocol { op: "channel.open", source })?
        };
        let topology = Topology::new(&self.settings);
        let declared = tokio::time::timeout(limit, async {
            let mut counts = Vec::with_capacity(4);
            for queue in topology.work_queues().into_iter().chain(topology.park_queues()) {
                let q = channel
                    .queue_declare(
                        queue.as_str().into(),
                        lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                        lapin::types::FieldTable::default(),
                    )
                    .await
                    .map_err(|source| AmqpError::Protocol { op: "queue.declare", source })?;
                counts.push(q);
            }
            Ok::<_, AmqpError>(counts)
        })
        .await
        .map_err(|_| slow())
        .and_then(|r| r);
        if let Err(e) = channel.close(200, "done".into()).await {
            tracing::debug!(error = %e, "Closing the queue-depth channel failed.");
        }
        let q = declared?;
        Ok(QueueCounts {
            ready: q[0].message_count(),
            high_ready: q[1].message_count(),
            parked: q[2].message_count() + q[3].message_count(),
            consumers: q[0].consumer_count(),
        })
    }

    /// Drops connection `generation` after a failure on it, so the next publish reconnects (a
    /// newer connection, opened meanwhile by another publish, is left alone).
    async fn discard(&self, generation: u64) {
        let taken = {
            let mut state = self.state.lock().await;
            if state.generation == generation { state.connected.take() } else { None }
        };
        // Closed in the background: a wedged broker (the reason for most discards) may never
        // answer the close, and the failing publish answers its caller now.
        if let Some(c) = taken {
            let limit = Duration::from_secs(self.settings.confirm_timeout_secs.max(1));
            tokio::spawn(async move {
                match tokio::time::timeout(limit, c.connection.close(200, "reconnecting".into())).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "Closing the failed RabbitMQ connection failed.")
                    }
                    Err(_) => tracing::warn!(
                        "RabbitMQ did not answer the close of a failed connection; dropped it."
                    ),
                }
            });
        }
    }

    /// Records the run, publishes the job and waits for the broker's confirm.
    pub async fn publish(
        &self,
        db: &sea_orm::DatabaseConnection,
        source: &str,
        data: SyncDatabaseJob,
    ) -> Result<JobEnvelope, PublishError> {
        self.publish_job(db, JobEnvelope::new(source, data)).await
    }

    /// As [`publish`](Self::publish), with a job id chosen by the caller: publishing the same
    /// id again (a scheduled occurrence, say) is the same run, which workers run once.
    pub async fn publish_as(
        &self,
        db: &sea_orm::DatabaseConnection,
        source: &str,
        data: SyncDatabaseJob,
        id: uuid::Uuid,
    ) -> Result<JobEnvelope, PublishError> {
        let mut job = JobEnvelope::new(source, data);
        job.id = id;
        // An earlier publish of this id that the broker refused left the run `failed` without
        // ever running it: queue it again, or the worker would take the job for a finished one.
        db.execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "UPDATE sync_runs SET status = 'queued', error_kind = NULL, error_message = NULL, finished_at = NULL \
             WHERE id = $1 AND status = 'failed' AND error_kind = 'publish_failed'",
            [id.into()],
        ))
        .await?;
        self.publish_job(db, job).await
    }

    async fn publish_job(
        &self,
        db: &sea_orm::DatabaseConnection,
        job: JobEnvelope,
    ) -> Result<JobEnvelope, PublishError> {
        let span = tracing::info_span!(
            "publish syncfleet.jobs",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.destination.name = %self.queue,
            messaging.rabbitmq.destination.routing_key =
                syncfleet_shared::amqp::work_routing_key(job.data.priority),
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
    ) -> Result<JobEnvelope, PublishError> {
        // No broker, no row: a job that cannot be sent leaves nothing behind to pile up.
        let (publisher, generation) =
            self.publisher().await.map_err(|e| PublishError::Rejected(e.to_string()))?;
        runs::insert_queued(db, &job).await?;
        let meta = PublishMeta {
            attempt: 1,
            app_id: "syncfleet-producer".into(),
            trace_headers: telemetry::inject(&span),
        };
        let sent = publisher.publish_job(&job, &Destination::Work, &meta).await;
        let error = match sent {
            Ok(()) => return Ok(job),
            Err(e) => e,
        };
        let message = error.to_string();
        // Never sent, or refused: definitely not queued. A send whose confirm is missing: unknown.
        let definite = matches!(
            error,
            AmqpError::Unroutable(_)
                | AmqpError::Nacked
                | AmqpError::Unavailable(_)
                | AmqpError::Connect { .. }
                | AmqpError::ConnectTimeout { .. }
        );
        if !definite {
            self.discard(generation).await;
        }
        let (change, failure) = if definite {
            (
                StatusChange::with_error(status::FAILED, "publish_failed", &message),
                PublishError::Rejected(message.clone()),
            )
        } else {
            (
                StatusChange::with_error(status::QUEUED, "publish_unconfirmed", &message),
                PublishError::Unconfirmed { job_id: job.id, message: message.clone() },
            )
        };
        // The run is recorded either way (never over a run a worker already started); a failure
        // to record it is reported instead of the cause.
        runs::set_status_unheld(db, &job, 1, change, Duration::from_secs(86_400)).await?;
        Err(failure)
    }
}

async fn open(settings: &AmqpSettings) -> Result<Connected, AmqpError> {
    let connection = amqp::connect(settings, "syncfleet-producer").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| AmqpError::Protocol { op: "channel.open", source })?;
    Topology::new(settings).declare(&channel).await?;
    let publisher = Publisher::new(&connection, settings).await?;
    Ok(Connected { connection, publisher })
}
