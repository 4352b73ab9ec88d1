-- The last fatal error of each task (capture, send, housekeeping, listen), with what the
-- operator should do, so `fhir-cdc status` can say why a process stopped after it is gone.
-- Written once when a process stops on such an error; removed when the task runs again.
CREATE TABLE fhir_cdc.fatal_error (
    task    text PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    error   text NOT NULL,
    remedy  text
);
