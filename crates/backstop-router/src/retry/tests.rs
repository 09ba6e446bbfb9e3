use super::*;

fn err(kind: FailureKind, headers: &[(&str, &str)]) -> BackendError {
    let mut e = BackendError::new(kind, "x");
    e.headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    e
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        ..RetryPolicy::default()
    }
}

#[test]
fn server_errors_retry_with_jittered_backoff_until_the_budget_is_spent() {
    let p = policy();
    let e = err(FailureKind::ServerError, &[]);
    for attempt in 0..2 {
        match p.next(&e, attempt) {
            Next::Retry(wait) => assert!(wait <= Duration::from_millis(100 << attempt), "{wait:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(p.next(&e, 2), Next::MoveOn);
}

#[test]
fn the_upstreams_own_wait_is_honoured_or_the_request_moves_on() {
    let p = policy();
    let e = err(FailureKind::RateLimited, &[("retry-after-ms", "250")]);
    assert_eq!(p.next(&e, 0), Next::Retry(Duration::from_millis(250)));
    let e = err(FailureKind::RateLimited, &[("retry-after", "2")]);
    assert_eq!(p.next(&e, 0), Next::Retry(Duration::from_secs(2)));
    let e = err(FailureKind::RateLimited, &[("retry-after", "60")]);
    assert_eq!(p.next(&e, 0), Next::MoveOn, "too long to wait here");
    let e = err(FailureKind::RateLimited, &[]);
    assert_eq!(p.next(&e, 0), Next::MoveOn, "a bare 429 is not hammered");
    let e = err(FailureKind::ServerError, &[("x-should-retry", "false")]);
    assert_eq!(p.next(&e, 0), Next::MoveOn);
}

#[test]
fn deadlines_move_on_and_client_errors_stop() {
    let p = policy();
    assert_eq!(
        p.next(&err(FailureKind::FirstByteTimeout, &[]), 0),
        Next::MoveOn
    );
    assert_eq!(p.next(&err(FailureKind::ClientError, &[]), 0), Next::Stop);
    assert_eq!(p.next(&err(FailureKind::Auth, &[]), 0), Next::Stop);
    let mut e = err(FailureKind::ClientError, &[]);
    e.body = Some(serde_json::json!({"error": {"code": "context_length_exceeded"}}));
    assert_eq!(p.next(&e, 0), Next::MoveOn);
}

#[test]
fn backoff_is_capped() {
    let p = RetryPolicy {
        backoff_max: Duration::from_millis(300),
        ..policy()
    };
    for _ in 0..50 {
        assert!(p.backoff(10) <= Duration::from_millis(300));
    }
}
