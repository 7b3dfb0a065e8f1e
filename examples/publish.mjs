#!/usr/bin/env node
// Publish one syncfleet sync job from Node.js (amqplib), the way syncfleet's own producer does.
//
//   node publish.mjs --database <notion id> [--mode full|incremental] [--amqp-url URL]
//                    [--prefix PREFIX] [--integration SLUG] [--priority low|normal|high]
//
// The job is a CloudEvents 1.0 structured-mode JSON event (shared/schema/sync_database.v1.schema.json)
// sent to the `<prefix>.jobs` exchange, persistent and `mandatory`, on a confirm channel. The
// routing key picks the queue: `sync.high` (`<prefix>.jobs.high`, ahead of any scheduled
// backlog) for --priority high, `sync` otherwise. It prints the job id and exits 0 only after RabbitMQ confirmed the publish; an
// unroutable or refused message exits 1. Without --integration the worker uses the integration
// the database is registered with.
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import amqp from "amqplib";

const PRIORITIES = { low: 1, normal: 4, high: 8 };

function fail(message, code = 1) {
  console.error(message);
  process.exit(code);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      database: { type: "string" },
      mode: { type: "string", default: "incremental" },
      "amqp-url": { type: "string", default: process.env.SYNCFLEET_AMQP__URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f" },
      prefix: { type: "string", default: process.env.SYNCFLEET_AMQP__PREFIX ?? "syncfleet" },
      integration: { type: "string", default: "" },
      priority: { type: "string", default: "normal" },
    },
  }));
} catch (e) {
  fail(e.message, 2);
}
const hex = (args.database ?? "").trim().replaceAll("-", "");
if (!/^[0-9a-fA-F]{32}$/.test(hex)) fail(`--database: ${JSON.stringify(args.database ?? "")} is not a Notion id`, 2);
if (!["full", "incremental"].includes(args.mode)) fail("--mode must be full or incremental", 2);
if (!(args.priority in PRIORITIES)) fail("--priority must be low, normal or high", 2);

const jobId = randomUUID();
const data = { database_id: hex, mode: args.mode, priority: args.priority, reason: "api" };
if (args.integration) data.integration = args.integration;
const body = Buffer.from(JSON.stringify({
  specversion: "1.0",
  type: "dev.syncfleet.sync_database.v1",
  source: "urn:example:publish.mjs",
  id: jobId,
  time: new Date().toISOString(),
  datacontenttype: "application/json",
  data,
}));

let connection;
try {
  connection = await amqp.connect(args["amqp-url"]);
} catch (e) {
  fail(`cannot connect to RabbitMQ: ${e.message}`);
}
try {
  const channel = await connection.createConfirmChannel();
  let returned = false;
  channel.on("return", () => { returned = true; });
  await new Promise((resolve, reject) => {
    const routingKey = args.priority === "high" ? "sync.high" : "sync";
    channel.publish(`${args.prefix}.jobs`, routingKey, body, {
      contentType: "application/cloudevents+json",
      persistent: true,
      mandatory: true,
      messageId: jobId,
      timestamp: Math.floor(Date.now() / 1000),
      priority: PRIORITIES[args.priority],
      appId: "publish.mjs",
      headers: { "x-syncfleet-published-ms": Date.now() },
    }, (err) => (err ? reject(new Error("RabbitMQ refused the job (nack)")) : resolve()));
  });
  // A returned (unroutable) message is sent back before its confirm.
  if (returned) throw new Error(`unroutable: is syncfleet running with prefix ${JSON.stringify(args.prefix)}?`);
  await channel.close();
} catch (e) {
  await connection.close().catch(() => {});
  fail(e.message);
}
await connection.close();
console.log(jobId);
