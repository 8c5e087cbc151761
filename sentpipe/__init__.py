"""sentpipe: Sent's webhooks into a durable, deduplicated, replayable Kafka pipeline."""

__version__ = "0.1.0"
