-- The tables of HAPI FHIR JPA >= 6.8 on Postgres (hapifhir/hapi-fhir: ResourceTable.java,
-- ResourceHistoryTable.java, HapiFhirJpaMigrationTasks.java) that matter to fhir-cdc, for
-- tests and the demo. HAPI creates these itself (with many index tables).
CREATE SEQUENCE seq_resource_id;
CREATE SEQUENCE seq_resource_history_id;
CREATE TABLE hfj_resource (
    res_id          int8 PRIMARY KEY,
    partition_id    int4,
    partition_date  date,
    res_type        varchar(40) NOT NULL,
    fhir_id         varchar(64) NOT NULL,
    res_ver         int8 NOT NULL,
    res_version     varchar(7),
    res_published   timestamp NOT NULL,
    res_updated     timestamp NOT NULL,
    res_deleted_at  timestamp,
    hash_sha256     varchar(64),
    has_tags        boolean NOT NULL DEFAULT false,
    sp_index_status int2,
    CONSTRAINT idx_res_type_fhir_id UNIQUE (res_type, fhir_id)
);
CREATE TABLE hfj_res_ver (
    pid             int8 PRIMARY KEY,
    partition_id    int4,
    partition_date  date,
    res_id          int8 NOT NULL REFERENCES hfj_resource (res_id),
    res_ver         int8 NOT NULL,
    res_type        varchar(40) NOT NULL,
    res_version     varchar(7),
    res_encoding    varchar(5) NOT NULL,
    res_text        oid,
    res_text_vc     text,
    res_published   timestamp NOT NULL,
    res_updated     timestamp NOT NULL,
    res_deleted_at  timestamp,
    has_tags        boolean NOT NULL DEFAULT false,
    source_uri      varchar(768),
    request_id      varchar(16),
    CONSTRAINT idx_resver_id_ver UNIQUE (res_id, res_ver)
);
CREATE TABLE hfj_spidx_token (
    sp_id        int8 PRIMARY KEY,
    res_id       int8 NOT NULL REFERENCES hfj_resource (res_id),
    res_type     varchar(40) NOT NULL,
    sp_name      varchar(100) NOT NULL,
    sp_system    varchar(200),
    sp_value     varchar(200)
);
CREATE SEQUENCE seq_spidx_token;

-- HAPI's writes, one Spring transaction each (the caller's transaction when it opens one).
-- Create: INSERT hfj_resource (version 1), INSERT hfj_res_ver, index rows.
CREATE FUNCTION hapi_create(ty text, fid text, body jsonb) RETURNS int8 AS $$
DECLARE rid int8 := nextval('seq_resource_id'); at timestamp := now() AT TIME ZONE 'UTC';
BEGIN
  INSERT INTO hfj_resource (res_id, res_type, fhir_id, res_ver, res_version, res_published, res_updated, hash_sha256)
  VALUES (rid, ty, fid, 1, 'R4', at, at, md5(body::text));
  INSERT INTO hfj_res_ver (pid, res_id, res_ver, res_type, res_version, res_encoding, res_text_vc, res_published, res_updated, source_uri, request_id)
  VALUES (nextval('seq_resource_history_id'), rid, 1, ty, 'R4', 'JSON', body::text, at, at, 'urn:source#req1', 'req1');
  INSERT INTO hfj_spidx_token (sp_id, res_id, res_type, sp_name, sp_value) VALUES (nextval('seq_spidx_token'), rid, ty, '_id', fid);
  RETURN rid;
END $$ LANGUAGE plpgsql;

-- Update (and re-create after delete): INSERT hfj_res_ver (N+1), UPDATE hfj_resource.
CREATE FUNCTION hapi_update(ty text, fid text, body jsonb) RETURNS int8 AS $$
DECLARE rid int8; v int8; at timestamp := now() AT TIME ZONE 'UTC';
BEGIN
  SELECT res_id, res_ver + 1 INTO rid, v FROM hfj_resource WHERE res_type = ty AND fhir_id = fid;
  INSERT INTO hfj_res_ver (pid, res_id, res_ver, res_type, res_version, res_encoding, res_text_vc, res_published, res_updated)
  VALUES (nextval('seq_resource_history_id'), rid, v, ty, 'R4', 'JSON', body::text, at, at);
  UPDATE hfj_resource SET res_ver = v, res_updated = at, res_deleted_at = NULL, hash_sha256 = md5(body::text)
  WHERE res_id = rid AND res_ver = v - 1;
  RETURN v;
END $$ LANGUAGE plpgsql;

-- Delete: UPDATE hfj_resource (deleted, version + 1), INSERT hfj_res_ver 'DEL' without body,
-- index rows removed.
CREATE FUNCTION hapi_delete(ty text, fid text) RETURNS int8 AS $$
DECLARE rid int8; v int8; at timestamp := now() AT TIME ZONE 'UTC';
BEGIN
  UPDATE hfj_resource SET res_deleted_at = at, res_updated = at, res_ver = res_ver + 1, hash_sha256 = NULL
  WHERE res_type = ty AND fhir_id = fid AND res_deleted_at IS NULL RETURNING res_id, res_ver INTO rid, v;
  INSERT INTO hfj_res_ver (pid, res_id, res_ver, res_type, res_version, res_encoding, res_published, res_updated, res_deleted_at)
  VALUES (nextval('seq_resource_history_id'), rid, v, ty, 'R4', 'DEL', at, at, at);
  DELETE FROM hfj_spidx_token WHERE res_id = rid;
  RETURN v;
END $$ LANGUAGE plpgsql;

-- A legacy version row: gzip JSON (JSONC) in a large object, as older releases wrote.
CREATE FUNCTION hapi_create_jsonc(ty text, fid text, gz bytea) RETURNS int8 AS $$
DECLARE rid int8 := nextval('seq_resource_id'); at timestamp := now() AT TIME ZONE 'UTC';
BEGIN
  INSERT INTO hfj_resource (res_id, res_type, fhir_id, res_ver, res_version, res_published, res_updated)
  VALUES (rid, ty, fid, 1, 'R4', at, at);
  INSERT INTO hfj_res_ver (pid, res_id, res_ver, res_type, res_version, res_encoding, res_text, res_published, res_updated)
  VALUES (nextval('seq_resource_history_id'), rid, 1, ty, 'R4', 'JSONC', lo_from_bytea(0, gz), at, at);
  RETURN rid;
END $$ LANGUAGE plpgsql;

-- One entry point for the demo and workload replays: create or update (a re-create is an
-- update in HAPI); delete. HAPI stores the body without id and meta.
CREATE FUNCTION fhir_put(ty text, rid text, body jsonb) RETURNS void AS $$
DECLARE b jsonb := (body - 'id' - 'meta') || jsonb_build_object('resourceType', ty);
BEGIN
  IF EXISTS (SELECT 1 FROM hfj_resource WHERE res_type = ty AND fhir_id = rid) THEN
    PERFORM hapi_update(ty, rid, b);
  ELSE
    PERFORM hapi_create(ty, rid, b);
  END IF;
END $$ LANGUAGE plpgsql;

CREATE FUNCTION fhir_delete(ty text, rid text) RETURNS void AS $$
  SELECT hapi_delete(ty, rid);
$$ LANGUAGE sql;
