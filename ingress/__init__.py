"""The HTTP ingress: verify Sent's signature, produce the raw event, answer once the broker has it."""
