//! The bounds on what a client may hold of Backstop: time, connections,
//! requests and memory. Every bound has a default that suits real traffic
//! (a generation may stream for minutes; a conversation may be long) while
//! cutting off abuse (a client that sends nothing, trickles a body, or opens
//! connections without end).

use std::time::Duration;

/// Bounds on the client side of the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Time from a connection's first byte (or from its opening) to a
    /// request's complete headers.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may sit without a request.
    pub idle_timeout: Duration,
    /// Time to read a whole request body.
    pub body_read_timeout: Duration,
    /// Slowest average body rate, in bytes a second, after the first
    /// [`BODY_RATE_GRACE`] of a body.
    pub min_body_rate: u64,
    /// How long a response may wait on a client that reads none of it.
    pub send_timeout: Duration,
    /// Open client connections; past them a new one gets a fast 503.
    pub max_connections: usize,
    /// Whether `max_connections` was set in the config (else it is lowered
    /// to what the file-descriptor limit allows).
    pub max_connections_set: bool,
    /// Completion requests in flight; past them a fast 503.
    pub max_in_flight: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// JSON values (objects, arrays, strings, numbers, ...) in a body: what
    /// parsing amplifies is bounded by this, whatever the body's shape.
    pub max_json_values: usize,
    /// Messages in one request.
    pub max_messages: usize,
    /// What all requests in flight may hold of memory together, as
    /// [`request_memory`] estimates it; past it a fast 503.
    pub max_request_memory: usize,
    /// Bytes of request headers (names and values).
    pub max_header_bytes: usize,
}

/// The start of a body that may be slower than [`Limits::min_body_rate`].
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(5);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            min_body_rate: 4096,
            send_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_set: false,
            max_in_flight: 512,
            max_body_bytes: 4 << 20,
            max_json_values: 50_000,
            max_messages: 4096,
            max_request_memory: 256 << 20,
            max_header_bytes: 32 << 10,
        }
    }
}

/// File descriptors kept back from client connections: listeners, the
/// model file, logs, health checks.
const FD_RESERVE: u64 = 32;

impl Limits {
    /// Raises the soft file-descriptor limit to the hard one and, unless
    /// `max_connections` was configured, lowers it so that every client
    /// connection can hold one upstream connection too without running out.
    /// Returns the limit in effect.
    pub fn fit_descriptors(&mut self) -> Option<u64> {
        let nofile = rlimit::increase_nofile_limit(u64::MAX).ok()?;
        let room = (nofile.saturating_sub(FD_RESERVE) / 2).max(1) as usize;
        if self.max_connections > room {
            if self.max_connections_set {
                tracing::warn!(
                    "server.max_connections = {} but the file-descriptor limit is {nofile}: \
                     connections past {room} may run Backstop out of descriptors",
                    self.max_connections
                );
            } else {
                tracing::info!(
                    "at most {room} client connections: the file-descriptor limit is {nofile}"
                );
                self.max_connections = room;
            }
        }
        Some(nofile)
    }
}

/// Memory one parsed JSON value holds, at most, in a request (measured
/// with `bench-soak memory`: about 100 bytes for tiny content parts, the
/// costliest shape).
pub const VALUE_BYTES: usize = 128;

/// What parsing a body of `body` bytes holding `values` JSON values builds,
/// as charged against [`Limits::max_request_memory`] before it does: the
/// body's text again, and each value. (The body itself is charged as it
/// arrives.)
pub fn request_memory(body: usize, values: usize) -> usize {
    body.saturating_add(values.saturating_mul(VALUE_BYTES))
}

/// Counts the JSON values in `body` without parsing it: every object,
/// array, key and scalar. A body that is not JSON counts what it seems to hold;
/// the parser rejects it after.
pub fn json_values(body: &[u8]) -> usize {
    let mut count = 0;
    let mut in_string = false;
    let mut escaped = false;
    let mut in_scalar = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                in_scalar = false;
                count += 1;
            }
            b'{' | b'[' => {
                in_scalar = false;
                count += 1;
            }
            b',' | b':' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r' => in_scalar = false,
            _ if !in_scalar => {
                in_scalar = true;
                count += 1;
            }
            _ => {}
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_counts_every_value_once() {
        assert_eq!(json_values(br#"{}"#), 1);
        assert_eq!(
            json_values(br#"{"a": 1, "b": [true, null, "x,{["], "c": -1.5e3}"#),
            10
        );
        assert_eq!(json_values(br#""a\"b""#), 1);
        assert_eq!(json_values(b"[1,2,3]"), 4);
        let many = format!("[{}]", vec!["{}"; 1000].join(","));
        assert_eq!(json_values(many.as_bytes()), 1001);
    }
}
