//! RabbitMQ topology and confirmed publishing of sync jobs.
//!
//! ```text
//! <p>.jobs (direct) --sync------> <p>.jobs (quorum)      --DLX <p>.dlx--> <p>.jobs.dead
//!                   --sync.high-> <p>.jobs.high (quorum) --DLX <p>.dlx--> <p>.jobs.dead
//! <p>.retry (direct) --<tier>.<ms>ms[.high]--> <p>.retry.<tier>.<ms>ms[.high] (TTL)
//!                                         --DLX <p>.jobs/sync[.high]--> back to its work queue
//! <p>.park (direct) --<ms>ms[.high]--> <p>.park.<ms>ms[.high] (TTL) --DLX <p>.jobs/sync[.high]--> back
//! ```
//! Priorities are two queues rather than AMQP message priorities: quorum queues (which survive a
//! broker node) ignore `x-max-priority` before RabbitMQ 4.0. Workers consume the high queue in
//! slots of its own, so a backlog in `<p>.jobs` never delays a manual, API or webhook job. A
//! high job keeps its queue through retries and parking.
//! A retry tier's queue and routing key carry its delay: a queue's `x-message-ttl` cannot change
//! once declared (RabbitMQ answers PRECONDITION_FAILED), so a changed delay is a new queue. The
//! old one gets nothing new and empties itself as its messages expire back to work.
//! Every name derives from one prefix, so tests and tenants get their own set. Declaring is
//! idempotent; producer and worker both declare at start.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;

use crate::config::{AmqpSettings, RetryTier};
use crate::job::{ATTEMPT_HEADER, CONTENT_TYPE, DEAD_REASON_HEADER, JobEnvelope, Priority};

/// Routing key of work messages (normal and low priority).
pub const ROUTING_KEY: &str = "sync";
/// Routing key of high-priority work messages (`<prefix>.jobs.high`).
pub const HIGH_ROUTING_KEY: &str = "sync.high";
const DEAD_ROUTING_KEY: &str = "dead";

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// `reason` is lapin's message with the URL's credentials scrubbed (it can echo the URL).
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot connect to RabbitMQ at {url}: no answer within {secs}s")]
    ConnectTimeout { url: String, secs: u64 },
    #[error("RabbitMQ {op} failed: {source}")]
    Protocol { op: &'static str, source: lapin::Error },
    #[error("RabbitMQ returned the message as unroutable ({0}): is the topology declared?")]
    Unroutable(String),
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(String),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ did not confirm the publish within {0:?}")]
    ConfirmTimeout(Duration),
}

fn protocol(op: &'static str) -> impl FnOnce(lapin::Error) -> AmqpError {
    move |source| AmqpError::Protocol { op, source }
}

/// Opens a connection; the error names the broker with its password masked.
pub async fn connect(settings: &AmqpSettings, connection_name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(connection_name.to_string().into());
    let url = settings.url.expose_secret();
    let connect = Connection::connect(url, props);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(AmqpError::Connect {
            url: settings.display_url(),
            reason: crate::secret::scrub(&source.to_string(), url),
        }),
        Err(_) => Err(AmqpError::ConnectTimeout { url: settings.display_url(), secs: 10 }),
    }
}

/// The names of every exchange and queue, derived from one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    tiers: Vec<RetryTier>,
    park_delay_ms: u64,
}

/// The routing key of a job's work queue: its priority decides.
pub fn work_routing_key(priority: Priority) -> &'static str {
    match priority {
        Priority::High => HIGH_ROUTING_KEY,
        Priority::Normal | Priority::Low => ROUTING_KEY,
    }
}

impl Topology {
    pub fn new(settings: &AmqpSettings) -> Self {
        Self {
            prefix: settings.prefix.clone(),
            tiers: settings.retry_tiers.clone(),
            park_delay_ms: settings.park_delay_ms,
        }
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    /// The high-priority work queue.
    pub fn high_queue(&self) -> String {
        format!("{}.jobs.high", self.prefix)
    }
    /// Both work queues, normal first.
    pub fn work_queues(&self) -> [String; 2] {
        [self.jobs_queue(), self.high_queue()]
    }
    pub fn park_exchange(&self) -> String {
        format!("{}.park", self.prefix)
    }
    /// Where jobs over their integration's cap wait (`high`: those of the high queue); the delay
    /// is in the name and routing key, as for retry tiers, so processes configured with
    /// different delays never both receive one parked message.
    pub fn park_queue(&self, high: bool) -> String {
        format!("{}.park.{}", self.prefix, self.park_key(high))
    }
    /// Both park queues, normal first.
    pub fn park_queues(&self) -> [String; 2] {
        [self.park_queue(false), self.park_queue(true)]
    }
    pub fn park_key(&self, high: bool) -> String {
        if high { format!("{}ms.high", self.park_delay_ms) } else { format!("{}ms", self.park_delay_ms) }
    }
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }
    pub fn retry_queue(&self, tier: &RetryTier) -> String {
        format!("{}.retry.{}", self.prefix, Self::tier_key(tier))
    }
    /// The tier's queue for high-priority jobs (it dead-letters back to `<p>.jobs.high`).
    pub fn high_retry_queue(&self, tier: &RetryTier) -> String {
        format!("{}.retry.{}", self.prefix, Self::high_tier_key(tier))
    }
    /// The routing key of a tier on the retry exchange: its name and delay.
    pub fn tier_key(tier: &RetryTier) -> String {
        format!("{}.{}ms", tier.name, tier.delay_ms)
    }
    pub fn high_tier_key(tier: &RetryTier) -> String {
        format!("{}.high", Self::tier_key(tier))
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.jobs.dead", self.prefix)
    }
    pub fn tiers(&self) -> &[RetryTier] {
        &self.tiers
    }

    /// The retry tier for a job that failed on `attempt` (1-based), or `None` once all are used.
    pub fn tier_for_attempt(&self, attempt: u32) -> Option<&RetryTier> {
        self.tiers.get(attempt.saturating_sub(1) as usize)
    }

    /// Declares every exchange, queue and binding. Safe to call from many processes at once.
    pub async fn declare(&self, channel: &Channel) -> Result<(), AmqpError> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for exchange in [self.jobs_exchange(), self.retry_exchange(), self.dead_exchange()] {
            channel
                .exchange_declare(exchange.into(), ExchangeKind::Direct, durable, FieldTable::default())
                .await
                .map_err(protocol("exchange.declare"))?;
        }
        let queue_opts = QueueDeclareOptions { durable: true, ..Default::default() };

        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), long_string("quorum"));
        channel
            .queue_declare(self.dead_queue().into(), queue_opts, dead_args)
            .await
            .map_err(protocol("queue.declare"))?;
        self.bind(channel, &self.dead_queue(), &self.dead_exchange(), DEAD_ROUTING_KEY).await?;

        for (queue, key) in [(self.jobs_queue(), ROUTING_KEY), (self.high_queue(), HIGH_ROUTING_KEY)] {
            let mut work_args = FieldTable::default();
            work_args.insert("x-queue-type".into(), long_string("quorum"));
            work_args.insert("x-dead-letter-exchange".into(), long_string(&self.dead_exchange()));
            work_args.insert("x-dead-letter-routing-key".into(), long_string(DEAD_ROUTING_KEY));
            channel
                .queue_declare(queue.as_str().into(), queue_opts, work_args)
                .await
                .map_err(protocol("queue.declare"))?;
            self.bind(channel, &queue, &self.jobs_exchange(), key).await?;
        }

        for tier in &self.tiers {
            let lanes = [
                (self.retry_queue(tier), Self::tier_key(tier), ROUTING_KEY),
                (self.high_retry_queue(tier), Self::high_tier_key(tier), HIGH_ROUTING_KEY),
            ];
            for (queue, key, back_to) in lanes {
                let mut args = FieldTable::default();
                args.insert("x-queue-type".into(), long_string("quorum"));
                args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier.delay_ms as i64));
                args.insert("x-dead-letter-exchange".into(), long_string(&self.jobs_exchange()));
                args.insert("x-dead-letter-routing-key".into(), long_string(back_to));
                // The normal tiers' queues predate this and keep their arguments (a queue's
                // arguments cannot change once declared); the high ones are new.
                if back_to == HIGH_ROUTING_KEY {
                    at_least_once(&mut args);
                }
                channel
                    .queue_declare(queue.as_str().into(), queue_opts, args)
                    .await
                    .map_err(protocol("queue.declare"))?;
                self.bind(channel, &queue, &self.retry_exchange(), &key).await?;
            }
        }

        // Each parked job goes back to the work queue it came from.
        channel
            .exchange_declare(
                self.park_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(protocol("exchange.declare"))?;
        for (high, back_to) in [(false, ROUTING_KEY), (true, HIGH_ROUTING_KEY)] {
            let mut park_args = FieldTable::default();
            park_args.insert("x-queue-type".into(), long_string("quorum"));
            park_args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(self.park_delay_ms as i64));
            park_args.insert("x-dead-letter-exchange".into(), long_string(&self.jobs_exchange()));
            park_args.insert("x-dead-letter-routing-key".into(), long_string(back_to));
            at_least_once(&mut park_args);
            let queue = self.park_queue(high);
            channel
                .queue_declare(queue.as_str().into(), queue_opts, park_args)
                .await
                .map_err(protocol("queue.declare"))?;
            self.bind(channel, &queue, &self.park_exchange(), &self.park_key(high)).await?;
        }
        Ok(())
    }

    /// Deletes every queue and exchange of this prefix (tests, demos, decommissioning).
    pub async fn delete(&self, channel: &Channel) -> Result<(), AmqpError> {
        let mut queues = vec![self.dead_queue()];
        queues.extend(self.work_queues());
        queues.extend(self.park_queues());
        queues.extend(self.tiers.iter().flat_map(|t| [self.retry_queue(t), self.high_retry_queue(t)]));
        for queue in queues {
            channel
                .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
                .await
                .map_err(protocol("queue.delete"))?;
        }
        for exchange in
            [self.jobs_exchange(), self.retry_exchange(), self.dead_exchange(), self.park_exchange()]
        {
            channel
                .exchange_delete(exchange.into(), lapin::options::ExchangeDeleteOptions::default())
                .await
                .map_err(protocol("exchange.delete"))?;
        }
        Ok(())
    }

    async fn bind(&self, channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), AmqpError> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(protocol("queue.bind"))
    }
}

/// At-least-once dead-lettering (RabbitMQ 3.10+ quorum queues): an expired message leaves the
/// queue only once its target queue has it, so a work queue that is down or changing leader
/// during the hop cannot lose it. It needs `reject-publish` overflow (there is no length limit,
/// so nothing is ever rejected) and, on clusters upgraded from before 3.10, the `stream_queue`
/// feature flag; without it RabbitMQ falls back to at-most-once.
fn at_least_once(args: &mut FieldTable) {
    args.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
    args.insert("x-overflow".into(), long_string("reject-publish"));
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Where a message goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// The work queue.
    Work,
    /// A retry tier; the message comes back to work after its TTL.
    Retry(RetryTier),
    /// The dead-letter queue, with the reason in a header.
    Dead { reason: String },
}

/// Unix milliseconds of the publish, for `syncfleet_job_queue_wait_seconds` (the AMQP
/// `timestamp` property has only whole seconds; jobs from other publishers fall back to it).
pub const PUBLISHED_MS_HEADER: &str = "x-syncfleet-published-ms";

/// Extra AMQP headers for a publish (trace context, attempt).
#[derive(Debug, Clone, Default)]
pub struct PublishMeta {
    pub attempt: u32,
    pub app_id: String,
    /// W3C trace context headers (`traceparent`, `tracestate`).
    pub trace_headers: Vec<(String, String)>,
}

/// A channel in confirm mode that publishes jobs and waits for the broker's confirm.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
    confirm_timeout: Duration,
}

impl Publisher {
    pub async fn new(connection: &Connection, settings: &AmqpSettings) -> Result<Self, AmqpError> {
        let channel = connection.create_channel().await.map_err(protocol("channel.open"))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(protocol("confirm.select"))?;
        Ok(Self {
            channel,
            topology: Topology::new(settings),
            confirm_timeout: Duration::from_secs(settings.confirm_timeout_secs.max(1)),
        })
    }

    /// Whether the confirm channel is still usable (a channel-level error closes it for good).
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes a job (persistent, mandatory) and waits for the confirm.
    pub async fn publish_job(
        &self,
        job: &JobEnvelope,
        destination: &Destination,
        meta: &PublishMeta,
    ) -> Result<(), AmqpError> {
        let mut headers = FieldTable::default();
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(i64::from(meta.attempt.max(1))));
        headers.insert(
            PUBLISHED_MS_HEADER.into(),
            AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
        );
        for (k, v) in &meta.trace_headers {
            if let Ok(key) = ShortString::try_new(k.as_str()) {
                headers.insert(key, long_string(v));
            }
        }
        let high = job.data.priority == Priority::High;
        let (exchange, key) = match destination {
            Destination::Work => {
                (self.topology.jobs_exchange(), work_routing_key(job.data.priority).to_string())
            }
            Destination::Retry(tier) if high => {
                (self.topology.retry_exchange(), Topology::high_tier_key(tier))
            }
            Destination::Retry(tier) => (self.topology.retry_exchange(), Topology::tier_key(tier)),
            Destination::Dead { reason } => {
                headers.insert(DEAD_REASON_HEADER.into(), long_string(reason));
                (self.topology.dead_exchange(), DEAD_ROUTING_KEY.to_string())
            }
        };
        let mut props = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_message_id(job.id.to_string().into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_priority(job.data.priority.amqp_priority())
            .with_headers(headers);
        if let Ok(app) = ShortString::try_new(meta.app_id.as_str()) {
            props = props.with_app_id(app);
        }
        self.publish_raw(&exchange, &key, &job.to_json(), props).await
    }

    /// Publishes raw bytes (used to dead-letter bodies that are not valid jobs).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), AmqpError> {
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = self
            .channel
            .basic_publish(exchange.into(), routing_key.into(), opts, body, props)
            .await
            .map_err(protocol("basic.publish"))?;
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(self.confirm_timeout))?
            .map_err(protocol("publisher confirm"))?;
        match confirmation {
            lapin::Confirmation::Ack(None) => Ok(()),
            lapin::Confirmation::Ack(Some(returned)) => {
                Err(AmqpError::Unroutable(format!("{} → {exchange}/{routing_key}", returned.reply_text)))
            }
            lapin::Confirmation::Nack(_) => Err(AmqpError::Nacked),
            lapin::Confirmation::NotRequested => Ok(()),
        }
    }

    /// Parks a delivery (body and properties unchanged, so its attempt and publish time stay)
    /// for the park delay; it then goes back to the work queue it came from (`high`: the high one).
    pub async fn park_raw(
        &self,
        body: &[u8],
        original: &BasicProperties,
        high: bool,
    ) -> Result<(), AmqpError> {
        let props = original.clone().with_delivery_mode(2);
        self.publish_raw(&self.topology.park_exchange(), &self.topology.park_key(high), body, props).await
    }

    /// Dead-letters an arbitrary body with a reason header, keeping its original properties.
    pub async fn dead_letter_raw(
        &self,
        body: &[u8],
        original: &BasicProperties,
        reason: &str,
    ) -> Result<(), AmqpError> {
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(DEAD_REASON_HEADER.into(), long_string(reason));
        let props = original.clone().with_headers(headers).with_delivery_mode(2);
        self.publish_raw(&self.topology.dead_exchange(), DEAD_ROUTING_KEY, body, props).await
    }
}

/// Reads an integer header (any AMQP integer type), e.g. the attempt number.
pub fn header_u32(props: &BasicProperties, name: &str) -> Option<u32> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    let n: i64 = match value {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok()?,
        _ => return None,
    };
    u32::try_from(n).ok()
}

/// Reads a string header, e.g. `traceparent`.
/// When the message was published, as Unix milliseconds, from the best source it carries.
/// Values a publisher could not have meant (before 2000, or far in the future) are ignored.
pub fn published_at_ms(props: &BasicProperties) -> Option<i64> {
    let precise = props.headers().as_ref().and_then(|h| match h.inner().get(PUBLISHED_MS_HEADER)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        _ => None,
    });
    let coarse = props.timestamp().and_then(|s| i64::try_from(s).ok()).and_then(|s| s.checked_mul(1000));
    const Y2000_MS: i64 = 946_684_800_000;
    let plausible = |ms: &i64| *ms >= Y2000_MS && *ms <= chrono::Utc::now().timestamp_millis() + 86_400_000;
    precise.filter(plausible).or(coarse.filter(plausible))
}

/// Seconds between a publish time and now, never negative, never overflowing.
pub fn queue_wait_secs(published_ms: i64, now_ms: i64) -> f64 {
    now_ms.checked_sub(published_ms).map_or(0.0, |d| d.max(0) as f64 / 1000.0)
}

/// The W3C trace-context headers a message carries.
pub fn trace_headers(props: &BasicProperties) -> Vec<(String, String)> {
    ["traceparent", "tracestate"]
        .iter()
        .filter_map(|k| header_str(props, k).map(|v| (k.to_string(), v)))
        .collect()
}

pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_route_to_their_queue_through_retries_and_parking() {
        let settings = AmqpSettings { prefix: "p".into(), park_delay_ms: 1500, ..AmqpSettings::default() };
        let t = Topology::new(&settings);
        assert_eq!(work_routing_key(Priority::High), HIGH_ROUTING_KEY);
        assert_eq!(work_routing_key(Priority::Normal), ROUTING_KEY);
        assert_eq!(work_routing_key(Priority::Low), ROUTING_KEY);
        assert_eq!(t.work_queues(), ["p.jobs".to_string(), "p.jobs.high".to_string()]);
        let tier = &settings.retry_tiers[0];
        assert_eq!(t.retry_queue(tier), "p.retry.30s.30000ms");
        assert_eq!(t.high_retry_queue(tier), "p.retry.30s.30000ms.high");
        assert_eq!(Topology::high_tier_key(tier), "30s.30000ms.high");
        // The delay is in the park queues' names and keys: two configurations never share one.
        assert_eq!(
            (t.park_queue(false), t.park_key(false)),
            ("p.park.1500ms".to_string(), "1500ms".to_string())
        );
        assert_eq!(t.park_queue(true), "p.park.1500ms.high");
    }
}
