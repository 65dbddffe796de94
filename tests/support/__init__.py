"""Real test doubles shared by the test tiers: an S3 endpoint (moto behind a stoppable proxy)."""
