#!/usr/bin/env python3
"""Writes dashboards/syncfleet-fleet.json. Edit this file, run it, commit both (a test checks).

Every panel has a unit and a description, reads the templated datasource, and filters on the
namespace / integration / instance variables; rates use $__rate_interval.
"""
import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", instance=~"$instance"'
ISEL = SEL + ', integration=~"$integration"'

panel_id = 0
y = 0


def target(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(title, description, unit, exprs, x, w=8, h=8, kind="timeseries", extra=None):
    global panel_id
    panel_id += 1
    p = {
        "id": panel_id,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else {},
        "targets": [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(exprs)],
    }
    if extra:
        p["fieldConfig"]["defaults"].update(extra)
    return p


def row(title, panels):
    global panel_id, y
    panel_id += 1
    r = {"id": panel_id, "type": "row", "title": title, "collapsed": False,
         "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []}
    y += 1
    out = [r]
    for make in panels:
        out.append(make())
    y += 8
    return out


def q(metric_expr, by, quantile):
    return f"histogram_quantile({quantile}, sum by (le{by}) (rate({metric_expr}[$__rate_interval])))"


panels = []
panels += row("RED: are syncs succeeding?", [
    lambda: panel("Jobs processed per second", "Settled job deliveries per second by outcome (succeeded, failed, retried, dead_lettered, skipped, rejected).",
                  "ops", [(f'sum by (outcome) (rate(syncfleet_jobs_processed_total{{{SEL}}}[$__rate_interval]))', "{{outcome}}")], 0),
    lambda: panel("Failure ratio", "Share of settled jobs that failed permanently or were dead-lettered after exhausting retries.",
                  "percentunit", [(f'sum(rate(syncfleet_jobs_processed_total{{{SEL}, outcome=~"failed|dead_lettered"}}[$__rate_interval])) / clamp_min(sum(rate(syncfleet_jobs_processed_total{{{SEL}}}[$__rate_interval])), 1e-9)', "failure ratio")], 8,
                  extra={"min": 0, "max": 1}),
    lambda: panel("Job duration p50 / p95 / p99", "Time from taking a delivery to settling it, including waits on the Notion budget.",
                  "s", [(q(f'syncfleet_job_duration_seconds_bucket{{{SEL}}}', "", qq), f"p{int(qq*100)}") for qq in (0.5, 0.95, 0.99)], 16),
])
panels += row("Notion budget: how close to the rate limit?", [
    lambda: panel("Notion requests/s vs budget", "Requests per second per integration against its configured budget and its effective budget after slow start on unexplained 429s.",
                  "reqps", [(f'sum by (integration) (rate(syncfleet_notion_requests_total{{{ISEL}}}[$__rate_interval]))', "{{integration}} sent"),
                            (f'max by (integration) (syncfleet_rate_budget_configured_per_second{{{ISEL}}})', "{{integration}} configured"),
                            (f'min by (integration) (syncfleet_rate_budget_effective_per_second{{{ISEL}}})', "{{integration}} effective")], 0, w=6),
    lambda: panel("Budget utilisation", "Requests sent divided by the configured rate, per integration. Near 100% the budget, not the worker count, limits throughput.",
                  "percentunit", [(f'sum by (integration) (rate(syncfleet_notion_requests_total{{{ISEL}}}[$__rate_interval])) / on (integration) max by (integration) (syncfleet_rate_budget_configured_per_second{{{ISEL}}})', "{{integration}}")], 6, w=6,
                  extra={"min": 0}),
    lambda: panel("429s per second", "Notion 429/529 answers per integration. Each pauses the whole fleet for Retry-After; sustained 429s mean another app shares the budget.",
                  "reqps", [(f'sum by (integration) (rate(syncfleet_notion_rate_limited_total{{{ISEL}}}[$__rate_interval]))', "{{integration}}")], 12, w=6),
    lambda: panel("Budget wait and Notion latency", "p50/p99 time a request waits on the shared budget, and p95 Notion latency by endpoint template.",
                  "s", [(q(f'syncfleet_rate_budget_wait_seconds_bucket{{{SEL}}}', "", 0.5), "budget wait p50"),
                        (q(f'syncfleet_rate_budget_wait_seconds_bucket{{{SEL}}}', "", 0.99), "budget wait p99"),
                        (q(f'syncfleet_notion_request_duration_seconds_bucket{{{SEL}}}', ", endpoint", 0.95), "{{endpoint}} p95")], 18, w=6),
])
panels += row("Queue: when to scale?", [
    lambda: panel("Queue depth", "Messages ready and unacknowledged in the syncfleet queues: <p>.jobs, <p>.jobs.high (manual, API and webhook jobs) and the park queues (jobs over their integration's share), from RabbitMQ's per-queue metrics endpoint.",
                  "short", [('sum by (queue) (rabbitmq_detailed_queue_messages_ready{queue=~".*(jobs|park).*"})', "{{queue}} ready"),
                            ('sum by (queue) (rabbitmq_detailed_queue_messages_unacked{queue=~".*jobs.*"})', "{{queue}} unacked")], 0, w=6),
    lambda: panel("Queue wait p50 / p95", "Time jobs spend in RabbitMQ before a worker takes them. High wait with budget headroom means: add workers.",
                  "s", [(q(f'syncfleet_job_queue_wait_seconds_bucket{{{SEL}}}', "", qq), f"p{int(qq*100)}") for qq in (0.5, 0.95)], 6, w=6),
    lambda: panel("Consumers", "Consumers attached to the work queue (one per worker process).",
                  "short", [('sum by (queue) (rabbitmq_detailed_queue_consumers{queue=~".*jobs$"})', "{{queue}}")], 12, w=6),
    lambda: panel("In flight vs concurrency", "Jobs running now against the fleet's total concurrency (sum of worker prefetch).",
                  "short", [(f'sum(syncfleet_jobs_in_flight{{{SEL}}})', "in flight"), (f'sum(syncfleet_worker_concurrency{{{SEL}}})', "concurrency")], 18, w=6),
])
panels += row("Data: what changed, how fresh?", [
    lambda: panel("Pages per second by change", "Pages processed per second: created, updated, unchanged (not rewritten), deleted and invalid.",
                  "ops", [(f'sum by (change) (rate(syncfleet_pages_total{{{SEL}}}[$__rate_interval]))', "{{change}}")], 0),
    lambda: panel("Invalid pages", "Pages that failed validation in each interval; they are recorded in sync_page_errors and the run is partial.",
                  "short", [(f'sum(increase(syncfleet_pages_total{{{SEL}, change="invalid"}}[$__rate_interval]))', "invalid")], 8),
    lambda: panel("Freshness per database", "Seconds since each database's last successful sync, against its expected interval.",
                  "s", [(f'time() - max by (integration, database) (syncfleet_database_last_success_timestamp_seconds{{namespace=~"$namespace", integration=~"$integration"}})', "{{integration}}/{{database}}"),
                        (f'max by (integration, database) (syncfleet_database_sync_interval_seconds{{namespace=~"$namespace", integration=~"$integration"}})', "{{integration}}/{{database}} interval")], 16),
])
panels += row("Coordination: locks, leases, fences", [
    lambda: panel("Lock contention and parking", "Jobs per second that found their database locked and were folded into the holder's rerun pass, and jobs parked because their integration already had worker.max_jobs_per_integration jobs running.",
                  "ops", [(f'sum(rate(syncfleet_lock_contended_total{{{SEL}}}[$__rate_interval]))', "contended"),
                          (f'sum(rate(syncfleet_jobs_parked_total{{{SEL}}}[$__rate_interval]))', "parked")], 0, w=6),
    lambda: panel("Leases lost", "Database locks whose lease ran out under a running job (a stalled worker or Redis trouble).",
                  "short", [(f'sum(increase(syncfleet_lease_lost_total{{{SEL}}}[$__rate_interval]))', "lost")], 6, w=6),
    lambda: panel("Fence rejections", "Write transactions rejected because a newer lock holder advanced the fence: a stale worker was stopped from overwriting data.",
                  "short", [(f'sum(increase(syncfleet_fence_rejected_writes_total{{{SEL}}}[$__rate_interval]))', "rejected")], 12, w=6),
    lambda: panel("Circuit open", "1 while any worker's circuit breaker for the integration is open (Notion keeps failing).",
                  "bool_on_off", [(f'max by (integration) (syncfleet_circuit_open{{{ISEL}}})', "{{integration}}")], 18, w=6),
])


def variable(name, label, query, ds=True):
    v = {"name": name, "label": label, "type": "query", "datasource": DS, "refresh": 2,
         "query": {"query": query, "refId": name}, "definition": query, "includeAll": True, "multi": True,
         "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}
    return v


dashboard = {
    "uid": "syncfleet-fleet",
    "title": "syncfleet fleet",
    "description": "Notion → PostgreSQL sync fleet: job outcomes, Notion budget use, queue pressure, data freshness and coordination.",
    "tags": ["syncfleet", "notion"],
    "timezone": "",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": ""},
        variable("namespace", "Namespace", "label_values(syncfleet_build_info, namespace)"),
        variable("integration", "Integration", "label_values(syncfleet_rate_budget_configured_per_second, integration)"),
        variable("instance", "Instance", 'label_values(syncfleet_build_info{namespace=~"$namespace"}, instance)'),
    ]},
    "annotations": {"list": []},
    "links": [],
    "panels": panels,
}

import sys

# `build_dashboard.py [path]`: writes to path (the committed file by default); the test suite
# writes to a temporary file and checks the committed dashboard is what this script produces.
out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "dashboards" / "syncfleet-fleet.json"
out.write_text(json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n")
print(f"wrote {out}")
