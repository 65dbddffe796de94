"""Helpers shared by the test tiers: an S3 endpoint (moto behind a stoppable proxy), the chart as helm renders it,
the dashboards' queries and the invalid FinetuneJob specs."""
