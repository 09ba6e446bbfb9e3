//! A scriptable, fault-injecting mock of the OpenAI API on `127.0.0.1:0`.
//!
//! Each request takes the next scripted [`MockReply`], or the default one when
//! the script is empty (an echo of the request, valid in every API shape).
//! Replies can delay, hang, send any status, headers, content type or bytes,
//! stream events with pauses, and cut the connection mid-stream. Every request
//! is recorded with its arrival time, so tests can count and space attempts.

mod echo;
pub mod postgres;
mod tls;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use echo::echo_text;

/// One step of a scripted event stream.
#[derive(Debug, Clone)]
pub enum SseStep {
    /// A `data:` event carrying this text.
    Data(String),
    /// Bytes written as they are (malformed events, odd line endings).
    Raw(Bytes),
    /// A pause before the next step.
    Sleep(Duration),
    /// Close the connection abruptly, mid-body.
    Cut,
}

impl SseStep {
    /// An event with this `event:` type and data.
    pub fn event(kind: &str, data: &str) -> Self {
        let mut out = format!("event: {kind}\n").into_bytes();
        backstop_adapter::sse::encode_data(data, &mut out);
        SseStep::Raw(Bytes::from(out))
    }

    /// A chat chunk carrying this piece of the answer.
    pub fn text(text: &str) -> Self {
        Self::chunk(serde_json::json!({"content": text}), None)
    }

    /// The chat chunk that ends an answer for this reason.
    pub fn finish(reason: &str) -> Self {
        Self::chunk(serde_json::json!({}), Some(reason))
    }

    fn chunk(delta: Value, finish: Option<&str>) -> Self {
        SseStep::Data(
            serde_json::json!({"id": "chatcmpl-up0", "object": "chat.completion.chunk",
                "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            .to_string(),
        )
    }
}

/// How the mock answers one request.
#[derive(Debug, Clone)]
pub enum MockReply {
    /// A valid answer derived from the request, in its API's shape, streamed
    /// when asked; after `delay` and with `chunk_delay` between stream events.
    Echo {
        /// Wait before the response headers.
        delay: Duration,
        /// Wait between stream events.
        chunk_delay: Duration,
    },
    /// A JSON body with this status and headers.
    Json {
        /// HTTP status.
        status: u16,
        /// The body.
        body: Value,
        /// Extra headers.
        headers: Vec<(String, String)>,
    },
    /// Any bytes under any content type (`None` sends no content type).
    Raw {
        /// HTTP status.
        status: u16,
        /// Content-Type header.
        content_type: Option<String>,
        /// The body.
        body: Bytes,
    },
    /// A `text/event-stream` made of these steps.
    Sse {
        /// HTTP status.
        status: u16,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// What to send, in order.
        steps: Vec<SseStep>,
    },
    /// Never answer: the headers never come.
    Hang,
    /// Close the connection without a response, as a reset before headers.
    Reset,
    /// Say nothing for this long, then close the connection without a
    /// response: a silent socket that gives up at last.
    CloseAfter(Duration),
}

impl MockReply {
    /// A 200 event stream of these steps.
    pub fn sse(steps: Vec<SseStep>) -> Self {
        MockReply::Sse {
            status: 200,
            headers: Vec::new(),
            steps,
        }
    }

    /// An echo without delays.
    pub fn echo() -> Self {
        MockReply::Echo {
            delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
        }
    }

    /// An OpenAI error body with this status, type and message.
    pub fn error(status: u16, kind: &str, message: &str) -> Self {
        MockReply::Json {
            status,
            body: serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
            headers: Vec::new(),
        }
    }
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// HTTP version the request came over.
    pub version: http::Version,
    /// Request headers.
    pub headers: HeaderMap,
    /// Parsed JSON body (`Null` when empty or not JSON).
    pub body: Value,
    /// When it arrived.
    pub at: tokio::time::Instant,
}

#[derive(Default)]
struct State {
    script: Mutex<VecDeque<MockReply>>,
    default: Mutex<Option<MockReply>>,
    requests: Mutex<Vec<Recorded>>,
}

/// The running mock server; stops when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    task: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<Self> {
        Self::bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?).await
    }

    /// Starts a mock on this address (benchmarks use a fixed port).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Self::listen(addr, None).await
    }

    /// Starts an HTTPS mock on `127.0.0.1:0` (HTTP/2 and HTTP/1.1 by ALPN),
    /// with a certificate from a fresh CA; returns the CA certificate as PEM.
    pub async fn start_tls() -> std::io::Result<(Self, String)> {
        let (config, ca_pem) = tls::server_config()?;
        let addr = "127.0.0.1:0".parse().map_err(std::io::Error::other)?;
        let mock = Self::listen(addr, Some(TlsAcceptor::from(config))).await?;
        Ok((mock, ca_pem))
    }

    async fn listen(addr: SocketAddr, tls: Option<TlsAcceptor>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(accept_loop(listener, state.clone(), tls));
        Ok(MockUpstream {
            addr,
            scheme,
            state,
            task,
        })
    }

    /// The base URL clients use, ending in `/v1`.
    pub fn url(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues replies for the next requests, in order.
    pub fn push(&self, replies: impl IntoIterator<Item = MockReply>) {
        lock(&self.state.script).extend(replies);
    }

    /// Sets the reply used when the script is empty (an echo by default).
    pub fn set_default(&self, reply: MockReply) {
        *lock(&self.state.default) = Some(reply);
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.requests).clone()
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, tls: Option<TlsAcceptor>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let builder = auto::Builder::new(TokioExecutor::new());
            let _ = match tls {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                    Err(_) => return,
                },
            };
        });
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An error from the service makes hyper close the connection unanswered.
async fn handle(
    req: hyper::Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let path = parts.uri.path().to_string();
    lock(&state.requests).push(Recorded {
        method: parts.method.clone(),
        path: path.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
        at: tokio::time::Instant::now(),
    });
    if parts.method == Method::GET && path.ends_with("/models") {
        return Ok(json_response(200, &echo::model_list(), &[]));
    }
    let reply = lock(&state.script)
        .pop_front()
        .or_else(|| lock(&state.default).clone())
        .unwrap_or_else(MockReply::echo);
    respond(reply, &path, &body).await
}

fn json_response(status: u16, body: &Value, headers: &[(String, String)]) -> Response<Body> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    add_headers(&mut resp, headers);
    resp
}

fn add_headers(resp: &mut Response<Body>, headers: &[(String, String)]) {
    for (k, v) in headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            resp.headers_mut().append(name, value);
        }
    }
}

async fn respond(
    reply: MockReply,
    path: &str,
    body: &Value,
) -> Result<Response<Body>, std::io::Error> {
    Ok(match reply {
        MockReply::Echo { delay, chunk_delay } => {
            // A zero sleep still waits for the timer's next 1 ms tick.
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let legacy = path.ends_with("/v1/completions");
            let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
            if path.ends_with("/v1/responses") {
                if !stream {
                    return Ok(json_response(200, &echo::response(body), &[]));
                }
                let mut steps = Vec::new();
                for (kind, data) in echo::response_events(body) {
                    if !chunk_delay.is_zero() && !steps.is_empty() {
                        steps.push(SseStep::Sleep(chunk_delay));
                    }
                    steps.push(SseStep::event(&kind, &data));
                }
                return Ok(sse_response(200, &[], steps));
            }
            if stream {
                let mut steps = Vec::new();
                for data in echo::stream(body, legacy) {
                    if !chunk_delay.is_zero() && !steps.is_empty() {
                        steps.push(SseStep::Sleep(chunk_delay));
                    }
                    steps.push(SseStep::Data(data));
                }
                sse_response(200, &[], steps)
            } else {
                json_response(200, &echo::completion(body, legacy), &[])
            }
        }
        MockReply::Json {
            status,
            body,
            headers,
        } => json_response(status, &body, &headers),
        MockReply::Raw {
            status,
            content_type,
            body,
        } => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            if let Some(ct) = content_type.and_then(|ct| http::HeaderValue::from_str(&ct).ok()) {
                resp.headers_mut().insert(http::header::CONTENT_TYPE, ct);
            }
            resp
        }
        MockReply::Sse {
            status,
            headers,
            steps,
        } => sse_response(status, &headers, steps),
        MockReply::Hang => std::future::pending().await,
        MockReply::CloseAfter(wait) => {
            tokio::time::sleep(wait).await;
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "closed by the mock after a silence",
            ));
        }
        MockReply::Reset => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset by the mock",
            ))
        }
    })
}

fn sse_response(status: u16, headers: &[(String, String)], steps: Vec<SseStep>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    tokio::spawn(async move {
        for step in steps {
            let frame = match step {
                SseStep::Data(data) => {
                    let mut out = Vec::with_capacity(data.len() + 8);
                    backstop_adapter::sse::encode_data(&data, &mut out);
                    Ok(Frame::data(Bytes::from(out)))
                }
                SseStep::Raw(bytes) => Ok(Frame::data(bytes)),
                SseStep::Sleep(d) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
                SseStep::Cut => {
                    // hyper drops unflushed bytes when a body errors: let what was
                    // sent reach the wire first, as on a real connection reset.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Err(std::io::Error::other("cut by the mock"))
                }
            };
            let cut = frame.is_err();
            if tx.send(frame).await.is_err() || cut {
                return;
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream(rx))));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    add_headers(&mut resp, headers);
    resp
}

/// The receiving end of a channel as a stream of body frames.
struct ReceiverStream(mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl futures_core::Stream for ReceiverStream {
    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
