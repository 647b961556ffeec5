"""A small labelled corpus for the RAG tests: documents in three formats, and questions
(paraphrased, not copied) with the source and heading of the chunk that answers them."""

from __future__ import annotations

from proxy.services.rag import DocumentInput

CORPUS = "corpus"  # the workspace the session fixture `corpus_url` fills

POSTGRES = """# PostgreSQL operations

Runbook for the production database cluster (three nodes, one primary).

## Backups

A full physical backup is taken with pg_basebackup every night at 02:00 UTC and shipped to
object storage. Write-ahead log segments are archived continuously, so any point in time can
be restored. Backups are retained for 14 days; monthly snapshots are kept for a year.

To restore, provision a fresh node, fetch the base backup and set `recovery_target_time`.

## Vacuum

Autovacuum runs with a scale factor of 0.05 on the large tables. If table bloat exceeds 30%,
schedule a `pg_repack` during the Sunday maintenance window rather than VACUUM FULL, which
takes an exclusive lock.

## Failover

Patroni watches the primary. When it stops answering health checks for 30 seconds, Patroni
promotes the most up-to-date replica and moves the virtual IP to it. Applications reconnect
automatically; in-flight transactions are lost and must be retried.
"""

HANDBOOK = """# Employee handbook

## Vacation

Every full-time employee receives 25 days of paid vacation per calendar year. Up to five
unused days may be carried over, but they expire on March 31 of the following year. Book
vacation in the HR portal at least two weeks ahead.

## Parental leave

Parents, including adoptive parents, get 16 weeks of fully paid parental leave, to be taken
within the first year after the birth or adoption. It can be split into two blocks.

## Sick leave

If you are ill, tell your manager before 10:00. From the fourth consecutive day of absence a
doctor's note is required.
"""

API = """# Acme API reference

## Authentication

Every request carries an API key in the `Authorization: Bearer` header. To rotate a key,
open the admin console, choose Credentials and click Rotate. The old key keeps working for
24 hours so that deployments can switch over.

## Rate limits

Each key may send 600 requests per minute. Above that the API answers 429 Too Many
Requests with a Retry-After header; clients should back off exponentially.

## Errors

Errors use conventional HTTP status codes. Error code E1147 means that the webhook
signature did not verify: check that the shared secret matches the one in the console.
"""

BREAD = """<!doctype html>
<html><head><title>Sourdough</title><style>body { font-family: serif; }</style></head>
<body>
<nav><a href="/">Home</a> | <a href="/recipes">Recipes</a></nav>
<h1>Sourdough bread</h1>
<h2>Starter</h2>
<p>Keep the starter at room temperature and feed it equal weights of flour and water every
12 hours. It is ready when it doubles in size within six hours of a feed.</p>
<h2>Baking</h2>
<p>Preheat the oven with a Dutch oven inside to <b>250 &deg;C</b>. Bake the loaf for 20 minutes
with the lid on, then 25 minutes with the lid off, until the crust is deep brown.</p>
<script>trackPageView();</script>
</body></html>
"""

JAPAN = """Travelling in Japan

The Japan Rail Pass covers most JR trains, including the Shinkansen bullet trains except the
fastest Nozomi and Mizuho services, for 7, 14 or 21 consecutive days. It must be bought
before arrival.

IC cards such as Suica work on subways, buses and in convenience stores; top them up at any
station machine.
"""

GARDEN = """# Growing tomatoes

## Watering

Water tomato plants deeply twice a week rather than a little every day; irregular watering
causes blossom end rot. Water the soil, not the leaves, early in the morning.

## Pruning

Remove the side shoots that grow between the main stem and the branches of cordon varieties.
"""

DOCUMENTS = [
    DocumentInput(POSTGRES, "markdown", "runbooks/postgres.md", {"team": "sre"}),
    DocumentInput(HANDBOOK, "markdown", "handbook.md", {"team": "hr"}),
    DocumentInput(API, "markdown", "docs/api.md", {"team": "platform"}),
    DocumentInput(BREAD, "html", "recipes/sourdough.html"),
    DocumentInput(JAPAN, "text", "travel/japan.txt"),
    DocumentInput(GARDEN, "markdown", "garden/tomatoes.md"),
]

# (question, source, words the answering chunk's heading path contains)
QUESTIONS = [
    ("How long do we keep the nightly database backups?", "runbooks/postgres.md", "Backups"),
    ("What happens when the primary database server dies?", "runbooks/postgres.md", "Failover"),
    ("How many days off do I get each year?", "handbook.md", "Vacation"),
    ("How much time off do new mothers and fathers get after a baby arrives?", "handbook.md", "Parental"),
    ("What does E1147 mean?", "docs/api.md", "Errors"),
    ("How do I replace my API key with a new one?", "docs/api.md", "Authentication"),
    ("At what temperature should the loaf go into the oven?", "recipes/sourdough.html", "Baking"),
    ("How often should I feed my sourdough starter?", "recipes/sourdough.html", "Starter"),
    ("Can I ride the bullet train with the rail pass?", "travel/japan.txt", ""),
    ("How many calls per minute am I allowed to make?", "docs/api.md", "Rate limits"),
    ("How often should I water my tomatoes?", "garden/tomatoes.md", "Watering"),
]

UNRELATED = "Who won the football world cup in 1998?"
