use std::time::Duration;

use tokio::time::advance;

use super::*;

fn config() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 3,
        failure_rate: 0.5,
        min_calls: 10,
        window: Duration::from_secs(10),
        open_for: Duration::from_secs(5),
        max_open_for: Duration::from_secs(30),
        jitter: 0.0,
        slow_call: None,
    }
}

const FAIL: Outcome = Outcome::Failure(FailureKind::ServerError);

fn fail(b: &CircuitBreaker, n: usize) {
    for _ in 0..n {
        assert!(b.admit());
        b.record(FAIL);
    }
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_open_it_and_a_lapsed_period_lets_one_probe_through() {
    let b = CircuitBreaker::new(config());
    fail(&b, 2);
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&b, 1);
    assert_eq!(b.state(), BreakerState::Open);
    assert!(!b.admit());
    advance(Duration::from_millis(4_900)).await;
    assert!(!b.admit(), "still open");
    advance(Duration::from_millis(200)).await;
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert!(b.admit(), "the probe");
    assert!(!b.admit(), "only one probe at a time");
    // A success after the lapsed open period closes it.
    b.record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::Closed);
    assert!(b.admit() && b.admit());
    assert_eq!(b.trips(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_it_for_longer_up_to_the_cap() {
    let b = CircuitBreaker::new(config());
    fail(&b, 3);
    let mut expected = 5;
    for _ in 0..5 {
        assert_eq!(b.open_remaining(), Duration::from_secs(expected));
        advance(Duration::from_secs(expected)).await;
        assert!(b.admit());
        b.record(FAIL);
        assert_eq!(b.state(), BreakerState::Open);
        expected = (expected * 2).min(30);
    }
    assert_eq!(b.open_remaining(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn the_failure_rate_over_the_window_opens_it() {
    let b = CircuitBreaker::new(config());
    // Alternating: never three in a row, but half of ten calls fail.
    for i in 0..9 {
        assert!(b.admit());
        b.record(if i % 2 == 0 { Outcome::Success } else { FAIL });
    }
    assert_eq!(b.state(), BreakerState::Closed, "below min_calls");
    assert!(b.admit());
    b.record(FAIL);
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn failures_older_than_the_window_do_not_count() {
    let b = CircuitBreaker::new(config());
    for i in 0..9 {
        assert!(b.admit());
        b.record(if i % 2 == 0 { Outcome::Success } else { FAIL });
    }
    advance(Duration::from_secs(11)).await;
    for _ in 0..8 {
        assert!(b.admit());
        b.record(Outcome::Success);
    }
    fail(&b, 2);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn client_auth_rate_limit_and_cancelled_failures_never_trip_it() {
    let b = CircuitBreaker::new(config());
    for kind in [
        FailureKind::ClientError,
        FailureKind::Auth,
        FailureKind::RateLimited,
        FailureKind::Cancelled,
        FailureKind::Overloaded,
    ] {
        for _ in 0..20 {
            assert!(b.admit());
            b.record(Outcome::Failure(kind));
        }
    }
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn operators_can_force_it_either_way() {
    let b = CircuitBreaker::new(config());
    b.force(Forced::Open);
    assert!(!b.admit());
    b.force(Forced::Closed);
    fail(&b, 10);
    assert!(b.admit(), "forced closed admits whatever happens");
    b.force(Forced::No);
    assert_eq!(b.state(), BreakerState::Closed);
    assert!(b.admit());
}

#[tokio::test(start_paused = true)]
async fn jitter_keeps_the_period_within_its_bounds() {
    let b = CircuitBreaker::new(BreakerConfig {
        jitter: 0.2,
        ..config()
    });
    fail(&b, 3);
    let open = b.open_remaining();
    assert!(
        open >= Duration::from_secs(4) && open <= Duration::from_secs(6),
        "{open:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn health_checks_take_a_target_out_and_bring_it_back_by_streaks() {
    let b = CircuitBreaker::new(config());
    b.record_probe(false, 2, 3);
    b.record_probe(false, 2, 3);
    assert!(b.healthy() && b.admit());
    b.record_probe(false, 2, 3);
    assert!(!b.healthy() && !b.admit(), "three failures in a row");
    b.record_probe(true, 2, 3);
    b.record_probe(false, 2, 3);
    b.record_probe(true, 2, 3);
    assert!(!b.healthy(), "successes must come in a row");
    b.record_probe(true, 2, 3);
    assert!(b.healthy() && b.admit());
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_verified_breaker_waits_for_its_verifier_then_ramps_traffic_back() {
    let b = CircuitBreaker::new(config());
    b.set_verified(true);
    fail(&b, 3);
    assert_eq!(b.open_since(), Some(Duration::ZERO));
    advance(Duration::from_secs(6)).await;
    // The open period lapsed, but no live probe: the verifier decides.
    assert_eq!(b.state(), BreakerState::Open);
    assert!(b.open_remaining().is_zero());
    assert!(!b.admit());
    assert_eq!(b.open_since(), Some(Duration::from_secs(6)));
    let kinds: Vec<_> = b.recent_failures().iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, [FailureKind::ServerError; 3]);

    b.recover(0.25);
    assert_eq!(b.state(), BreakerState::Recovering);
    assert_eq!(b.admitted_fraction(), 0.25);
    let admitted = (0..4000).filter(|_| b.admit()).count();
    assert!((800..1200).contains(&admitted), "{admitted} of 4000 at 25%");
    b.record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::Recovering);
    // A failure during the ramp opens it again, for twice as long.
    b.record(FAIL);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.open_remaining(), Duration::from_secs(10));
    assert_eq!(b.admitted_fraction(), 0.0);
    advance(Duration::from_secs(10)).await;
    b.recover(1.0);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!((b.trips(), b.admitted_fraction()), (0, 1.0));
    assert_eq!(b.open_since(), None);

    // An operator's restart opens it with its period already over.
    b.reopen_lapsed();
    assert_eq!(b.state(), BreakerState::Open);
    assert!(b.open_remaining().is_zero() && !b.admit());
}
