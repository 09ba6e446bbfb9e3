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

#[tokio::test(start_paused = true)]
async fn a_shared_limit_reports_what_was_spent_and_takes_its_share() {
    let limit = RateLimit::new(Some(60), None);
    for _ in 0..10 {
        limit.acquire(0).unwrap();
    }
    limit.observe(&headers(&[("x-ratelimit-remaining-requests", "40")]), 200);
    let report = limit.report();
    assert_eq!(report.per_minute, [Some(60.0), None]);
    assert_eq!(report.spent, [10.0, 0.0]);
    assert_eq!(report.remaining, [Some(40.0), None]);
    assert_eq!(report.held_for, Duration::ZERO);
    // Reported once.
    assert_eq!(limit.report().spent, [0.0, 0.0]);
    // Three replicas share 30 left: this one may spend 10, refilled at a
    // third of the rate (20 a minute: one each 3 s).
    limit.share(Some(&Share {
        level: [Some(30.0), None],
        held_for: Duration::ZERO,
        replicas: 3,
    }));
    for _ in 0..10 {
        limit.acquire(0).unwrap();
    }
    assert_eq!(limit.acquire(0), Err(Duration::from_secs(3)));
    // Another replica heard a 429: the fleet waits.
    limit.share(Some(&Share {
        level: [Some(30.0), None],
        held_for: Duration::from_secs(5),
        replicas: 3,
    }));
    assert_eq!(limit.acquire(0), Err(Duration::from_secs(5)));
    // The fleet out of reach: a replica alone, at its whole rate.
    tokio::time::advance(Duration::from_secs(5)).await;
    limit.share(None);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(limit.acquire(0).is_ok());
}
