//! Accepting and holding client connections within [`Limits`]: a cap on
//! open connections (a fast 503 past it), a deadline for a request's
//! headers, an idle keep-alive deadline, a deadline for a client that stops
//! reading its response, and a shutdown that closes idle connections at
//! once and gives busy ones the grace period. Bodies are bounded where they
//! are read (see `api`).
//!
//! Each connection is watched through its socket ([`Watched`]) and its
//! requests ([`Busy`]): hyper serves it, and a small loop beside it closes
//! it when a deadline passes. The same watch rewrites hyper's own bare
//! protocol errors (a malformed request, headers too large) into
//! OpenAI-shaped ones.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_adapter::ErrorBody;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::respond::Body;
use crate::App;
use backstop_config::Limits;

/// Which listener a connection came in on: the admin endpoints are served
/// on the admin one (or with the admin token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The client listener.
    Client,
    /// The admin listener.
    Admin,
}

/// Connections the admin listener holds at once: operators, not traffic.
const ADMIN_CONNECTIONS: usize = 64;
/// Over-capacity connections answered at once; past these they are closed.
const REJECTING: usize = 64;
/// How often a connection's deadlines are looked at, at least.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Serves both listeners until `shutdown` resolves, then closes idle
/// connections, and gives the busy ones `grace` to finish.
pub async fn serve(
    client: TcpListener,
    admin: TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let limits = Arc::new(app.config.limits.clone());
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let client_slots = Arc::new(Semaphore::new(limits.max_connections));
    let admin_slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let rejecting = Arc::new(Semaphore::new(REJECTING));
    let builder = builder(&limits);
    let routes = crate::routes::router(app.clone());
    let mut accept_log = AcceptLog::default();
    tokio::pin!(shutdown);
    loop {
        let (accepted, surface, slots) = tokio::select! {
            a = client.accept() => (a, Surface::Client, &client_slots),
            a = admin.accept() => (a, Surface::Admin, &admin_slots),
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                accept_log.failed(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            app.metrics
                .rejected
                .with_label_values(&["connections"])
                .inc();
            if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                connections.spawn(reject(stream, permit));
            }
            continue;
        };
        let conn = Connection {
            app: app.clone(),
            routes: routes.clone(),
            limits: limits.clone(),
            surface,
            stopping: stopping.clone(),
            _slot: slot,
        };
        connections.spawn(conn.run(stream, builder.clone()));
    }
    drop((client, admin));
    let _ = stop.send(true);
    tracing::info!(
        "shutting down: waiting up to {} s for in-flight requests",
        grace.as_secs()
    );
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("grace period over: closing the remaining connections");
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Header count is bounded here; their size by `Limits::max_header_bytes`,
    // which `routes` answers with an OpenAI-shaped 431. HTTP/2 announces the
    // same size to its clients (hyper's own default is 16 KiB).
    builder.http1().max_headers(128);
    builder
        .http2()
        .max_concurrent_streams(256)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// One accepted connection and what bounds it.
struct Connection {
    app: Arc<App>,
    routes: axum::Router,
    limits: Arc<Limits>,
    surface: Surface,
    stopping: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(mut self, stream: TcpStream, builder: auto::Builder<TokioExecutor>) {
        let _open = Open::new(self.app.clone());
        let watch = Arc::new(Watch::new());
        let io = Watched {
            inner: stream,
            watch: watch.clone(),
            replacing: None,
        };
        let (routes, surface) = (self.routes.clone(), self.surface);
        let service = {
            let watch = watch.clone();
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let busy = Busy::new(watch.clone());
                req.extensions_mut().insert(surface);
                let routes = routes.clone();
                async move {
                    let resp = routes.oneshot(req).await?;
                    // The request is busy until its body is sent, or dropped.
                    Ok::<_, std::convert::Infallible>(
                        resp.map(|body| Guarded { body, _busy: busy }),
                    )
                }
            })
        };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut shutting = false;
        loop {
            let (due, _) = watch.due(&self.limits);
            let wake = due.min(Instant::now() + CHECK_EVERY);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("connection ended with an error: {e}");
                    }
                    return;
                }
                () = tokio::time::sleep_until(wake) => {
                    // What was due may have moved while asleep (a request came).
                    let (due, why) = watch.due(&self.limits);
                    if Instant::now() >= due {
                        tracing::debug!("closing a connection: {why}");
                        self.app.metrics.closed.with_label_values(&[why.label()]).inc();
                        return;
                    }
                }
                _ = self.stopping.changed(), if !shutting => {
                    shutting = true;
                    conn.as_mut().graceful_shutdown();
                    if watch.active() == 0 {
                        return; // nothing in flight: close now
                    }
                }
            }
        }
    }
}

/// Counts the connection open until dropped.
struct Open(Arc<App>);

impl Open {
    fn new(app: Arc<App>) -> Self {
        app.metrics.connections.inc();
        Open(app)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.connections.dec();
    }
}

/// Why a connection was closed by a deadline.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    /// Its request's headers did not come in time.
    Headers,
    /// A keep-alive connection sat idle.
    Idle,
    /// The client stopped reading its response.
    Send,
    /// Nothing is due.
    Never,
}

impl Expiry {
    fn label(self) -> &'static str {
        match self {
            Expiry::Headers => "header_timeout",
            Expiry::Idle => "idle_timeout",
            Expiry::Send => "send_timeout",
            Expiry::Never => "never",
        }
    }
}

impl std::fmt::Display for Expiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expiry::Headers => "its request headers did not come in time",
            Expiry::Idle => "it sat idle past the keep-alive timeout",
            Expiry::Send => "the client stopped reading its response",
            Expiry::Never => "nothing",
        })
    }
}

/// What a connection is doing, as its socket and its requests report it.
/// Times are milliseconds since it opened (`0` for "not set" where noted).
struct Watch {
    opened: Instant,
    /// Requests in flight (from the service call until the body is done).
    active: AtomicU32,
    /// Requests started.
    served: AtomicU64,
    /// When `active` last went to 0.
    idle_since: AtomicU64,
    /// One past when the first byte came while idle; 0 when none has.
    first_byte: AtomicU64,
    /// One past when a write began to wait on the client; 0 when none waits.
    blocked: AtomicU64,
    /// The connection speaks HTTP/2 (it opened with the preface). Its
    /// idle bytes are frames (window updates, pings, acks), not the start
    /// of a request, so its idle time runs on.
    h2: AtomicBool,
}

impl Watch {
    fn new() -> Self {
        Watch {
            opened: Instant::now(),
            active: AtomicU32::new(0),
            served: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
            h2: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    fn read(&self, data: &[u8]) {
        if self.served.load(Ordering::Relaxed) == 0 && data.starts_with(b"PRI * HTTP/2") {
            self.h2.store(true, Ordering::Relaxed);
        }
        if self.active() == 0
            && self.first_byte.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
        {
            self.first_byte.store(self.now() + 1, Ordering::Relaxed);
        }
    }

    fn write(&self, waiting: bool) {
        let blocked = self.blocked.load(Ordering::Relaxed);
        if waiting && blocked == 0 {
            self.blocked.store(self.now() + 1, Ordering::Relaxed);
        } else if !waiting && blocked != 0 {
            self.blocked.store(0, Ordering::Relaxed);
        }
    }

    /// When the connection is next due to close, and why.
    fn due(&self, limits: &Limits) -> (Instant, Expiry) {
        let at = |ms: u64, after: Duration| self.opened + Duration::from_millis(ms) + after;
        let mut due = (Instant::now() + Duration::from_secs(86_400), Expiry::Never);
        if self.active() == 0 {
            let first_byte = self.first_byte.load(Ordering::Relaxed);
            due = if first_byte != 0 {
                (
                    at(first_byte - 1, limits.header_read_timeout),
                    Expiry::Headers,
                )
            } else if self.served.load(Ordering::Relaxed) == 0 {
                (at(0, limits.header_read_timeout), Expiry::Headers)
            } else {
                let idle = self.idle_since.load(Ordering::Relaxed);
                (at(idle, limits.idle_timeout), Expiry::Idle)
            };
        }
        let blocked = self.blocked.load(Ordering::Relaxed);
        if blocked != 0 {
            let send = at(blocked - 1, limits.send_timeout);
            if send < due.0 {
                due = (send, Expiry::Send);
            }
        }
        due
    }
}

/// A response body that keeps its request [`Busy`] until it is dropped;
/// otherwise the body itself (its size hint too, so that a whole body keeps
/// its Content-Length).
struct Guarded {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A request in flight on a connection, until dropped.
struct Busy(Arc<Watch>);

impl Busy {
    fn new(watch: Arc<Watch>) -> Self {
        watch.active.fetch_add(1, Ordering::AcqRel);
        watch.served.fetch_add(1, Ordering::Relaxed);
        watch.first_byte.store(0, Ordering::Relaxed);
        Busy(watch)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let watch = &self.0;
        watch.idle_since.store(watch.now(), Ordering::Relaxed);
        watch.first_byte.store(0, Ordering::Relaxed);
        watch.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client socket that reports reads and stalled writes to its [`Watch`],
/// and puts an OpenAI-shaped body into hyper's own bare error responses.
struct Watched {
    inner: TcpStream,
    watch: Arc<Watch>,
    /// Our response in place of hyper's: bytes left to write, and the
    /// length of hyper's to report once they are written.
    replacing: Option<(Vec<u8>, usize)>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replacing.is_none() && self.watch.active() == 0 {
            if let Some(ours) = protocol_error(buf) {
                self.replacing = Some((ours, buf.len()));
            }
        }
        let this = &mut *self;
        if let Some((ours, theirs)) = &mut this.replacing {
            while !ours.is_empty() {
                match Pin::new(&mut this.inner).poll_write(cx, ours) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        ours.drain(..n);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        this.watch.write(true);
                        return Poll::Pending;
                    }
                }
            }
            let theirs = *theirs;
            this.replacing = None;
            this.watch.write(false);
            return Poll::Ready(Ok(theirs));
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch.write(polled.is_pending());
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Our OpenAI-shaped response in place of `buf`, when `buf` is one of
/// hyper's own bare error responses (written while no request is in
/// flight, with an empty body): a request that is not HTTP, or headers
/// past hyper's own limit.
fn protocol_error(buf: &[u8]) -> Option<Vec<u8>> {
    let head = buf.strip_prefix(b"HTTP/1.1 ")?;
    let status: u16 = std::str::from_utf8(head.get(..3)?).ok()?.parse().ok()?;
    let bare = buf.ends_with(b"\r\n\r\n")
        && buf
            .windows(19)
            .any(|w| w.eq_ignore_ascii_case(b"content-length: 0\r\n"));
    if !(400..600).contains(&status) || !bare {
        return None;
    }
    let message = match status {
        431 => "the request's headers are too large",
        408 => "the request did not arrive in time",
        505 => "this HTTP version is not supported",
        s if s >= 500 => "the server could not handle the request",
        _ => "the request is not valid HTTP",
    };
    Some(raw_error(status, message, None))
}

/// A whole HTTP/1.1 error response with an OpenAI error body, closing the
/// connection.
fn raw_error(status: u16, message: &str, retry_after: Option<u64>) -> Vec<u8> {
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = serde_json::to_vec(&ErrorBody::new(message, kind, None, None)).unwrap_or_default();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let retry = retry_after.map_or(String::new(), |s| format!("retry-after: {s}\r\n"));
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{retry}\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Answers a connection past `max_connections` with a 503 and closes it,
/// reading (and dropping) what the client sent so the close is clean.
async fn reject(mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let response = raw_error(
        503,
        "Backstop is at its connection limit; retry shortly",
        Some(1),
    );
    let answer = async {
        let mut scratch = [0u8; 4096];
        // What the request sent so far, so closing does not reset it.
        let _ = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut scratch)).await;
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        while stream.read(&mut scratch).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
}

/// Accept failures, logged at most once every [`AcceptLog::EVERY`] with a
/// count of those in between: at the file-descriptor limit they come
/// twenty times a second.
#[derive(Default)]
struct AcceptLog {
    last: Option<Instant>,
    quiet: u64,
}

impl AcceptLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn failed(&mut self, e: &io::Error) {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.quiet += 1;
            return;
        }
        let quiet = std::mem::take(&mut self.quiet);
        self.last = Some(Instant::now());
        if quiet > 0 {
            tracing::warn!("accept failed: {e} ({quiet} more failures since the last report)");
        } else {
            tracing::warn!("accept failed: {e}");
        }
    }
}
