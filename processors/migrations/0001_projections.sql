-- The built-in projections users query (README "The database"). Status values are stored lower-case.

CREATE TABLE IF NOT EXISTS message_events (
    event_id     text PRIMARY KEY,
    tenant       text        NOT NULL,
    message_id   text        NOT NULL,
    status       text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL,
    payload      jsonb       NOT NULL
);
CREATE INDEX IF NOT EXISTS message_events_message ON message_events (tenant, message_id, occurred_at);

CREATE TABLE IF NOT EXISTS message_status (
    tenant       text        NOT NULL,
    message_id   text        NOT NULL,
    status       text        NOT NULL,
    status_rank  smallint    NOT NULL,
    occurred_at  timestamptz NOT NULL,
    event_id     text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, message_id)
);

CREATE TABLE IF NOT EXISTS inbound_messages (
    event_id     text PRIMARY KEY,
    tenant       text        NOT NULL,
    from_number  text,
    to_number    text,
    text         text,
    channel      text,
    provider     text,
    occurred_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL,
    payload      jsonb       NOT NULL
);
CREATE INDEX IF NOT EXISTS inbound_messages_tenant ON inbound_messages (tenant, received_at);

CREATE TABLE IF NOT EXISTS template_events (
    event_id     text PRIMARY KEY,
    tenant       text        NOT NULL,
    template_id  text        NOT NULL,
    status       text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    payload      jsonb       NOT NULL
);
CREATE INDEX IF NOT EXISTS template_events_template ON template_events (tenant, template_id, occurred_at);

CREATE TABLE IF NOT EXISTS template_status (
    tenant       text        NOT NULL,
    template_id  text        NOT NULL,
    name         text,
    status       text        NOT NULL,
    reason       text,
    occurred_at  timestamptz NOT NULL,
    event_id     text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, template_id)
);
