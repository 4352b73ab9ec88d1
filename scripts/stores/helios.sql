-- The tables of Helios HFS (HeliosSoftware/hfs, crates/persistence/src/backends/postgres,
-- schema v39) that matter to fhir-cdc, for tests and the demo. HFS creates these itself.
CREATE TABLE resources (
    tenant_id     TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    version_id    TEXT NOT NULL,
    data          JSONB NOT NULL,
    last_updated  TIMESTAMPTZ NOT NULL DEFAULT now(),
    is_deleted    BOOLEAN NOT NULL DEFAULT false,
    deleted_at    TIMESTAMPTZ,
    fhir_version  TEXT NOT NULL DEFAULT '4.0',
    PRIMARY KEY (tenant_id, resource_type, id)
);
CREATE TABLE resource_history (
    tenant_id     TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    version_id    TEXT NOT NULL,
    data          JSONB NOT NULL,
    last_updated  TIMESTAMPTZ NOT NULL DEFAULT now(),
    is_deleted    BOOLEAN NOT NULL DEFAULT false,
    fhir_version  TEXT NOT NULL DEFAULT '4.0',
    PRIMARY KEY (tenant_id, resource_type, id, version_id)
);
-- No primary key since schema v23: publishing it would make Postgres refuse HFS's writes.
CREATE TABLE search_index (
    tenant_id     TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    param_name    TEXT NOT NULL,
    value_string  TEXT,
    value_token_system TEXT,
    value_token_code   TEXT,
    value_reference    TEXT,
    value_date    TIMESTAMPTZ
);
CREATE INDEX idx_search_index_lookup ON search_index (tenant_id, resource_type, param_name);
CREATE TABLE resource_fts (
    tenant_id     TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    content       TSVECTOR,
    UNIQUE (tenant_id, resource_type, resource_id)
);

-- The statements HFS's REST path runs, as functions, so tests and the demo write the way it
-- does (each call is its own autocommit transaction unless the caller opens one).
CREATE FUNCTION hfs_create(t text, ty text, rid text, body jsonb) RETURNS void AS $$
    WITH ins AS (
        INSERT INTO resources (tenant_id, resource_type, id, version_id, data, last_updated)
        VALUES (t, ty, rid, '1', body || jsonb_build_object('resourceType', ty, 'id', rid), now())
        ON CONFLICT DO NOTHING RETURNING *)
    INSERT INTO resource_history (tenant_id, resource_type, id, version_id, data, last_updated, is_deleted, fhir_version)
    SELECT tenant_id, resource_type, id, version_id, data, last_updated, false, fhir_version FROM ins;
$$ LANGUAGE sql;

CREATE FUNCTION hfs_update(t text, ty text, rid text, body jsonb) RETURNS void AS $$
    WITH up AS (
        UPDATE resources SET version_id = (version_id::int + 1)::text,
               data = body || jsonb_build_object('resourceType', ty, 'id', rid), last_updated = now()
        WHERE tenant_id = t AND resource_type = ty AND id = rid AND NOT is_deleted RETURNING *)
    INSERT INTO resource_history (tenant_id, resource_type, id, version_id, data, last_updated, is_deleted, fhir_version)
    SELECT tenant_id, resource_type, id, version_id, data, last_updated, false, fhir_version FROM up;
$$ LANGUAGE sql;

-- Soft delete: `data` untouched, the history row holds 'null'.
CREATE FUNCTION hfs_delete(t text, ty text, rid text) RETURNS void AS $$
    WITH del AS (
        UPDATE resources SET is_deleted = true, deleted_at = now(), last_updated = now(),
               version_id = (version_id::int + 1)::text
        WHERE tenant_id = t AND resource_type = ty AND id = rid AND NOT is_deleted RETURNING *)
    INSERT INTO resource_history (tenant_id, resource_type, id, version_id, data, last_updated, is_deleted, fhir_version)
    SELECT tenant_id, resource_type, id, version_id, 'null'::jsonb, last_updated, true, fhir_version FROM del;
$$ LANGUAGE sql;

-- Re-create after delete, first half (HFS's restore_deleted): the UPDATE alone; the history
-- row follows in a transaction of its own (hfs_restore_history).
CREATE FUNCTION hfs_restore(t text, ty text, rid text, body jsonb) RETURNS void AS $$
    UPDATE resources SET version_id = (version_id::int + 1)::text,
           data = body || jsonb_build_object('resourceType', ty, 'id', rid),
           is_deleted = false, deleted_at = NULL, last_updated = now()
    WHERE tenant_id = t AND resource_type = ty AND id = rid AND is_deleted;
$$ LANGUAGE sql;

CREATE FUNCTION hfs_restore_history(t text, ty text, rid text) RETURNS void AS $$
    INSERT INTO resource_history (tenant_id, resource_type, id, version_id, data, last_updated, is_deleted, fhir_version)
    SELECT tenant_id, resource_type, id, version_id, data, last_updated, false, fhir_version
    FROM resources WHERE tenant_id = t AND resource_type = ty AND id = rid;
$$ LANGUAGE sql;

-- One entry point for the demo and workload replays: create, update or re-create as HFS
-- would (tenant 'default'); delete.
CREATE FUNCTION fhir_put(ty text, rid text, body jsonb) RETURNS void AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM resources WHERE tenant_id = 'default' AND resource_type = ty AND id = rid AND NOT is_deleted) THEN
    PERFORM hfs_update('default', ty, rid, body);
  ELSIF EXISTS (SELECT 1 FROM resources WHERE tenant_id = 'default' AND resource_type = ty AND id = rid) THEN
    PERFORM hfs_restore('default', ty, rid, body);
    PERFORM hfs_restore_history('default', ty, rid);
  ELSE
    PERFORM hfs_create('default', ty, rid, body);
  END IF;
END $$ LANGUAGE plpgsql;

CREATE FUNCTION fhir_delete(ty text, rid text) RETURNS void AS $$
  SELECT hfs_delete('default', ty, rid);
$$ LANGUAGE sql;
