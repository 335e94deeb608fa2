//! Names of the metrics the engine records, for the server's catalogue to
//! reference instead of repeating the strings.

pub const TIME_TO_FIRST_TOKEN: &str = "genai_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "genai_inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY: &str = "genai_e2e_request_latency_seconds";
pub const REQUEST_QUEUE_TIME: &str = "genai_request_queue_time_seconds";
pub const PREFILL_STEP: &str = "genai_prefill_step_seconds";
pub const DECODE_STEP: &str = "genai_decode_step_seconds";
pub const BATCH_SIZE: &str = "genai_batch_size";
pub const ITERATION_TOKENS: &str = "genai_iteration_tokens";
pub const PROMPT_TOKENS: &str = "genai_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "genai_generation_tokens_total";
pub const PREFIX_CACHE_QUERIES: &str = "genai_prefix_cache_queries_total";
pub const PREFIX_CACHE_HITS: &str = "genai_prefix_cache_hits_total";
pub const PREEMPTIONS: &str = "genai_preemptions_total";
/// Label `reason`: `invalid`, `queue_full`, `shutting_down`, `engine_stopped`.
pub const REQUESTS_REJECTED: &str = "genai_requests_rejected_total";
pub const REQUESTS_RUNNING: &str = "genai_num_requests_running";
pub const REQUESTS_WAITING: &str = "genai_num_requests_waiting";
pub const KV_BLOCKS_USED: &str = "genai_kv_cache_blocks_used";
pub const KV_BLOCKS_FREE: &str = "genai_kv_cache_blocks_free";
pub const KV_USAGE_RATIO: &str = "genai_kv_cache_usage_ratio";
pub const KV_LIVE_TOKENS: &str = "genai_kv_cache_live_tokens";
pub const KV_WASTE_RATIO: &str = "genai_kv_cache_waste_ratio";
/// Panics caught on the engine thread (in the model's forward pass or
/// anywhere else in a step).
pub const ENGINE_PANICS: &str = "genai_engine_panics_total";
/// 1 while the engine thread serves, 0 once it has stopped or given up.
pub const ENGINE_UP: &str = "genai_engine_up";
