-- An event's `resource` and `filters` are read only by fhir-cdc, which parses them itself.
-- As jsonb, the queue backend parsed each one on COPY: a third of its CPU per event in
-- scripts/bench.sh's capture drain (perf, jsonb_recv). As text it stores the bytes. The
-- rewrite of rows already queued happens once, here.
ALTER TABLE fhir_cdc.event
    ALTER COLUMN resource TYPE text USING resource::text,
    ALTER COLUMN filters TYPE text USING filters::text;
