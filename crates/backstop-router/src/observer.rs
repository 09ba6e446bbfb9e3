//! What the router reports as it works. The router defines the hook; the
//! server implements it with metrics, so no crate calls back up.

/// Events of the router's own work (attempts are reported by the caller,
/// which sees them in `Served::failed` and `RouteError`).
pub trait Observer: Send + Sync {
    /// A stream that broke mid-answer on `from` was continued by `to`.
    fn continued(&self, from: &str, to: &str);
    /// An active health probe of `target` ended.
    fn probe(&self, target: &str, ok: bool);
    /// The breaker of `target` moved to `state` (`closed`, `open`, `half_open`).
    fn transition(&self, target: &str, state: &'static str);
    /// A late first token on `from` was hedged to `to`.
    fn hedged(&self, from: &str, to: &str);
    /// The hedge `to` answered before `from` did, and served.
    fn hedge_won(&self, from: &str, to: &str);
}

/// Reports nothing.
pub struct Silent;

impl Observer for Silent {
    fn continued(&self, _from: &str, _to: &str) {}
    fn probe(&self, _target: &str, _ok: bool) {}
    fn transition(&self, _target: &str, _state: &'static str) {}
    fn hedged(&self, _from: &str, _to: &str) {}
    fn hedge_won(&self, _from: &str, _to: &str) {}
}
