//! The cases, one module per clause of the delivery contract (C1–C14), each
//! named after the clause it proves, and the telemetry cases (`otel`). Each case is an `async fn(Ctx) -> CaseResult`
//! and takes a fresh [`Ctx`](super::Ctx).
//!
//! The list below is the only list of the cases: it makes the tests of
//! [`conformance_suite!`](crate::conformance_suite) (one `#[tokio::test]` per case)
//! and the registry [`CASES`]. Adding a case is writing its function in the
//! module of its clause and naming it in the list:
//!
//! ```text
//! c2_groups {
//!     ...
//!     c2_groups_settle_independently,
//!     c2_my_new_case,            // pub async fn c2_my_new_case(ctx: Ctx) -> CaseResult
//! }
//! ```

pub mod c10_shutdown;
pub mod c11_reconnect;
pub mod c12_bad_input;
pub mod c13_metadata;
pub mod c14_scheduled;
pub mod c1_topics;
pub mod c2_groups;
pub mod c3_readiness;
pub mod c4_publish;
pub mod c5_order;
pub mod c6_prefetch;
pub mod c7_settlement;
pub mod c8_poison;
pub mod c9_crashes;
pub mod dlq;
pub mod otel;
mod support;

/// The list of the cases, by module: `$crate::__conformance_case_list!([mode])`
/// hands it to [`__conformance_expand!`](crate::__conformance_expand) with `mode`.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_case_list {
    ([$($mode:tt)*]) => {
        $crate::__conformance_expand! { [$($mode)*]
            c1_topics {
                c1_invalid_topic_is_rejected_before_io,
                c1_invalid_pattern_is_rejected_before_io,
                c1_library_namespace_is_reserved,
                c1_star_matches_exactly_one_word,
                c1_hash_matches_zero_or_more_words,
                c1_literal_pattern_matches_only_itself,
                c1_message_matching_two_patterns_is_delivered_once,
            }
            c2_groups {
                c2_every_matching_group_gets_a_copy,
                c2_members_of_a_group_share_its_messages,
                c2_a_member_at_its_prefetch_leaves_messages_to_others,
                c2_private_subscriptions_each_get_a_copy,
                c2_durable_group_keeps_messages_while_no_member_is_connected,
                c2_groups_settle_independently,
            }
            c3_readiness {
                c3_message_published_right_after_subscribe_is_delivered,
                c3_new_group_starts_at_now,
                c3_replay_from_earliest,
                c3_replay_without_capability_is_unsupported,
                c3_a_started_consumer_handles_a_message_published_at_once,
            }
            c4_publish {
                c4_publish_ok_survives_the_publishers_disconnect,
                c4_publish_on_closed_bus_fails_and_returns_the_message,
                c4_batch_publish_gives_one_result_per_message_in_order,
                c4_request_reply_round_trips_and_times_out,
                c4_full_group_rejects_publish_and_hands_the_message_back,
                c4_full_group_holds_the_publisher_until_there_is_room,
                c4_bound_without_capability_is_unsupported,
            }
            c5_order {
                c5_same_key_arrives_in_order,
                c5_order_holds_for_each_of_several_keys,
                c5_runtime_lanes_keep_each_key_in_order,
            }
            c6_prefetch {
                c6_never_more_than_prefetch_unsettled,
                c6_any_settlement_frees_a_slot,
                c6_next_batch_gathers_up_to_max_within_the_prefetch,
            }
            c7_settlement {
                c7_ack_is_final,
                c7_nack_redelivers_with_attempt_plus_one,
                c7_nack_waits_for_the_retry_delay,
                c7_dead_letter_moves_to_the_dead_letter_topic_with_headers,
                c7_dropping_a_delivery_counts_as_nack,
                c7_private_subscription_dead_letters_are_kept,
                c7_dead_letter_of_a_dead_letter_keeps_the_original_topic,
            }
            c8_poison {
                c8_dead_lettered_after_max_attempts,
                c8_the_last_error_is_kept_in_its_own_header,
                c8_backoff_grows_between_attempts,
                c8_crash_loop_reaches_the_dead_letter_topic,
                c8_runtime_story_panic_retry_success,
            }
            c9_crashes {
                c9_unsettled_delivery_of_a_dead_consumer_is_redelivered,
                c9_out_of_order_ack_skips_nothing,
            }
            c10_shutdown {
                c10_close_waits_for_in_flight_settlement,
                c10_close_returns_unsettled_after_grace,
                c10_close_returns_prefetched_but_unseen_messages,
                c10_runtime_shutdown_finishes_in_flight_work_within_the_grace,
            }
            c11_reconnect {}
            c12_bad_input {
                c12_oversize_payload_is_rejected_before_sending,
                c12_invalid_metadata_is_rejected_before_sending,
                c12_invalid_subscription_options_are_rejected,
                c12_undecodable_payload_is_a_decode_error_and_dead_letters,
                c12_rejected_publish_loses_nothing,
                c12_unreachable_broker_fails_fast,
                c12_runtime_dead_letters_undecodable_and_permanent_and_retries_timeouts,
            }
            c13_metadata {
                c13_metadata_round_trips,
                c13_library_headers_are_stripped_on_publish,
                c13_metadata_survives_redelivery,
            }
            c14_scheduled {
                c14_scheduled_message_waits_for_its_time,
                c14_every_matching_group_gets_it_no_earlier,
                c14_a_time_in_the_past_delivers_at_once,
                c14_beyond_the_maximum_is_refused_and_handed_back,
                c14_scheduled_message_survives_its_consumers_crash,
            }
            dlq {
                dlq_list_shows_dead_letters_without_settling_them,
                dlq_redrive_sends_dead_letters_back_with_attempts_reset,
                dlq_redrive_takes_what_the_filter_selects_up_to_the_limit,
                dlq_purge_drops_what_it_takes,
                dlq_interrupted_redrive_loses_nothing,
                dlq_invalid_group_is_refused_and_an_unknown_one_is_empty,
            }
            otel {
                otel_send_process_ack_are_one_trace,
                otel_a_batch_is_one_send_span_and_its_deliveries_link_to_it,
                otel_a_redelivery_keeps_the_creation_context,
                otel_a_dead_letter_carries_the_creation_context,
                otel_a_failed_settlement_has_its_error_type,
                otel_metrics_count_each_message_once,
                otel_group_depth_follows_what_waits,
            }
        }
    };
}

/// One case of the suite, as [`CASES`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// The module of its clause, such as `c2_groups`.
    pub module: &'static str,
    /// Its name, as the test is named after the backend: `<backend>::<name>`.
    pub name: &'static str,
}

crate::__conformance_case_list!([registry]);

#[cfg(test)]
mod tests {
    use super::CASES;

    #[test]
    fn every_case_is_listed_once_under_its_clause() {
        let mut names: Vec<_> = CASES.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CASES.len(), "a case is listed twice");
        for case in CASES {
            let clause = case.module.split('_').next().unwrap();
            assert!(
                case.name.starts_with(&format!("{clause}_")),
                "{} is listed under {}",
                case.name,
                case.module
            );
        }
    }
}
