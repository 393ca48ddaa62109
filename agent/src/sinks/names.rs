//! Names and bucket boundaries both exporters use (Prometheus and OTLP), in one place.

/// The GenAI `gen_ai.provider.name` of what is traced.
pub const PROVIDER: &str = "llama.cpp";

/// Decode and sampling latency buckets, seconds: resolve the sub-millisecond steps of small
/// models and reach the tens of seconds of large prompts on CPUs.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Tokens per decode step.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
/// OpenTelemetry GenAI `gen_ai.server.time_to_first_token` boundaries, seconds.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// OpenTelemetry GenAI `gen_ai.server.time_per_output_token` boundaries, seconds.
pub const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// OpenTelemetry GenAI `gen_ai.server.request.duration` boundaries, seconds.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// OpenTelemetry GenAI `gen_ai.client.token.usage` boundaries, tokens: 4^0 … 4^13.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// Model loads, seconds.
pub const LOAD_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_rise_and_follow_the_genai_conventions() {
        for b in [
            LATENCY_BUCKETS,
            BATCH_BUCKETS,
            TTFT_BUCKETS,
            TPOT_BUCKETS,
            REQUEST_BUCKETS,
            TOKEN_BUCKETS,
            LOAD_BUCKETS,
        ] {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        }
        // Request duration doubles from 10 ms to 81.92 s; token usage is powers of 4.
        assert!(REQUEST_BUCKETS.windows(2).all(|w| w[1] == 2.0 * w[0]));
        assert_eq!(TOKEN_BUCKETS.len(), 14);
        assert!(TOKEN_BUCKETS.windows(2).all(|w| w[1] == 4.0 * w[0]));
    }
}
