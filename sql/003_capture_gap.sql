-- Gaps capture accepted knowingly (`--resync-from-now` after the slot was lost): store
-- changes committed after `lost_after` and before `resumed_at` were never read. `$status`
-- of every subscription created before `at` reports them as errors.
CREATE TABLE fhir_cdc.capture_gap (
    id          bigserial PRIMARY KEY,
    slot        text NOT NULL,
    lost_after  pg_lsn NOT NULL,
    resumed_at  pg_lsn NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    reason      text NOT NULL
);
