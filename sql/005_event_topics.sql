-- One event row per store change, whatever the number of topics it fired (their urls in
-- `topics`): with 20 topics the capture write was ten rows per change. Dispatch walks all
-- events by id and takes its topic's; a topic's cursor still means "every event of this
-- topic up to here is dispatched", so the cursors carry over. Rows written before keep their
-- one topic.
ALTER TABLE fhir_cdc.event ADD COLUMN topics text[];
UPDATE fhir_cdc.event SET topics = ARRAY[topic];
ALTER TABLE fhir_cdc.event ALTER COLUMN topics SET NOT NULL;
ALTER TABLE fhir_cdc.event DROP COLUMN topic;
