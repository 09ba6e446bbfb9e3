//! Scoring one shadow call, and comparing its answer with the served one.

use std::time::Duration;

use backstop_adapter::{Backend, FailureKind, Request};
use futures_util::StreamExt;
use tokio::time::Instant;

/// How a shadow call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx event stream that parsed into the schema, ended with a finish
    /// reason, within both SLOs.
    Ok,
    /// The upstream answered 429.
    RateLimited,
    /// Any other failure: a status, a wrong content type, a malformed or
    /// broken stream, no finish reason.
    Failed,
    /// No first token within the first-token SLO.
    SlowFirstToken,
    /// The whole answer took longer than the total SLO.
    Slow,
}

impl Verdict {
    /// Stable name, for metrics and the status view.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::RateLimited => "rate_limited",
            Verdict::Failed => "failed",
            Verdict::SlowFirstToken => "slow_first_token",
            Verdict::Slow => "slow",
        }
    }
}

/// A scored shadow call and the text it produced.
#[derive(Debug, Clone)]
pub struct Scored {
    /// The verdict.
    pub verdict: Verdict,
    /// The answer's text (choice 0).
    pub text: String,
}

/// Sends `req` (already capped, streaming) to `backend` and scores it
/// against the SLOs. The call is abandoned once an SLO is missed.
pub async fn score(
    backend: &dyn Backend,
    req: &Request,
    first_token_slo: Duration,
    total_slo: Duration,
) -> Scored {
    let started = Instant::now();
    let failed = |verdict| Scored {
        verdict,
        text: String::new(),
    };
    let deadline = started + total_slo;
    let mut stream = match tokio::time::timeout_at(deadline, backend.stream(req)).await {
        Err(_) => return failed(Verdict::Slow),
        Ok(Err(e)) if e.kind == FailureKind::RateLimited => return failed(Verdict::RateLimited),
        Ok(Err(_)) => return failed(Verdict::Failed),
        Ok(Ok(reply)) => reply.body,
    };
    let mut text = String::new();
    let mut first = true;
    let mut finished = false;
    loop {
        let wait = if first {
            (started + first_token_slo).min(deadline)
        } else {
            deadline
        };
        let item = match tokio::time::timeout_at(wait, stream.next()).await {
            Err(_) if first => return failed(Verdict::SlowFirstToken),
            Err(_) => return failed(Verdict::Slow),
            Ok(item) => item,
        };
        match item {
            None => break,
            Some(Err(_)) => return failed(Verdict::Failed),
            Some(Ok(chunk)) => {
                first = false;
                for choice in chunk.choices.iter().filter(|c| c.index == 0) {
                    if let Some(t) = &choice.delta.content {
                        text.push_str(t);
                    }
                    finished |= choice.finish_reason.is_some();
                }
            }
        }
    }
    Scored {
        verdict: if finished {
            Verdict::Ok
        } else {
            Verdict::Failed
        },
        text,
    }
}

/// Cheap similarity of two answers: the ratio of their lengths (shorter
/// over longer, in characters) and the overlap of their lower-cased word
/// sets (Jaccard). Both are 1 for identical texts and 0 for disjoint ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    /// Shorter length over longer length.
    pub length_ratio: f64,
    /// Shared words over all words.
    pub token_overlap: f64,
}

impl Similarity {
    /// Compares two answers.
    pub fn of(a: &str, b: &str) -> Self {
        let (la, lb) = (a.chars().count(), b.chars().count());
        let length_ratio = if la.max(lb) == 0 {
            1.0
        } else {
            la.min(lb) as f64 / la.max(lb) as f64
        };
        let words = |s: &str| -> std::collections::HashSet<String> {
            s.split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(str::to_lowercase)
                .collect()
        };
        let (wa, wb) = (words(a), words(b));
        let union = wa.union(&wb).count();
        let token_overlap = if union == 0 {
            1.0
        } else {
            wa.intersection(&wb).count() as f64 / union as f64
        };
        Similarity {
            length_ratio,
            token_overlap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_is_one_for_equal_texts_and_falls_with_difference() {
        let same = Similarity::of("The cat sat.", "the cat sat");
        assert_eq!(same.token_overlap, 1.0);
        let half = Similarity::of("a b c d", "a b e f");
        assert!((half.token_overlap - 2.0 / 6.0).abs() < 1e-9);
        assert_eq!(Similarity::of("abcd", "ab").length_ratio, 0.5);
        let none = Similarity::of("alpha", "omega");
        assert_eq!(none.token_overlap, 0.0);
        assert_eq!(Similarity::of("", "").length_ratio, 1.0);
    }
}
