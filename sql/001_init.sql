-- fhir-cdc queue schema. Everything the daemon owns lives in schema fhir_cdc; the store's
-- own tables are never written.

CREATE SCHEMA IF NOT EXISTS fhir_cdc;

-- The last store commit (its end LSN) whose events are queued. Written in the same
-- transaction as those events; the slot is confirmed only after that commit.
CREATE TABLE fhir_cdc.checkpoint (
    slot        text PRIMARY KEY,
    lsn         pg_lsn NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per (matching change, topic). Bodies only when a full-resource subscription needs them.
CREATE TABLE fhir_cdc.event (
    id             bigserial PRIMARY KEY,
    topic          text NOT NULL,
    resource_type  text NOT NULL,
    resource_id    text NOT NULL,
    version_id     text,
    interaction    text NOT NULL CHECK (interaction IN ('create', 'update', 'delete')),
    commit_lsn     pg_lsn NOT NULL,
    xid            bigint NOT NULL,
    commit_time    timestamptz NOT NULL,
    resource       jsonb,
    -- The topic's canFilterBy values of the resource: {"patient": {"t": "reference", "v": [...]}}.
    filters        jsonb,
    queued_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_topic_id ON fhir_cdc.event (topic, id);

CREATE TABLE fhir_cdc.subscription (
    id                  text PRIMARY KEY,
    origin              text NOT NULL CHECK (origin IN ('api', 'store')),
    topic               text NOT NULL,
    status              text NOT NULL CHECK (status IN ('requested', 'active', 'error', 'off')),
    endpoint            text NOT NULL,
    content             text NOT NULL CHECK (content IN ('empty', 'id-only', 'full-resource')),
    content_type        text NOT NULL,
    headers             jsonb NOT NULL DEFAULT '[]',
    -- Checked filterBy entries; dispatch matches them against each event's filters.
    filters             jsonb NOT NULL DEFAULT '[]',
    heartbeat_period    integer,
    timeout             integer,
    max_count           integer,
    end_at              timestamptz,
    resource            jsonb NOT NULL,
    -- Events with a larger id are this subscription's; fixed when it is created.
    start_event_id      bigint NOT NULL,
    events_since_start  bigint NOT NULL DEFAULT 0,
    handshake_done      boolean NOT NULL DEFAULT false,
    -- A Subscription written into the store that this server refused (reason in last_error):
    -- kept so $status and GET can say why; never matched nor sent.
    refused             boolean NOT NULL DEFAULT false,
    failures            integer NOT NULL DEFAULT 0,
    last_error          text,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    -- When anything (handshake, events, heartbeat) last went out; heartbeats count from it.
    last_sent_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscription_topic ON fhir_cdc.subscription (topic, status);

-- One row per event matched to a subscription; event_number is gap-free per subscription.
CREATE TABLE fhir_cdc.delivery (
    subscription_id  text NOT NULL REFERENCES fhir_cdc.subscription (id) ON DELETE CASCADE,
    event_number     bigint NOT NULL,
    event_id         bigint NOT NULL REFERENCES fhir_cdc.event (id),
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    delivered_at     timestamptz,
    PRIMARY KEY (subscription_id, event_number)
);
CREATE INDEX delivery_pending ON fhir_cdc.delivery (subscription_id, event_number) WHERE state = 'pending';

-- How far dispatch has matched each topic's events.
CREATE TABLE fhir_cdc.dispatch_cursor (
    topic          text PRIMARY KEY,
    last_event_id  bigint NOT NULL
);

-- Events that could not be delivered, with why. Never deleted by the daemon.
CREATE TABLE fhir_cdc.dead_letter (
    subscription_id  text NOT NULL,
    event_number     bigint NOT NULL,
    event_id         bigint NOT NULL,
    reason           text NOT NULL,
    dead_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, event_number)
);

-- SubscriptionTopics created in the store's own tables (topics from the TOML file are not
-- here). Written by capture at the topic's place in the stream.
CREATE TABLE fhir_cdc.topic (
    store_id    text PRIMARY KEY,
    url         text NOT NULL,
    resource    jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
