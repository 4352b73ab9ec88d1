-- Which channel a subscription is delivered over. Existing subscriptions were rest-hook, the
-- only channel before this migration. Later channels widen the check.
ALTER TABLE fhir_cdc.subscription
    ADD COLUMN channel text NOT NULL DEFAULT 'rest-hook' CHECK (channel IN ('rest-hook'));
