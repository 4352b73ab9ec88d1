-- The tables of Medplum (medplum/medplum, packages/server/src/migrations) that matter to
-- fhir-cdc, for tests and the demo: a quoted table per resource type and its _History.
-- Medplum creates these itself (with many more search columns).
DO $$
DECLARE ty text;
BEGIN
  FOREACH ty IN ARRAY ARRAY['Patient', 'Encounter', 'Observation', 'DiagnosticReport', 'MedicationRequest', 'Subscription'] LOOP
    EXECUTE format('CREATE TABLE %I (
        id uuid PRIMARY KEY,
        content text NOT NULL,
        "lastUpdated" timestamptz NOT NULL,
        deleted boolean NOT NULL DEFAULT false,
        "projectId" uuid,
        compartments uuid[],
        __version integer,
        _source text)', ty);
    EXECUTE format('CREATE TABLE %I (
        "versionId" uuid PRIMARY KEY,
        id uuid NOT NULL,
        content text NOT NULL,
        "lastUpdated" timestamptz NOT NULL)', ty || '_History');
    -- Older releases: token tables without a primary key.
    EXECUTE format('CREATE TABLE %I ("resourceId" uuid NOT NULL, code text NOT NULL, system text, value text)', ty || '_Token');
  END LOOP;
END $$;
CREATE TABLE "HumanName" ("resourceId" uuid NOT NULL, name text, given text, family text);

-- What repo.ts writeToDatabase does for a create or an update, in the caller's transaction:
-- the upsert of the main row, then the history row with the same versionId and content.
-- Returns the new versionId.
CREATE FUNCTION medplum_write(ty text, rid uuid, body jsonb, project uuid DEFAULT NULL) RETURNS text AS $$
DECLARE
  v uuid := gen_random_uuid();
  at timestamptz := date_trunc('milliseconds', clock_timestamp());
  content text;
BEGIN
  content := (body || jsonb_build_object('resourceType', ty, 'id', rid::text,
      'meta', jsonb_build_object('versionId', v::text,
          'lastUpdated', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))))::text;
  EXECUTE format('INSERT INTO %I (id, content, "lastUpdated", deleted, "projectId", __version)
                  VALUES ($1, $2, $3, false, $4, 9)
                  ON CONFLICT (id) DO UPDATE SET content = EXCLUDED.content,
                      "lastUpdated" = EXCLUDED."lastUpdated", deleted = false,
                      "projectId" = EXCLUDED."projectId"', ty)
    USING rid, content, at, project;
  EXECUTE format('INSERT INTO %I ("versionId", id, content, "lastUpdated") VALUES ($1, $2, $3, $4)',
                 ty || '_History')
    USING v, rid, content, at;
  EXECUTE format('DELETE FROM %I WHERE "resourceId" = $1', ty || '_Token') USING rid;
  EXECUTE format('INSERT INTO %I ("resourceId", code, value) VALUES ($1, ''_id'', $2)', ty || '_Token')
    USING rid, rid::text;
  RETURN v::text;
END $$ LANGUAGE plpgsql;

-- Delete: the main row upserted with deleted = true and content '', a history row with a new
-- versionId and content ''; lookup rows removed. Returns the versionId ('' when already deleted).
CREATE FUNCTION medplum_delete(ty text, rid uuid) RETURNS text AS $$
DECLARE
  v uuid := gen_random_uuid();
  at timestamptz := date_trunc('milliseconds', clock_timestamp());
  n integer;
BEGIN
  EXECUTE format('UPDATE %I SET deleted = true, content = '''', "lastUpdated" = $2
                  WHERE id = $1 AND NOT deleted', ty) USING rid, at;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n = 0 THEN RETURN ''; END IF;
  EXECUTE format('INSERT INTO %I ("versionId", id, content, "lastUpdated") VALUES ($1, $2, '''', $3)',
                 ty || '_History') USING v, rid, at;
  EXECUTE format('DELETE FROM %I WHERE "resourceId" = $1', ty || '_Token') USING rid;
  RETURN v::text;
END $$ LANGUAGE plpgsql;

-- One entry point for the demo and workload replays. Medplum ids are UUIDs: a text id is
-- mapped to the UUID of its md5, so replays can name resources as the workload does.
CREATE FUNCTION medplum_id(rid text) RETURNS uuid AS $$
  SELECT CASE WHEN rid ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN rid::uuid
              ELSE md5(rid)::uuid END;
$$ LANGUAGE sql IMMUTABLE;

CREATE FUNCTION fhir_put(ty text, rid text, body jsonb) RETURNS void AS $$
  SELECT medplum_write(ty, medplum_id(rid), body - 'id' - 'meta');
$$ LANGUAGE sql;

CREATE FUNCTION fhir_delete(ty text, rid text) RETURNS void AS $$
  SELECT medplum_delete(ty, medplum_id(rid));
$$ LANGUAGE sql;
