-- A small Aidbox/fhirbase-style FHIR store, for the demo and the tests: a table per resource
-- type (lower-case name) and a _history table, written the way Aidbox writes them.
-- fhir-cdc never writes these tables; it only reads their WAL.

CREATE OR REPLACE FUNCTION aidbox_create_type(rtype text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE t text := lower(rtype);
BEGIN
  EXECUTE format('CREATE TABLE IF NOT EXISTS %I (
      id text PRIMARY KEY, txid bigint NOT NULL, cts timestamptz NOT NULL DEFAULT now(),
      ts timestamptz NOT NULL DEFAULT now(), resource_type text NOT NULL DEFAULT %L,
      status text NOT NULL, resource jsonb NOT NULL)', t, rtype);
  EXECUTE format('CREATE TABLE IF NOT EXISTS %I (
      id text NOT NULL, txid bigint NOT NULL, cts timestamptz NOT NULL DEFAULT now(),
      ts timestamptz NOT NULL DEFAULT now(), resource_type text NOT NULL DEFAULT %L,
      status text NOT NULL, resource jsonb NOT NULL, PRIMARY KEY (id, txid))', t || '_history', rtype);
END $$;

-- Create or update: an update first copies the old row to history, then updates the main row.
CREATE OR REPLACE FUNCTION aidbox_put(rtype text, rid text, body jsonb) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE t text := lower(rtype); tx bigint := txid_current(); n int;
BEGIN
  EXECUTE format('INSERT INTO %I (id, txid, cts, ts, resource_type, status, resource)
                  SELECT id, txid, cts, ts, resource_type, status, resource FROM %I WHERE id = $1
                  ON CONFLICT (id, txid) DO NOTHING', t || '_history', t) USING rid;
  EXECUTE format('UPDATE %I SET txid = $2, ts = now(), status = ''updated'', resource = $3 WHERE id = $1', t)
    USING rid, tx, body;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n = 0 THEN
    EXECUTE format('INSERT INTO %I (id, txid, resource_type, status, resource) VALUES ($1, $2, %L, ''created'', $3)', t, rtype)
      USING rid, tx, body;
  END IF;
  RETURN tx;
END $$;

-- Delete: a status='deleted' row goes to history, the main row goes away.
CREATE OR REPLACE FUNCTION aidbox_delete(rtype text, rid text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE t text := lower(rtype);
BEGIN
  EXECUTE format('INSERT INTO %I (id, txid, cts, ts, resource_type, status, resource)
                  SELECT id, txid_current(), cts, now(), resource_type, ''deleted'', resource FROM %I WHERE id = $1
                  ON CONFLICT (id, txid) DO NOTHING', t || '_history', t) USING rid;
  EXECUTE format('DELETE FROM %I WHERE id = $1', t) USING rid;
END $$;

SELECT aidbox_create_type(t) FROM unnest(ARRAY['Patient', 'Encounter', 'Observation', 'DiagnosticReport', 'MedicationRequest', 'Subscription']) AS t;

-- The entry point every store layout of scripts/stores/ also has (demo, workload replays).
CREATE OR REPLACE FUNCTION fhir_put(ty text, rid text, body jsonb) RETURNS void AS $$
  SELECT aidbox_put(ty, rid, body - 'id' - 'meta' - 'resourceType');
$$ LANGUAGE sql;
CREATE OR REPLACE FUNCTION fhir_delete(ty text, rid text) RETURNS void AS $$
  SELECT aidbox_delete(ty, rid);
$$ LANGUAGE sql;
