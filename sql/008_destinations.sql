-- Broker destinations: subscriptions of origin 'config' (a [[destination]] of the config
-- file) delivered over NATS JetStream or AMQP 0-9-1.
ALTER TABLE fhir_cdc.subscription DROP CONSTRAINT IF EXISTS subscription_origin_check;
ALTER TABLE fhir_cdc.subscription
    ADD CONSTRAINT subscription_origin_check CHECK (origin IN ('api', 'store', 'config'));
ALTER TABLE fhir_cdc.subscription DROP CONSTRAINT IF EXISTS subscription_channel_check;
ALTER TABLE fhir_cdc.subscription
    ADD CONSTRAINT subscription_channel_check
    CHECK (channel IN ('rest-hook', 'websocket', 'email', 'message', 'nats', 'amqp'));
