use super::*;

fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn go_durations() {
    assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
    assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
    assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
    assert_eq!(
        parse_go_duration("1h2m3.5s"),
        Some(Duration::from_secs_f64(3723.5))
    );
    assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
    assert_eq!(parse_go_duration(""), None);
    assert_eq!(parse_go_duration("5 minutes"), None);
}

#[tokio::test(start_paused = true)]
async fn buckets_refill_per_minute() {
    let limit = RateLimit::new(Some(60), Some(600));
    for _ in 0..60 {
        assert!(limit.acquire(10).is_ok());
    }
    assert_eq!(limit.acquire(1), Err(Duration::from_secs(1)));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(limit.acquire(1).is_ok());
    // Tokens run out before requests do.
    let limit = RateLimit::new(Some(600), Some(100));
    assert!(limit.acquire(80).is_ok());
    assert_eq!(limit.acquire(40), Err(Duration::from_secs(12)));
}

#[tokio::test(start_paused = true)]
async fn the_upstreams_headers_keep_the_buckets_in_step() {
    let limit = RateLimit::new(Some(100), None);
    limit.observe(&headers(&[("x-ratelimit-remaining-requests", "1")]), 200);
    assert!(limit.acquire(0).is_ok());
    assert!(limit.acquire(0).is_err(), "the upstream had one left");

    // No configured limit: the headers alone hold the target back until reset.
    let limit = RateLimit::new(None, None);
    limit.observe(
        &headers(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]),
        200,
    );
    assert_eq!(limit.acquire(0), Err(Duration::from_secs(360)));
    tokio::time::advance(Duration::from_secs(360)).await;
    assert!(limit.acquire(0).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_429_holds_the_target_back_for_its_retry_after() {
    let limit = RateLimit::new(None, None);
    limit.observe(&headers(&[("retry-after", "20")]), 429);
    assert_eq!(limit.acquire(0), Err(Duration::from_secs(20)));
    let limit = RateLimit::new(None, None);
    limit.observe(&headers(&[]), 429);
    assert_eq!(limit.acquire(0), Err(Duration::from_secs(1)));
}

#[tokio::test(start_paused = true)]
async fn tokens_charged_after_the_fact_hold_later_requests() {
    let limit = RateLimit::new(None, Some(600));
    assert!(limit.acquire(0).is_ok());
    // The answer cost more than the whole minute's budget.
    limit.charge(900);
    assert_eq!(limit.acquire(0), Err(Duration::from_secs(30)));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(limit.acquire(0).is_ok());
    // Without a token bucket, a charge changes nothing.
    let requests_only = RateLimit::new(Some(60), None);
    requests_only.charge(1_000_000);
    assert!(requests_only.acquire(0).is_ok());
}
