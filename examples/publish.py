#!/usr/bin/env python3
"""Publish one syncfleet sync job from Python (pika), the way syncfleet's own producer does.

    publish.py --database <notion id> [--mode full|incremental] [--amqp-url URL] [--prefix PREFIX]
               [--integration SLUG] [--priority low|normal|high]

The job is a CloudEvents 1.0 structured-mode JSON event (shared/schema/sync_database.v1.schema.json)
sent to the `<prefix>.jobs` exchange, persistent and `mandatory`, on a channel with publisher
confirms. The routing key picks the queue: `sync.high` (`<prefix>.jobs.high`, ahead of any
scheduled backlog) for --priority high, `sync` otherwise. It prints the job id and exits 0 only after RabbitMQ confirmed
the publish; an unroutable or refused message exits 1. Without --integration the worker uses the
integration the database is registered with.
"""
import argparse
import datetime
import json
import os
import sys
import time
import uuid

import pika

PRIORITIES = {"low": 1, "normal": 4, "high": 8}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", required=True, help="Notion database id (dashes optional)")
    parser.add_argument("--mode", choices=["full", "incremental"], default="incremental")
    parser.add_argument("--amqp-url", default=os.environ.get("SYNCFLEET_AMQP__URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    parser.add_argument("--prefix", default=os.environ.get("SYNCFLEET_AMQP__PREFIX", "syncfleet"))
    parser.add_argument("--integration", default="", help="integration slug (default: the database's)")
    parser.add_argument("--priority", choices=sorted(PRIORITIES), default="normal")
    args = parser.parse_args()
    try:
        database = uuid.UUID(args.database.strip())
    except ValueError:
        print(f"--database: {args.database!r} is not a Notion id", file=sys.stderr)
        return 2

    job_id = uuid.uuid4()
    now = datetime.datetime.now(datetime.timezone.utc)
    data = {"database_id": str(database), "mode": args.mode, "priority": args.priority, "reason": "api"}
    if args.integration:
        data["integration"] = args.integration
    body = json.dumps({
        "specversion": "1.0",
        "type": "dev.syncfleet.sync_database.v1",
        "source": "urn:example:publish.py",
        "id": str(job_id),
        "time": now.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }).encode()
    properties = pika.BasicProperties(
        content_type="application/cloudevents+json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=str(job_id),
        timestamp=int(time.time()),
        priority=PRIORITIES[args.priority],
        app_id="publish.py",
        headers={"x-syncfleet-published-ms": int(time.time() * 1000)},
    )
    try:
        connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    except pika.exceptions.AMQPError as e:
        print(f"cannot connect to RabbitMQ: {e!r}", file=sys.stderr)
        return 1
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        # With confirms on, basic_publish returns once the broker confirmed, and raises when the
        # message was returned (unroutable) or nacked.
        routing_key = "sync.high" if args.priority == "high" else "sync"
        channel.basic_publish(f"{args.prefix}.jobs", routing_key, body, properties, mandatory=True)
    except pika.exceptions.UnroutableError:
        print(f"unroutable: is syncfleet running with prefix {args.prefix!r}?", file=sys.stderr)
        return 1
    except pika.exceptions.NackError:
        print("RabbitMQ refused the job (nack)", file=sys.stderr)
        return 1
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            print(f"no exchange {args.prefix}.jobs: is syncfleet running with prefix {args.prefix!r}?", file=sys.stderr)
        else:
            print(f"RabbitMQ closed the channel: {e.reply_code} {e.reply_text}", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPError as e:
        print(f"publishing failed: {e!r}", file=sys.stderr)
        return 1
    finally:
        if connection.is_open:
            connection.close()
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
