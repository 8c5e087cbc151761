"""The contract: Sent's wire format, the canonical event model, topic names and routing."""
