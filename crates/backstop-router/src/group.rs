//! Target groups: a hop of a route that is a set of equivalent targets
//! (regional endpoints, or keys of one provider), balanced by a policy.
//!
//! A group's members sit side by side in the route's chain, in configured
//! order; each request walks them in the order its group's policy gives,
//! members of the client's region first. Breakers, health checks and retries
//! stay per member, so a member that fails is left for the next member, and
//! the walk leaves the group only when every member is out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::TargetState;

/// How a group picks the member a request tries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// At random, in proportion to each member's weight.
    Weighted,
    /// The lower recent time to first token (an EWMA) of two members drawn
    /// at random: the power of two choices.
    LeastLatency,
    /// The fewer requests in flight of two members drawn at random.
    LeastBusy,
}

impl Policy {
    /// The policy of this name in the config.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "weighted" => Policy::Weighted,
            "least_latency" => Policy::LeastLatency,
            "least_busy" => Policy::LeastBusy,
            _ => return None,
        })
    }
}

/// A member's place in its group.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Its share under [`Policy::Weighted`] (at least 1).
    pub weight: u32,
    /// Its region, matched against the client's hint.
    pub region: Option<String>,
}

/// A group in a route: hops `start..start + members.len()` of its chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Its name in the config.
    pub name: String,
    /// Where its members start in the route's chain.
    pub start: usize,
    /// Its members, in the chain's order.
    pub members: Vec<Member>,
    /// How it balances.
    pub policy: Policy,
}

/// A target's requests in flight (attempts waiting for an answer, and
/// streams being read), for [`Policy::LeastBusy`].
#[derive(Debug, Default)]
pub struct Busy(AtomicUsize);

impl Busy {
    /// How many now.
    pub fn now(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one until the guard is dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> BusyGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        BusyGuard(self.clone())
    }
}

/// One request in flight on a target, until dropped.
#[derive(Debug)]
pub(crate) struct BusyGuard(Arc<Busy>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the policy sees of one member: its index in the chain, its weight,
/// its state, and whether it can take a request now.
pub(crate) struct Candidate<'a> {
    pub index: usize,
    pub weight: u32,
    pub state: Option<&'a TargetState>,
    pub up: bool,
}

impl Candidate<'_> {
    /// Its recent time to first token in microseconds; 0 before any is
    /// known, so that a new member is tried.
    fn latency(&self) -> u64 {
        self.state.map_or(0, |s| s.first_tokens.ewma_micros())
    }

    fn busy(&self) -> usize {
        self.state.map_or(0, |s| s.busy.now())
    }
}

/// The order to try `candidates` in: those that can take a request before
/// those that cannot, then those of the client's region (`home`) before
/// the others, and within each, the policy's pick first.
pub(crate) fn order(policy: Policy, candidates: Vec<Candidate<'_>>, home: &[bool]) -> Vec<usize> {
    let mut tiers: [Vec<Candidate<'_>>; 4] = Default::default();
    for (candidate, home) in candidates.into_iter().zip(home) {
        let tier = usize::from(!candidate.up) * 2 + usize::from(!*home);
        tiers[tier].push(candidate);
    }
    tiers
        .into_iter()
        .flat_map(|tier| balance(policy, tier))
        .collect()
}

/// One tier in the policy's order.
fn balance(policy: Policy, mut tier: Vec<Candidate<'_>>) -> Vec<usize> {
    match policy {
        Policy::Weighted => {
            // Weighted sampling without replacement: each member's key is
            // u^(1/w), highest first (Efraimidis and Spirakis).
            let mut keyed: Vec<(f64, usize)> = tier
                .iter()
                .map(|c| {
                    let u: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
                    (u.powf(1.0 / f64::from(c.weight.max(1))), c.index)
                })
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            keyed.into_iter().map(|(_, i)| i).collect()
        }
        Policy::LeastLatency => two_choices(&mut tier, |c| c.latency() as f64),
        Policy::LeastBusy => two_choices(&mut tier, |c| c.busy() as f64),
    }
}

/// The better (lower `cost`) of two members drawn at random first, then
/// the rest from the lowest cost up.
fn two_choices(tier: &mut [Candidate<'_>], cost: impl Fn(&Candidate<'_>) -> f64) -> Vec<usize> {
    let n = tier.len();
    if n >= 2 {
        let a = rand::random_range(0..n);
        let b = (a + rand::random_range(1..n)) % n;
        let first = if cost(&tier[b]) < cost(&tier[a]) {
            b
        } else {
            a
        };
        tier.swap(0, first);
        tier[1..].sort_by(|x, y| cost(x).total_cmp(&cost(y)));
    }
    tier.iter().map(|c| c.index).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerConfig;
    use std::time::Duration;

    fn candidates<'a>(states: &'a [TargetState], up: &[bool]) -> Vec<Candidate<'a>> {
        states
            .iter()
            .enumerate()
            .map(|(index, s)| Candidate {
                index,
                weight: [3, 1, 1][index % 3],
                state: Some(s),
                up: up[index],
            })
            .collect()
    }

    fn states(n: usize) -> Vec<TargetState> {
        (0..n)
            .map(|_| TargetState::new(BreakerConfig::default()))
            .collect()
    }

    #[test]
    fn weights_share_the_first_pick_in_proportion() {
        let s = states(3);
        let mut first = [0usize; 3];
        for _ in 0..5000 {
            let picked = order(Policy::Weighted, candidates(&s, &[true; 3]), &[true; 3]);
            first[picked[0]] += 1;
        }
        // Weights 3, 1, 1: about 60%, 20%, 20% of 5,000.
        assert!((2700..3300).contains(&first[0]), "{first:?}");
        assert!((800..1200).contains(&first[1]), "{first:?}");
    }

    #[test]
    fn members_that_are_up_and_of_the_client_region_come_first() {
        let s = states(3);
        for policy in [Policy::Weighted, Policy::LeastLatency, Policy::LeastBusy] {
            for _ in 0..50 {
                // Member 2 is home; member 0 is home too, but down.
                let picked = order(
                    policy,
                    candidates(&s, &[false, true, true]),
                    &[true, false, true],
                );
                assert_eq!(picked, [2, 1, 0], "{policy:?}");
            }
        }
    }

    #[test]
    fn least_latency_and_least_busy_prefer_the_cheaper_of_two() {
        let s = states(3);
        for (i, ms) in [(0, 300), (1, 20), (2, 100)] {
            s[i].first_tokens.record(Duration::from_millis(ms));
        }
        let mut first = [0usize; 3];
        for _ in 0..3000 {
            let picked = order(Policy::LeastLatency, candidates(&s, &[true; 3]), &[true; 3]);
            first[picked[0]] += 1;
            assert_eq!(picked.len(), 3);
        }
        // The slowest is never the better of two; the fastest wins every
        // pair it is drawn in (two of three pairs).
        assert_eq!(first[0], 0, "{first:?}");
        assert!(first[1] > first[2] * 3 / 2, "{first:?}");

        let _held: Vec<BusyGuard> = (0..5).map(|_| s[1].busy.enter()).collect();
        let _one = s[2].busy.enter();
        let picked = order(Policy::LeastBusy, candidates(&s, &[true; 3]), &[true; 3]);
        assert_ne!(picked[0], 1);
        assert_eq!(picked[2], 1, "the busiest last");
    }
}
