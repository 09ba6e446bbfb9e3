use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn the_delay_is_a_high_percentile_of_recent_first_tokens_within_bounds() {
    let policy = RetryPolicy {
        hedge_min: ms(200),
        hedge_max: ms(5_000),
        ..RetryPolicy::default()
    };
    let times = FirstTokenTimes::default();
    assert_eq!(times.delay(&policy), ms(5_000), "nothing known yet");
    for n in 1..=10 {
        times.record(ms(n * 100));
    }
    assert_eq!(times.delay(&policy), ms(1_000));
    for _ in 0..SAMPLES {
        times.record(ms(10));
    }
    assert_eq!(
        times.delay(&policy),
        ms(200),
        "old times are forgotten; the floor holds"
    );
    times.record(ms(60_000));
    assert_eq!(times.quantile(1.0), Some(ms(60_000)));
    assert_eq!(times.delay(&policy), ms(200));
}
