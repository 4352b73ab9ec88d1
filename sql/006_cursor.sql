-- A subscription's progress is a cursor, not one row per (subscription, event).
--
-- Before: dispatch inserted a `delivery` row per matched event, a send updated it to
-- `delivered`, retention deleted it, and both bumped the subscription row: about four row
-- writes (and their WAL) per notification, in what is usually the store's own database.
-- Now a subscription's matches are computed when it is sent, from the topic's events and
-- its filters, in event id order; eventNumbers count those matches from the cursor on:
--   cursor_number    the last eventNumber settled (delivered or dead-lettered);
--   cursor_event_id  every matching event up to this id is settled;
--   head_attempts    failed attempts of the head-of-line notification (ordered delivery:
--                    only the head can be failing).
-- A send writes one cursor update, grouped with the other subscriptions of its round.
-- start_event_id/start_number are where numbering is known to be exact looking back
-- ($events): a change of filters restarts them at the cursor.
ALTER TABLE fhir_cdc.subscription
    ADD COLUMN cursor_number bigint NOT NULL DEFAULT 0,
    ADD COLUMN cursor_event_id bigint NOT NULL DEFAULT 0,
    ADD COLUMN start_number bigint NOT NULL DEFAULT 0,
    ADD COLUMN head_attempts integer NOT NULL DEFAULT 0;

-- A requeued dead letter is sent again with its eventNumber, ahead of the cursor's events,
-- and removed once delivered.
ALTER TABLE fhir_cdc.dead_letter ADD COLUMN requeued boolean NOT NULL DEFAULT false;
CREATE INDEX dead_letter_requeued ON fhir_cdc.dead_letter (subscription_id, event_number)
    WHERE requeued;

-- Events up to `through_event_id` of a topic were removed by retention: numbering looking
-- back stops there.
CREATE TABLE fhir_cdc.retention (
    topic             text PRIMARY KEY,
    through_event_id  bigint NOT NULL
);

-- Upgrade. Pending deliveries numbered below one already settled were requeued dead
-- letters (the old requeue turned them pending again): they stay requeued.
INSERT INTO fhir_cdc.dead_letter (subscription_id, event_number, event_id, reason, requeued)
SELECT d.subscription_id, d.event_number, d.event_id, 'requeued before the upgrade', true
FROM fhir_cdc.delivery d
WHERE d.state = 'pending' AND d.event_number < (
    SELECT max(x.event_number) FROM fhir_cdc.delivery x
    WHERE x.subscription_id = d.subscription_id AND x.state <> 'pending')
ON CONFLICT (subscription_id, event_number) DO UPDATE SET requeued = true;

-- The cursor sits just before the first pending delivery of the tail (every event matched
-- below it was settled, and dispatch numbered in event id order); with nothing pending, at
-- everything dispatch had matched.
WITH tail AS (
    SELECT DISTINCT ON (d.subscription_id) d.subscription_id, d.event_number, d.event_id
    FROM fhir_cdc.delivery d
    WHERE d.state = 'pending' AND NOT EXISTS (
        SELECT 1 FROM fhir_cdc.dead_letter x
        WHERE x.subscription_id = d.subscription_id AND x.event_number = d.event_number
          AND x.requeued)
    ORDER BY d.subscription_id, d.event_number)
UPDATE fhir_cdc.subscription s SET
    cursor_number = coalesce(t.event_number - 1, s.events_since_start),
    cursor_event_id = coalesce(t.event_id - 1, greatest(s.start_event_id, coalesce(
        (SELECT c.last_event_id FROM fhir_cdc.dispatch_cursor c WHERE c.topic = s.topic), 0))),
    head_attempts = coalesce((SELECT d.attempts FROM fhir_cdc.delivery d
        WHERE d.subscription_id = s.id AND d.event_number = t.event_number), 0)
FROM fhir_cdc.subscription s2 LEFT JOIN tail t ON t.subscription_id = s2.id
WHERE s2.id = s.id;

DROP TABLE fhir_cdc.delivery;
DROP TABLE fhir_cdc.dispatch_cursor;
ALTER TABLE fhir_cdc.subscription DROP COLUMN events_since_start;
