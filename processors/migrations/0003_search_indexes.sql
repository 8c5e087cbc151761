-- The console's search and `events show` at volume. Search finds a message or template by its id alone
-- (the (tenant, ...) indexes need the tenant) and pages the history newest first by each table's time;
-- without these, each search read whole tables: seconds per page at a few million rows, growing with them.
CREATE INDEX IF NOT EXISTS message_events_subject ON message_events (message_id);
CREATE INDEX IF NOT EXISTS template_events_subject ON template_events (template_id);
CREATE INDEX IF NOT EXISTS message_events_received ON message_events (received_at);
CREATE INDEX IF NOT EXISTS inbound_messages_received ON inbound_messages (received_at);
CREATE INDEX IF NOT EXISTS template_events_occurred ON template_events (occurred_at);
