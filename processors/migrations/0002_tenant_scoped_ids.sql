-- Event ids are unique per tenant only: two tenants may send the same id, and both events are kept.
ALTER TABLE message_events DROP CONSTRAINT IF EXISTS message_events_pkey;
ALTER TABLE message_events ADD PRIMARY KEY (tenant, event_id);
ALTER TABLE inbound_messages DROP CONSTRAINT IF EXISTS inbound_messages_pkey;
ALTER TABLE inbound_messages ADD PRIMARY KEY (tenant, event_id);
ALTER TABLE template_events DROP CONSTRAINT IF EXISTS template_events_pkey;
ALTER TABLE template_events ADD PRIMARY KEY (tenant, event_id);
-- `events show` and the console look events up by id alone.
CREATE INDEX IF NOT EXISTS message_events_event ON message_events (event_id);
CREATE INDEX IF NOT EXISTS inbound_messages_event ON inbound_messages (event_id);
CREATE INDEX IF NOT EXISTS template_events_event ON template_events (event_id);
