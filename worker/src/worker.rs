//! The worker process: connects to PostgreSQL and RabbitMQ, consumes jobs with manual ack and
//! prefetch = concurrency, runs each in its own task, and shuts down gracefully.
//!
//! Shutdown (SIGTERM/SIGINT): stop consuming; in-flight jobs commit their current batch and give
//! their message back to the queue, where another worker resumes from the checkpoint; then exit.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sea_orm::{DatabaseConnection, EntityTrait};
use syncfleet_shared::amqp::{self, AmqpError, Destination, PublishMeta, Publisher, Topology};
use syncfleet_shared::budget::Budget;
use syncfleet_shared::crypto::TokenCipher;
use syncfleet_shared::db::{self, DbError};
use syncfleet_shared::metrics::{Metrics, Outcome, Role};
use syncfleet_shared::notion::{NotionClient, NotionError};
use syncfleet_shared::ops::{self, OpsError, Readiness};
use syncfleet_shared::{ConfigError, Settings};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::Disposition;
use crate::handler;

/// Why the worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Notion(#[from] NotionError),
    #[error(transparent)]
    Redis(#[from] syncfleet_shared::redis_pool::RedisError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("the RabbitMQ consumer stopped unexpectedly: {0}")]
    ConsumerLost(String),
}

/// What every job task shares.
pub struct WorkerContext {
    pub settings: Settings,
    pub db: DatabaseConnection,
    pub notion: NotionClient,
    pub budget: Budget,
    /// `None` when no key is configured: jobs then fail with a configuration error.
    pub cipher: Option<TokenCipher>,
    pub publisher: Publisher,
    pub topology: Topology,
    /// Coordination state (rate budgets, locks) lives in Redis.
    pub redis: deadpool_redis::Pool,
    pub worker_id: String,
    pub metrics: Arc<Metrics>,
}

pub struct Worker {
    ctx: Arc<WorkerContext>,
    connection: Connection,
    channel: Channel,
    ready: Readiness,
    ops_stop: CancellationToken,
}

impl Worker {
    /// Connects to everything and declares the topology; fails fast with a clear error.
    pub async fn build(settings: Settings) -> Result<Self, WorkerError> {
        let metrics = Metrics::new(Role::Worker);
        let ready = Readiness::default();
        let ops_stop = CancellationToken::new();
        // Liveness answers while connecting; readiness only once consuming.
        if let Some(addr) = settings.metrics_addr {
            ops::serve(addr, metrics.clone(), ready.clone(), ops_stop.clone()).await?;
        }
        metrics.worker_concurrency.set(i64::from(settings.worker.concurrency));
        let cipher = match &settings.encryption_key {
            Some(_) => Some(settings.token_cipher()?),
            None => {
                tracing::warn!(
                    "No encryption_key configured: jobs will fail until SYNCFLEET_ENCRYPTION_KEY is set."
                );
                None
            }
        };
        let db = db::connect(&settings.database).await?;
        let redis = syncfleet_shared::redis_pool::connect(&settings.redis).await?;
        let worker_id = settings.worker.id.clone().unwrap_or_else(default_worker_id);
        let connection = amqp::connect(&settings.amqp, &format!("syncfleet-worker {worker_id}")).await?;
        let topology = Topology::new(&settings.amqp);
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| AmqpError::Protocol { op: "channel.open", source })?;
        topology.declare(&channel).await?;
        let publisher = Publisher::new(&connection, &settings.amqp).await?;
        let notion = NotionClient::new(&settings.notion, metrics.clone())?;
        let budget =
            Budget::new(redis.clone(), &settings.redis.key_prefix).with_circuit(settings.notion.circuit);
        match syncfleet_shared::db::entities::integration::Entity::find().all(&db).await {
            Ok(integrations) => {
                for i in integrations {
                    metrics.observe_integration(&i.slug, i.rate_per_second);
                }
            }
            Err(e) => tracing::warn!(error = %e, "Could not list integrations for the metrics."),
        }
        let ctx = WorkerContext {
            budget,
            settings,
            db,
            notion,
            cipher,
            publisher,
            topology,
            redis,
            worker_id,
            metrics,
        };
        Ok(Self { ctx: Arc::new(ctx), connection, channel, ready, ops_stop })
    }

    /// Consumes until `shutdown` resolves, then drains in-flight jobs and closes connections.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let concurrency = self.ctx.settings.worker.concurrency;
        self.channel
            .basic_qos(concurrency, BasicQosOptions::default())
            .await
            .map_err(|source| AmqpError::Protocol { op: "basic.qos", source })?;
        let tag = format!("{}-{}", self.ctx.worker_id, uuid::Uuid::new_v4().simple());
        let mut consumer = self
            .channel
            .basic_consume(
                self.ctx.topology.jobs_queue().into(),
                tag.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| AmqpError::Protocol { op: "basic.consume", source })?;
        tracing::info!(
            worker = %self.ctx.worker_id,
            concurrency,
            queue = %self.ctx.topology.jobs_queue(),
            "Worker is consuming."
        );
        self.ready.set(true);
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        let mut failure = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let ctx = self.ctx.clone();
                        let stop = stop.clone();
                        tasks.spawn(async move { process(ctx, delivery, stop).await });
                    }
                    Some(Err(e)) => { failure = Some(WorkerError::ConsumerLost(e.to_string())); break; }
                    None => { failure = Some(WorkerError::ConsumerLost("consumer was cancelled by the broker".into())); break; }
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = joined { tracing::error!(error = %e, "A job task ended abnormally."); }
                }
            }
        }
        self.ready.set(false);
        tracing::info!(
            in_flight = tasks.len(),
            "Stopping: no new jobs; in-flight jobs checkpoint and requeue."
        );
        let _ = self.channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
        stop.cancel();
        let grace = Duration::from_secs(self.ctx.settings.worker.shutdown_grace_secs);
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = tasks.join_next().await {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "A job task ended abnormally.");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("Grace period over; closing with jobs unfinished (RabbitMQ redelivers them).");
            tasks.abort_all();
        }
        let _ = self.channel.close(200, "worker shutdown".into()).await;
        let _ = self.connection.close(200, "worker shutdown".into()).await;
        self.ctx.db.clone().close().await.ok();
        self.ops_stop.cancel();
        tracing::info!("Worker stopped.");
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Handles a delivery inside its `process syncfleet.jobs` consumer span (continuing the
/// publisher's trace when the message carries one) and settles it.
async fn process(ctx: Arc<WorkerContext>, delivery: Delivery, stop: CancellationToken) {
    let started = std::time::Instant::now();
    let metrics = ctx.metrics.clone();
    metrics.jobs_in_flight.inc();
    if let Some(published) = amqp::published_at_ms(&delivery.properties) {
        let waited = chrono::Utc::now().timestamp_millis() - published;
        metrics.job_queue_wait.observe(waited.max(0) as f64 / 1000.0);
    }
    let span = tracing::info_span!(
        "process syncfleet.jobs",
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %ctx.topology.jobs_queue(),
        messaging.message.id = delivery.properties.message_id().as_ref().map(|m| m.as_str()).unwrap_or(""),
        messaging.rabbitmq.message.delivery_tag = delivery.delivery_tag,
        messaging.message.body.size = delivery.data.len(),
        job.outcome = tracing::field::Empty,
        // Recorded once the body parses, so every later log line of the job carries them.
        job.id = tracing::field::Empty,
        database = tracing::field::Empty,
        attempt = tracing::field::Empty,
    );
    syncfleet_shared::telemetry::continue_trace(&span, &amqp::trace_headers(&delivery.properties));
    let outcome = settle(&ctx, &delivery, stop).instrument(span.clone()).await;
    span.record("job.outcome", outcome.map(Outcome::as_str).unwrap_or("requeued"));
    if let Some(outcome) = outcome {
        metrics.job_processed(outcome);
    }
    metrics.job_duration.observe(started.elapsed().as_secs_f64());
    metrics.jobs_in_flight.dec();
}

/// Runs the handler and settles the delivery; returns the outcome for the metrics (`None` for
/// a job handed back to the queue at shutdown, which is neither a success nor a failure).
async fn settle(ctx: &WorkerContext, delivery: &Delivery, stop: CancellationToken) -> Option<Outcome> {
    let handled = handler::handle(ctx, &delivery.data, &delivery.properties, stop).await;
    let mut outcome = Some(handled.outcome);
    let settle = match &handled.disposition {
        Disposition::Ack => ack(delivery).await,
        Disposition::Requeue => {
            outcome = None;
            delivery
                .nack(BasicNackOptions { requeue: true, ..Default::default() })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Disposition::Retry { reason } => {
            let published = match (&handled.job, ctx.topology.tier_for_attempt(handled.attempt)) {
                (Some(job), Some(tier)) => ctx
                    .publisher
                    .publish_job(
                        job,
                        &Destination::Retry(tier.clone()),
                        &meta(ctx, handled.attempt + 1, delivery),
                    )
                    .await
                    .map(|_| tier.name.clone()),
                _ => Err(AmqpError::Unroutable("no retry tier".into())),
            };
            match published {
                Ok(tier) => {
                    tracing::info!(tier = %tier, reason = %reason, "Job moved to a retry tier.");
                    ack(delivery).await
                }
                Err(e) => requeue_after_publish_failure(delivery, &e).await,
            }
        }
        Disposition::DeadLetter { reason } => {
            // The original bytes and properties are kept, so nothing is lost.
            match ctx.publisher.dead_letter_raw(&delivery.data, &delivery.properties, reason).await {
                Ok(()) => {
                    tracing::warn!(reason = %reason, "Job dead-lettered.");
                    ack(delivery).await
                }
                Err(e) => requeue_after_publish_failure(delivery, &e).await,
            }
        }
    };
    if let Err(e) = settle {
        tracing::error!(error = %e, "Failed to settle a delivery; RabbitMQ will redeliver it.");
    }
    outcome
}

fn meta(ctx: &WorkerContext, attempt: u32, delivery: &Delivery) -> PublishMeta {
    let trace_headers = amqp::trace_headers(&delivery.properties);
    PublishMeta { attempt, app_id: format!("syncfleet-worker/{}", ctx.worker_id), trace_headers }
}

async fn ack(delivery: &Delivery) -> Result<(), String> {
    delivery.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(|e| e.to_string())
}

async fn requeue_after_publish_failure(delivery: &Delivery, error: &AmqpError) -> Result<(), String> {
    tracing::error!(error = %error, "Could not re-publish the job; returning it to the queue instead.");
    tokio::time::sleep(Duration::from_secs(1)).await;
    delivery
        .nack(BasicNackOptions { requeue: true, ..Default::default() })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn default_worker_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("worker-{}", std::process::id()))
}
