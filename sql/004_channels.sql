-- The websocket, email and message channels.
ALTER TABLE fhir_cdc.subscription DROP CONSTRAINT IF EXISTS subscription_channel_check;
ALTER TABLE fhir_cdc.subscription
    ADD CONSTRAINT subscription_channel_check
    CHECK (channel IN ('rest-hook', 'websocket', 'email', 'message'));

-- Websocket binding tokens from $get-ws-binding-token: single use (deleted when used),
-- short-lived, and valid on every instance that shares this queue. Only a hash is kept.
CREATE TABLE fhir_cdc.ws_token (
    token_hash     bytea PRIMARY KEY,
    subscriptions  text[] NOT NULL,
    expires_at     timestamptz NOT NULL
);
