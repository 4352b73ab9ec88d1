-- A subscription's signing secret (the signing-secret extension): notifications carry an
-- HMAC-SHA256 of their body with it. Write-only like the headers: reads show `***`.
ALTER TABLE fhir_cdc.subscription ADD COLUMN signing_secret text;
