"""Glue both planes need that is not contract: HTTP over h11 on asyncio, TLS contexts,
token buckets (`ratelimit`)."""
