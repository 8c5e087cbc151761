"""A local sender that behaves like Sent: signed deliveries, retries, duplicates, out-of-order events."""

from sentpipe.sender.delivery import (
    SENT_RETRY_SCHEDULE,
    Attempt,
    Outcome,
    Signer,
    SigningMode,
    Stats,
    Unreachable,
    deliver,
    probe,
)
from sentpipe.sender.plan import Delivery, generate, plan_deliveries, scan_jsonl, stream_jsonl

__all__ = [
    "SENT_RETRY_SCHEDULE",
    "Attempt",
    "Delivery",
    "Outcome",
    "Signer",
    "SigningMode",
    "Stats",
    "Unreachable",
    "deliver",
    "generate",
    "plan_deliveries",
    "probe",
    "scan_jsonl",
    "stream_jsonl",
]
