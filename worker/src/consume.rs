//! The first stage of the job path (consume → run → sync → write): the worker process connects
//! to PostgreSQL and RabbitMQ, consumes jobs with manual ack, runs each in its own task, and
//! settles each delivery as the failure policy decided.
//!
//! Two lanes, each on its own channel with its own prefetch: `<p>.jobs` with
//! `worker.concurrency` slots and `<p>.jobs.high` with `worker.priority_concurrency`. A lane's
//! prefetch is its slot count, so every delivered message starts at once (none waits in a
//! worker's buffer while another worker is idle), and a scheduled backlog never holds a slot a
//! high-priority job needs.
//!
//! A job task that panics is caught at this boundary: its delivery is returned once (then
//! dead-lettered), the panic is logged and counted, and its prefetch slot is freed.
//!
//! Shutdown (SIGTERM/SIGINT): stop consuming; in-flight jobs commit their current batch and give
//! their message back to the queue, where another worker resumes from the checkpoint; then exit.
//! A lost broker connection ends the process with an error (its supervisor restarts it) rather
//! than leaving it consuming nothing; `/healthz` fails when the consume loop stops beating.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sea_orm::EntityTrait;
use syncfleet_shared::amqp::{self, AmqpError, Destination, PublishMeta, Publisher, Topology};
use syncfleet_shared::budget::Budget;
use syncfleet_shared::db::{self, DbError};
use syncfleet_shared::metrics::{Metrics, Outcome, Role};
use syncfleet_shared::notion::{NotionClient, NotionError};
use syncfleet_shared::ops::{self, Liveness, OpsError, Readiness};
use syncfleet_shared::{ConfigError, Settings};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::WorkerContext;
use crate::policy::Disposition;
use crate::run;

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

/// Which work queue a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Normal,
    High,
}

impl Lane {
    fn queue(self, topology: &Topology) -> String {
        match self {
            Lane::Normal => topology.jobs_queue(),
            Lane::High => topology.high_queue(),
        }
    }
}

pub struct Worker {
    ctx: Arc<WorkerContext>,
    connection: Connection,
    channel: Channel,
    high_channel: Channel,
    ready: Readiness,
    live: Liveness,
    ops_stop: CancellationToken,
}

impl Worker {
    /// Connects to everything and declares the topology; fails fast with a clear error.
    pub async fn build(settings: Settings) -> Result<Self, WorkerError> {
        let metrics = Metrics::new(Role::Worker);
        let ready = Readiness::default();
        let live = Liveness::new(Duration::from_secs(settings.worker.liveness_stale_secs));
        live.beat();
        let ops_stop = CancellationToken::new();
        // Liveness answers while connecting; readiness only once consuming.
        if let Some(addr) = settings.metrics_addr {
            ops::serve(addr, metrics.clone(), ready.clone(), live.clone(), ops_stop.clone()).await?;
        }
        metrics
            .worker_concurrency
            .set(i64::from(settings.worker.concurrency) + i64::from(settings.worker.priority_concurrency));
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
        let high_channel = connection
            .create_channel()
            .await
            .map_err(|source| AmqpError::Protocol { op: "channel.open", source })?;
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
        let notifier = syncfleet_shared::notify::Notifier::new(
            &settings.notify,
            db.clone(),
            redis.clone(),
            &settings.redis.key_prefix,
            metrics.clone(),
        );
        let ctx = WorkerContext {
            notifier,
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
        Ok(Self { ctx: Arc::new(ctx), connection, channel, high_channel, ready, live, ops_stop })
    }

    /// Consumes until `shutdown` resolves, then drains in-flight jobs and closes connections.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let concurrency = self.ctx.settings.worker.concurrency;
        let priority_concurrency = self.ctx.settings.worker.priority_concurrency;
        let tag = format!("{}-{}", self.ctx.worker_id, uuid::Uuid::new_v4().simple());
        let mut consumer = self.consume(&self.channel, Lane::Normal, concurrency, &tag).await?;
        let mut high_consumer =
            self.consume(&self.high_channel, Lane::High, priority_concurrency, &tag).await?;
        tracing::info!(
            worker = %self.ctx.worker_id,
            concurrency,
            priority_concurrency,
            queue = %self.ctx.topology.jobs_queue(),
            high_queue = %self.ctx.topology.high_queue(),
            "Worker is consuming."
        );
        self.ready.set(true);
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        let mut failure = None;
        let mut beat = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = beat.tick() => {
                    // The loop is alive; a connection that died without the consumer noticing
                    // ends the process instead of leaving it consuming nothing.
                    if !self.connection.status().connected() {
                        failure = Some(WorkerError::ConsumerLost("the RabbitMQ connection is closed".into()));
                        break;
                    }
                    // Without its confirm channel no retry, dead letter or rerun can be published.
                    if !self.ctx.publisher.is_open() {
                        failure = Some(WorkerError::ConsumerLost("the publishing channel is closed".into()));
                        break;
                    }
                    self.live.beat();
                }
                next = high_consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        tasks.spawn(Box::pin(process(self.ctx.clone(), delivery, stop.clone(), Lane::High)));
                    }
                    Some(Err(e)) => { failure = Some(WorkerError::ConsumerLost(e.to_string())); break; }
                    None => { failure = Some(WorkerError::ConsumerLost("the high-priority consumer was cancelled by the broker".into())); break; }
                },
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        tasks.spawn(Box::pin(process(self.ctx.clone(), delivery, stop.clone(), Lane::Normal)));
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
        for (channel, lane) in [(&self.channel, Lane::Normal), (&self.high_channel, Lane::High)] {
            let tag = consumer_tag(&tag, lane);
            if let Err(e) = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                // The connection is going anyway; unacked deliveries return to the queue with it.
                tracing::debug!(error = %e, "Could not cancel a consumer.");
            }
        }
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
        // Closing only tells the broker politely; whatever is still unacked returns to the
        // queue either way, so a failure here is logged, not acted on.
        for (what, closed) in [
            ("channel", self.channel.close(200, "worker shutdown".into()).await),
            ("high-priority channel", self.high_channel.close(200, "worker shutdown".into()).await),
            ("connection", self.connection.close(200, "worker shutdown".into()).await),
        ] {
            if let Err(e) = closed {
                tracing::debug!(error = %e, "Closing the RabbitMQ {what} failed.");
            }
        }
        self.ctx.db.clone().close().await.ok();
        self.ops_stop.cancel();
        tracing::info!("Worker stopped.");
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Consumes one lane's queue on its channel, with prefetch = the lane's slots.
    async fn consume(
        &self,
        channel: &Channel,
        lane: Lane,
        slots: u16,
        tag: &str,
    ) -> Result<lapin::Consumer, WorkerError> {
        channel
            .basic_qos(slots, BasicQosOptions::default())
            .await
            .map_err(|source| AmqpError::Protocol { op: "basic.qos", source })?;
        let consumer = channel
            .basic_consume(
                lane.queue(&self.ctx.topology).into(),
                consumer_tag(tag, lane).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| AmqpError::Protocol { op: "basic.consume", source })?;
        Ok(consumer)
    }
}

fn consumer_tag(tag: &str, lane: Lane) -> String {
    match lane {
        Lane::Normal => tag.to_string(),
        Lane::High => format!("{tag}-high"),
    }
}

/// When the fleet first saw this message (`now` for a first delivery), kept in Redis for a day
/// under its message id, or a digest of its body when it has none. Redis being unreachable
/// makes it `now`.
async fn first_seen_ms(ctx: &WorkerContext, delivery: &Delivery, now: i64) -> i64 {
    use sha2::Digest;
    let id = match delivery.properties.message_id() {
        Some(id) if !id.as_str().is_empty() => id.as_str().chars().take(128).collect::<String>(),
        _ => hex::encode(&sha2::Sha256::digest(&delivery.data)[..16]),
    };
    let key = format!("{}:seen:{{{id}}}", ctx.settings.redis.key_prefix);
    let seen = async {
        let mut conn = ctx.redis.get().await.map_err(|e| e.to_string())?;
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(now)
            .arg("NX")
            .arg("PX")
            .arg(86_400_000)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if set.is_some() {
            return Ok(now);
        }
        let first: Option<String> =
            redis::cmd("GET").arg(&key).query_async(&mut conn).await.map_err(|e| e.to_string())?;
        Ok::<i64, String>(first.and_then(|v| v.parse().ok()).filter(|t| *t <= now).unwrap_or(now))
    };
    seen.await.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "Could not record when the message was first seen.");
        now
    })
}

/// Handles a delivery inside its `process syncfleet.jobs` consumer span (continuing the
/// publisher's trace when the message carries one) and settles it. A panic anywhere in the job
/// is caught here: the delivery is returned once, then dead-lettered, and the slot is freed.
async fn process(ctx: Arc<WorkerContext>, delivery: Delivery, stop: CancellationToken, lane: Lane) {
    let started = std::time::Instant::now();
    let metrics = ctx.metrics.clone();
    metrics.jobs_in_flight.inc();
    let now = chrono::Utc::now().timestamp_millis();
    let published = match amqp::published_at_ms(&delivery.properties) {
        Some(published) => published,
        // No publish time (a publisher that sets neither `timestamp` nor the header): the wait
        // counts from when the fleet first saw the message.
        None => first_seen_ms(&ctx, &delivery, now).await,
    };
    let queue_wait = amqp::queue_wait_secs(published, now);
    let span = tracing::info_span!(
        "process syncfleet.jobs",
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %lane.queue(&ctx.topology),
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
    let settled = std::panic::AssertUnwindSafe(settle(&ctx, &delivery, stop, lane).instrument(span.clone()))
        .catch_unwind()
        .await;
    let outcome = match settled {
        Ok(Settled::Parked) => {
            // Not an attempt: it is counted, and its wait observed, when it runs.
            span.record("job.outcome", "parked");
            metrics.jobs_parked.inc();
            metrics.jobs_in_flight.dec();
            return;
        }
        Ok(Settled::Done(outcome)) => outcome,
        Err(panic) => {
            metrics.job_panics.inc();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic".into());
            // Returned once; a second panic on the same message dead-letters it (the work
            // queue's dead-letter exchange), so a poison message never loops.
            let requeue = !delivery.redelivered;
            tracing::error!(
                parent: &span,
                panic = %message,
                requeue,
                "A job task panicked; its delivery is returned or dead-lettered."
            );
            if let Err(e) = delivery.nack(BasicNackOptions { requeue, ..Default::default() }).await {
                tracing::error!(parent: &span, error = %e, "Could not return a panicked job's delivery.");
            }
            Some(Outcome::Failed)
        }
    };
    metrics.job_queue_wait.observe(queue_wait);
    span.record("job.outcome", outcome.map(Outcome::as_str).unwrap_or("requeued"));
    if let Some(outcome) = outcome {
        metrics.job_processed(outcome);
    }
    metrics.job_duration.observe(started.elapsed().as_secs_f64());
    metrics.jobs_in_flight.dec();
}

enum Settled {
    /// The outcome for the metrics (`None`: handed back, neither success nor failure).
    Done(Option<Outcome>),
    /// Parked by its integration's share, not run.
    Parked,
}

/// Runs the job and settles the delivery as decided.
async fn settle(ctx: &WorkerContext, delivery: &Delivery, stop: CancellationToken, lane: Lane) -> Settled {
    let handled = run::handle(ctx, &delivery.data, &delivery.properties, stop, lane == Lane::High).await;
    let mut outcome = handled.decision.outcome;
    let settled = match &handled.decision.disposition {
        Disposition::Ack => ack(delivery).await,
        Disposition::Park => {
            let parked = publish_with_backoff(|| {
                ctx.publisher.park_raw(&delivery.data, &delivery.properties, lane == Lane::High)
            })
            .await;
            let settled = match parked {
                Ok(()) => ack(delivery).await,
                Err(e) => give_back(delivery, &e).await,
            };
            if let Err(e) = settled {
                tracing::error!(error = %e, "Failed to settle a parked delivery; RabbitMQ will redeliver it.");
            }
            return Settled::Parked;
        }
        Disposition::Requeue { after } => {
            tokio::time::sleep(*after).await;
            nack_requeue(delivery).await
        }
        Disposition::Retry { tier, reason, .. } => {
            let published = match &handled.job {
                Some(job) => {
                    let meta = meta(ctx, handled.attempt.saturating_add(1), delivery);
                    let destination = Destination::Retry(tier.clone());
                    publish_with_backoff(|| ctx.publisher.publish_job(job, &destination, &meta)).await
                }
                None => Err(AmqpError::Unroutable("a retry needs a parsed job".into())),
            };
            match published {
                Ok(()) => {
                    tracing::info!(tier = %tier.name, reason = %reason, "Job moved to a retry tier.");
                    ack(delivery).await
                }
                Err(e) => {
                    outcome = None;
                    give_back(delivery, &e).await
                }
            }
        }
        Disposition::DeadLetter { reason } => {
            // The original bytes and properties are kept, so nothing is lost.
            let published = publish_with_backoff(|| {
                ctx.publisher.dead_letter_raw(&delivery.data, &delivery.properties, reason)
            })
            .await;
            match published {
                Ok(()) => {
                    tracing::warn!(reason = %reason, "Job dead-lettered.");
                    match &handled.job {
                        // Recorded so a redelivery of a failed run knows its dead letter exists.
                        Some(job) => match db::runs::mark_dead_lettered(&ctx.db, job.id).await {
                            Ok(()) => ack(delivery).await,
                            Err(e) => {
                                tracing::error!(error = %e, "Could not record the dead letter; returning the delivery.");
                                outcome = None;
                                nack_requeue(delivery).await
                            }
                        },
                        None => ack(delivery).await,
                    }
                }
                Err(e) => {
                    outcome = None;
                    give_back(delivery, &e).await
                }
            }
        }
    };
    if let Err(e) = settled {
        tracing::error!(error = %e, "Failed to settle a delivery; RabbitMQ will redeliver it.");
    }
    Settled::Done(outcome)
}

/// Publishes with jittered backoff for about half a minute; a broker that stays unreachable
/// for that long gets the delivery back instead (and the connection check ends the process).
async fn publish_with_backoff<F, Fut>(mut publish: F) -> Result<(), AmqpError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), AmqpError>>,
{
    let mut delays =
        syncfleet_shared::retry::delays(Duration::from_millis(200), Duration::from_secs(8)).take(6);
    loop {
        match publish().await {
            Ok(()) => return Ok(()),
            Err(e) => match delays.next() {
                Some(delay) => {
                    tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "Publishing failed; retrying.");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(e),
            },
        }
    }
}

fn meta(ctx: &WorkerContext, attempt: u32, delivery: &Delivery) -> PublishMeta {
    let trace_headers = amqp::trace_headers(&delivery.properties);
    PublishMeta { attempt, app_id: format!("syncfleet-worker/{}", ctx.worker_id), trace_headers }
}

async fn ack(delivery: &Delivery) -> Result<(), String> {
    delivery.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(|e| e.to_string())
}

async fn nack_requeue(delivery: &Delivery) -> Result<(), String> {
    delivery
        .nack(BasicNackOptions { requeue: true, ..Default::default() })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn give_back(delivery: &Delivery, error: &AmqpError) -> Result<(), String> {
    tracing::error!(error = %error, "Could not re-publish the job after retrying; returning it to the queue.");
    nack_requeue(delivery).await
}

fn default_worker_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("worker-{}", std::process::id()))
}
