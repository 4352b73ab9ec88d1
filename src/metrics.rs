//! Every metric the daemon exports, named and described in one place. Code records through
//! these constants, so a name cannot drift between the recorder and docs/operations.md.

/// Row operations read from the slot (every published table).
pub(crate) const ROWS: &str = "fhir_cdc_rows_total";
/// Rows that are not resources (bad JSON, unknown type): skipped with a log line.
pub(crate) const BAD_ROWS: &str = "fhir_cdc_bad_rows_total";
/// Topic criteria that could not be evaluated on a change.
pub(crate) const TRIGGER_ERRORS: &str = "fhir_cdc_trigger_errors_total";
/// Criteria that gave no decision, per topic (the topic's policy decided).
pub(crate) const CRITERIA_ERRORS: &str = "fhir_cdc_criteria_errors_total";
/// Events written to the queue.
pub(crate) const EVENTS_QUEUED: &str = "fhir_cdc_events_queued_total";
/// Store transactions skipped after a restart because they were queued before it.
pub(crate) const SKIPPED_TRANSACTIONS: &str = "fhir_cdc_skipped_transactions_total";
/// Chunks of large store transactions written into a queue transaction left open until
/// the store commit (a store transaction with more than `[queue] batch_events` events).
pub(crate) const CHUNKS: &str = "fhir_cdc_large_transaction_chunks_total";
/// Seconds one capture batch took to write (events + checkpoint in one transaction).
pub(crate) const BATCH_WRITE_SECONDS: &str = "fhir_cdc_batch_write_seconds";
/// The end LSN of the last queued store commit.
pub(crate) const CHECKPOINT_LSN: &str = "fhir_cdc_checkpoint_lsn";
/// Bytes of WAL the slot holds back (read at scrape time).
pub(crate) const SLOT_LAG_BYTES: &str = "fhir_cdc_slot_lag_bytes";
/// WAL bytes the slot keeps on disk (after its restart LSN).
pub(crate) const SLOT_RETAINED_BYTES: &str = "fhir_cdc_slot_retained_bytes";
/// Seconds the oldest store commit not yet queued has waited (0 when none waits).
pub(crate) const SLOT_LAG_SECONDS: &str = "fhir_cdc_slot_lag_seconds";
/// 1 while this process's capture streams the slot (0: starting, a standby, or stopped).
pub(crate) const CAPTURE_STREAMING: &str = "fhir_cdc_capture_streaming";
/// 1 when the slot's WAL is removed or about to be (`wal_status` lost or unreserved).
pub(crate) const SLOT_INVALID: &str = "fhir_cdc_slot_invalid";
/// Subscriptions by status (label `status`; read at scrape time).
pub(crate) const SUBSCRIPTIONS: &str = "fhir_cdc_subscriptions";
/// Times a supervised task (capture, LISTEN, send, housekeeping) reconnected after an error.
pub(crate) const RESTARTS: &str = "fhir_cdc_restarts_total";
/// Times capture reconnected after an error (kept for dashboards; also in `RESTARTS`).
pub(crate) const CAPTURE_RESTARTS: &str = "fhir_cdc_capture_restarts_total";
/// Events after the cursor of the topic's furthest-behind subscription (read at scrape time).
pub(crate) const QUEUE_DEPTH: &str = "fhir_cdc_queue_depth";
/// Event notifications delivered, per topic.
pub(crate) const NOTIFICATIONS_SENT: &str = "fhir_cdc_notifications_sent_total";
/// Re-publishes a JetStream stream dropped as duplicates (label `destination`): the
/// message-id de-duplication at work after a crash or a lost acknowledgement.
pub(crate) const BROKER_DUPLICATES: &str = "fhir_cdc_broker_duplicates_total";
/// Failed sends, per topic.
pub(crate) const DELIVERY_FAILURES: &str = "fhir_cdc_delivery_failures_total";
/// Dead letters of a topic's subscriptions (label `topic`).
pub(crate) const DEAD_LETTERS: &str = "fhir_cdc_dead_letters";
/// Websocket subscriptions bound in this process.
pub(crate) const WEBSOCKET_BOUND: &str = "fhir_cdc_websocket_bound_subscriptions";
/// Seconds from the store commit to the notification being delivered.
pub(crate) const END_TO_END_SECONDS: &str = "fhir_cdc_end_to_end_seconds";
/// Delivered marks written per queue statement (send tasks' marks are grouped).
pub(crate) const DELIVERED_MARKS_PER_WRITE: &str = "fhir_cdc_delivered_marks_per_write";

/// Registers the descriptions with the installed recorder (shown as `# HELP`).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(ROWS, "Row operations read from the replication slot");
    describe_counter!(BAD_ROWS, "Rows skipped because they are not FHIR resources");
    describe_counter!(TRIGGER_ERRORS, "Topic criteria that could not be evaluated");
    describe_counter!(
        CRITERIA_ERRORS,
        "Topic criteria that gave no decision, per topic"
    );
    describe_counter!(EVENTS_QUEUED, "Events written to the queue");
    describe_counter!(
        CHUNKS,
        "Chunks of large store transactions written before their commit"
    );
    describe_counter!(
        SKIPPED_TRANSACTIONS,
        "Store transactions already queued before a restart"
    );
    describe_histogram!(
        BATCH_WRITE_SECONDS,
        Unit::Seconds,
        "Capture batch write time"
    );
    describe_gauge!(
        DEAD_LETTERS,
        "Events of a topic's subscriptions that could not be delivered (fhir-cdc dead-letters)"
    );
    describe_gauge!(
        WEBSOCKET_BOUND,
        "Websocket subscriptions with a socket bound to this process"
    );
    describe_gauge!(CHECKPOINT_LSN, "End LSN of the last queued store commit");
    describe_gauge!(SLOT_LAG_BYTES, Unit::Bytes, "WAL bytes the slot holds back");
    describe_gauge!(
        SLOT_RETAINED_BYTES,
        Unit::Bytes,
        "WAL bytes the slot keeps on disk"
    );
    describe_gauge!(
        SLOT_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest store commit not yet queued"
    );
    describe_gauge!(
        CAPTURE_STREAMING,
        "1 while this process's capture streams the slot"
    );
    describe_gauge!(
        SLOT_INVALID,
        "1 when the slot's WAL is lost or about to be removed"
    );
    describe_gauge!(SUBSCRIPTIONS, "Subscriptions by status");
    describe_counter!(RESTARTS, "Reconnects of supervised tasks after an error");
    describe_counter!(CAPTURE_RESTARTS, "Capture reconnects after an error");
    describe_gauge!(
        QUEUE_DEPTH,
        "Events after the cursor of the topic's furthest-behind subscription"
    );
    describe_counter!(NOTIFICATIONS_SENT, "Event notifications delivered");
    describe_counter!(DELIVERY_FAILURES, "Failed notification sends");
    describe_counter!(
        BROKER_DUPLICATES,
        "Re-published notifications a JetStream stream dropped as duplicates (by message id)"
    );
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Store commit to delivery"
    );
    describe_histogram!(
        DELIVERED_MARKS_PER_WRITE,
        "Delivered notifications' events marked per queue statement"
    );
}
