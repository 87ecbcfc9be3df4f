//! The cases, one module per concern, and `all_cases!`, the list every target runs.
//!
//! A case takes a fresh, initialized backend and panics on a breach of the contract.

use std::fmt::Debug;
use std::time::Duration;

use aiecs_storage::{Message, Metadata, Result, StorageError};
use serde_json::{json, Value};

pub mod checkpoints;
pub mod concurrency;
pub mod conversation;
pub mod lifecycle;
pub mod round_trip;
pub mod sessions;
pub mod task_context;
pub mod validation;

/// The backend's own report: a layer reports itself with the reports of what it wraps
/// nested, the first of them being the path to the backend.
pub fn leaf<T>(report: &T, inner: fn(&T) -> Option<&T>) -> &T {
    let mut r = report;
    while let Some(next) = inner(r) {
        r = next;
    }
    r
}

/// Calls `$m!($args; module::case, ...)` with every case. `target!` passes
/// `case_tests!(name)` so each target gets the same tests.
macro_rules! all_cases {
    ($m:ident ! ($($args:tt)*)) => {
        $m! {
            $($args)*;
            sessions::get_missing_session_is_none,
            sessions::create_returns_active_session,
            sessions::create_then_get_round_trips,
            sessions::create_on_existing_id_is_upsert,
            sessions::update_merges_metadata_and_sets_status,
            sessions::update_missing_session_is_false,
            sessions::counters_add_up,
            sessions::counters_saturate_instead_of_overflowing,
            sessions::end_session_sets_status,
            sessions::end_missing_session_is_false,
            sessions::batch_create_then_batch_get_keeps_order,
            sessions::batch_create_upserts_existing,
            sessions::list_sessions_pages_in_id_order,
            sessions::list_sessions_filters_by_user_and_status,
            sessions::restore_sessions_writes_every_field_exactly,
            sessions::delete_session_removes_it_with_messages_and_context,

            conversation::history_is_newest_limit_oldest_first,
            conversation::add_to_missing_session_is_not_found,
            conversation::message_id_dedupes_retries,
            conversation::message_ids_are_scoped_to_their_session,
            conversation::generated_ids_are_distinct,
            conversation::history_of_missing_session_is_empty,
            conversation::message_fields_round_trip,
            conversation::add_message_moves_session_updated_at,
            conversation::batch_add_gives_per_item_results,
            conversation::history_is_per_session,
            conversation::range_pages_through_the_whole_history_in_order,
            conversation::restore_messages_keeps_ids_timestamps_and_order_once,

            checkpoints::latest_checkpoint_is_last_stored,
            checkpoints::get_checkpoint_by_id,
            checkpoints::get_missing_checkpoint_is_none,
            checkpoints::restoring_old_id_updates_without_becoming_latest,
            checkpoints::list_is_newest_first_with_limit,
            checkpoints::list_before_is_exclusive,
            checkpoints::list_filters_by_metadata,
            checkpoints::namespaces_are_kept_apart,
            checkpoints::parent_id_round_trips,
            checkpoints::pending_writes_keep_order_and_are_idempotent,
            checkpoints::pending_writes_are_per_checkpoint_and_namespace,
            checkpoints::batch_put_writes_matches_sequential_puts,
            checkpoints::list_threads_pages_every_thread_once_in_order,
            checkpoints::list_checkpoint_namespaces_names_each_once,
            checkpoints::list_write_checkpoints_names_checkpoints_with_writes_stored_or_not,
            checkpoints::restore_checkpoints_keeps_store_order_and_created_at,
            checkpoints::delete_thread_removes_everything_of_that_thread,

            task_context::task_context_round_trips_nested_json,
            task_context::task_context_replace_overwrites,
            task_context::task_context_missing_is_none,
            task_context::task_context_is_per_session,
            task_context::task_context_typed_helpers_round_trip,
            task_context::list_task_contexts_pages_every_context,

            lifecycle::initialize_twice_is_ok,
            lifecycle::calls_after_close_fail_with_closed,
            lifecycle::close_twice_is_ok,
            lifecycle::store_id_names_the_store_steadily,
            lifecycle::health_check_reports_healthy,
            lifecycle::metrics_count_records,
            lifecycle::cleanup_removes_only_idle_sessions,

            round_trip::unicode_round_trips,
            round_trip::megabyte_content_round_trips,
            round_trip::deep_metadata_round_trips,
            round_trip::special_character_ids_round_trip,
            round_trip::composed_keys_do_not_collide,

            validation::empty_session_id_is_rejected,
            validation::over_long_session_id_is_rejected,
            validation::nul_in_session_id_is_rejected,
            validation::history_limit_zero_is_rejected,
            validation::history_limit_over_max_is_rejected,
            validation::oversized_content_is_rejected,
            validation::oversized_metadata_is_rejected,
            validation::too_deep_metadata_is_rejected,
            validation::bad_processing_time_is_rejected,
            validation::empty_thread_id_is_rejected,
            validation::empty_checkpoint_id_is_rejected,
            validation::list_checkpoints_limit_zero_is_rejected,
            validation::control_char_in_role_is_rejected,
            validation::empty_task_id_is_rejected,
            validation::batch_create_with_invalid_item_stores_nothing,
            validation::batch_add_with_invalid_item_is_answered_per_item,
            validation::batch_get_with_invalid_id_is_rejected,

            concurrency::concurrent_updates_lose_no_increment,
            concurrency::concurrent_appends_keep_every_message,
            concurrency::concurrent_checkpoints_keep_store_order,
            concurrency::cleanup_spares_sessions_recreated_while_it_runs,
        }
    };
}

/// A JSON object literal as [`Metadata`].
pub fn md(v: Value) -> Metadata {
    match v {
        Value::Object(m) => m,
        other => panic!("metadata must be a JSON object, got {other}"),
    }
}

/// Metadata nested `depth` levels deep, counting the metadata object itself as one, as
/// [`aiecs_storage::validate::MAX_JSON_DEPTH`] does.
pub fn nested_metadata(depth: usize) -> Metadata {
    assert!(depth >= 1);
    let mut v = json!("leaf");
    for level in (2..=depth).rev() {
        v = json!({ "level": level, "next": v });
    }
    md(json!({ "root": v }))
}

/// Panics unless `r` is `InvalidInput` for exactly `field`.
#[track_caller]
pub fn assert_invalid<T: Debug>(r: Result<T>, field: &str) {
    match r {
        Err(StorageError::InvalidInput { field: got, .. }) if got == field => {}
        other => panic!("expected InvalidInput for `{field}`, got {other:?}"),
    }
}

pub fn contents(history: &[Message]) -> Vec<String> {
    history.iter().map(|m| m.content.clone()).collect()
}

pub fn message_ids(history: &[Message]) -> Vec<String> {
    history.iter().map(|m| m.message_id.clone()).collect()
}

/// Long enough that two timestamps taken on either side differ at microsecond
/// precision, so "`updated_at` moved" can be checked strictly.
pub async fn pause() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}
