//! The completion endpoints: chat, legacy completions and Responses. Each
//! request is held to Backstop's bounds (its place in flight, its body's
//! size, time and rate, its share of request memory), parsed in its
//! dialect, routed, and answered whole or as a stream in the client's
//! dialect.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as RequestBody;
use axum::extract::{Request as HttpRequest, State};
use axum::response::IntoResponse;
use backstop_adapter::{
    BackendError, ChatChunk, ChunkStream, FailureKind, Headers, Request, Writer,
};
use backstop_router::{RouteError, Serving};
use backstop_store::{Inserted, Kind, Record, Status};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::time::Instant;

use crate::auth::Caller;
use crate::error::{Rejection, ServerError};
use crate::generations::{unix_now, Generations};
use crate::metrics::{status_class, Metrics};
use crate::respond::{self, Body, Served};
use crate::App;
use backstop_config::limits::BODY_RATE_GRACE;

/// Which completion API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Legacy,
    Responses,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Legacy => "completions",
            Endpoint::Responses => "responses",
        }
    }
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(State(app): State<Arc<App>>, req: HttpRequest) -> Response<Body> {
    completion(req, app, Endpoint::Chat).await
}

/// `POST /v1/completions`.
pub(crate) async fn legacy(State(app): State<Arc<App>>, req: HttpRequest) -> Response<Body> {
    completion(req, app, Endpoint::Legacy).await
}

/// `POST /v1/responses`.
pub(crate) async fn responses(State(app): State<Arc<App>>, req: HttpRequest) -> Response<Body> {
    completion(req, app, Endpoint::Responses).await
}

/// Counts the request in flight until dropped, and its duration then; holds
/// its place among `max_in_flight` and its share of `max_request_memory`.
pub(crate) struct InFlight {
    app: Arc<App>,
    started: Instant,
    endpoint: Endpoint,
    stream: bool,
    /// Its place among `max_in_flight` (none for a background job, which
    /// is bounded by the job runner instead).
    _place: Option<tokio::sync::OwnedSemaphorePermit>,
    memory: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Who asked, when authentication is on: its tokens are counted.
    pub(crate) caller: Option<Caller>,
}

impl InFlight {
    /// The request's place in flight, or none when `max_in_flight` are.
    fn new(app: Arc<App>, endpoint: Endpoint, caller: Option<Caller>) -> Option<Self> {
        let place = app.in_flight.clone().try_acquire_owned().ok()?;
        app.metrics.in_flight.inc();
        Some(InFlight {
            app,
            started: Instant::now(),
            endpoint,
            stream: false,
            _place: Some(place),
            memory: None,
            caller,
        })
    }

    /// A background job's generation, counted like a request but holding
    /// no place among `max_in_flight`.
    pub(crate) fn detached(app: Arc<App>, caller: Option<Caller>) -> Self {
        app.metrics.in_flight.inc();
        InFlight {
            app,
            started: Instant::now(),
            endpoint: Endpoint::Responses,
            stream: true,
            _place: None,
            memory: None,
            caller,
        }
    }

    /// Charges `bytes` more to the request's share of `max_request_memory`;
    /// past it, the 503 to answer.
    fn hold(&mut self, bytes: usize) -> Result<(), Rejection> {
        let more = u32::try_from(bytes).ok().and_then(|n| {
            self.app
                .request_memory
                .clone()
                .try_acquire_many_owned(n)
                .ok()
        });
        match (more, &mut self.memory) {
            (Some(more), Some(held)) => held.merge(more),
            (Some(more), held) => *held = Some(more),
            (None, _) => {
                return Err(Rejection {
                    status: 503,
                    reason: "request_memory",
                    message: format!(
                        "Backstop holds its limit of {} bytes of requests; retry shortly",
                        self.app.config.limits.max_request_memory
                    ),
                })
            }
        }
        Ok(())
    }

    fn metrics(&self) -> &Metrics {
        &self.app.metrics
    }

    /// Counts a backend's usage report, for its target and the caller,
    /// whose rate limit it is charged to.
    fn count_usage(&self, target: &str, usage: &backstop_adapter::Usage) {
        let identity = self.caller.as_ref().map(Caller::name);
        self.metrics().count_usage(target, identity, usage);
        if let Some(caller) = &self.caller {
            caller.charge(usage.prompt_tokens + usage.completion_tokens);
        }
    }

    pub(crate) fn record(&self, target: &str, status: u16) {
        self.metrics()
            .requests
            .with_label_values(&[self.endpoint.label(), target, status_class(status)])
            .inc();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics().in_flight.dec();
        self.metrics()
            .duration
            .with_label_values(&[
                self.endpoint.label(),
                if self.stream { "true" } else { "false" },
            ])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

async fn completion(req: HttpRequest, app: Arc<App>, endpoint: Endpoint) -> Response<Body> {
    let caller = req.extensions().get::<Caller>().cloned();
    let Some(mut flight) = InFlight::new(app.clone(), endpoint, caller) else {
        app.metrics.rejected.with_label_values(&["in_flight"]).inc();
        return ServerError::from(Rejection {
            status: 503,
            reason: "in_flight",
            message: format!(
                "Backstop is serving its limit of {} requests; retry shortly",
                app.config.limits.max_in_flight
            ),
        })
        .into_response();
    };
    let trailers = accepts_trailers(&req);
    let resume = Resume::from_headers(req.headers());
    let region = req
        .headers()
        .get(REGION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .or_else(|| app.snapshot().config.region.clone());
    let budget = match client_budget(req.headers()) {
        Ok(budget) => budget,
        Err(message) => {
            flight.record(respond::NO_BACKEND, 400);
            return ServerError::invalid(message).into_response();
        }
    };
    let bytes = match read_body(req.into_body(), &mut flight).await {
        Ok(bytes) => bytes,
        Err(rejection) => return flight.reject(rejection),
    };
    let limits = &app.config.limits;
    let values = backstop_config::limits::json_values(&bytes);
    if values > limits.max_json_values {
        return flight.reject(Rejection {
            status: 413,
            reason: "json_values",
            message: format!(
                "the request body holds {values} JSON values; at most {} are accepted",
                limits.max_json_values
            ),
        });
    }
    // The body was charged as it arrived; what parsing builds is, before it does.
    let parsed = backstop_config::limits::request_memory(bytes.len(), values);
    if let Err(rejection) = flight.hold(parsed) {
        return flight.reject(rejection);
    }
    let parsed = match endpoint {
        Endpoint::Chat => Request::parse_chat(&bytes),
        Endpoint::Legacy => Request::parse_legacy(&bytes),
        Endpoint::Responses => Request::parse_responses(&bytes),
    };
    let mut request = match parsed {
        Ok(r) => r,
        Err(e) => {
            flight.record(respond::NO_BACKEND, 400);
            return ServerError::Invalid(e).into_response();
        }
    };
    if let Some(caller) = flight
        .caller
        .as_ref()
        .filter(|c| !c.may_use(&request.chat.model))
    {
        app.metrics
            .auth_failures
            .with_label_values(&["forbidden_model"])
            .inc();
        tracing::info!(
            identity = caller.name(),
            model = request.chat.model,
            "a model this caller may not use"
        );
        flight.record(respond::NO_BACKEND, 403);
        return ServerError::ModelNotAllowed(request.chat.model.clone()).into_response();
    }
    if let Some(caller) = &flight.caller {
        if let Err(wait) = caller.admit() {
            app.metrics
                .rejected
                .with_label_values(&["identity_rate_limit"])
                .inc();
            flight.record(respond::NO_BACKEND, 429);
            return ServerError::RateLimited {
                identity: caller.name().to_string(),
                wait,
            }
            .into_response();
        }
    }
    if app.generations.is_none() {
        if let Err(e) = needs_a_store(&request) {
            flight.record(respond::NO_BACKEND, 400);
            return ServerError::Invalid(e).into_response();
        }
    }
    if request.chat.messages.len() > limits.max_messages {
        app.metrics.rejected.with_label_values(&["messages"]).inc();
        flight.record(respond::NO_BACKEND, 400);
        // A Responses request's messages are its input (and instructions).
        let param = match endpoint {
            Endpoint::Responses => "input",
            _ => "messages",
        };
        return ServerError::Invalid(backstop_adapter::InvalidRequest {
            message: format!(
                "`{param}` holds {} messages; at most {} are accepted",
                request.chat.messages.len(),
                limits.max_messages
            ),
            param: Some(param.into()),
        })
        .into_response();
    }
    request.deadline = budget.map(|b| (flight.started + b).into_std());
    request.region = region;
    flight.stream = request.chat.is_stream();
    match (&app.generations, endpoint) {
        (Some(gens), Endpoint::Responses) => {
            let gens = gens.clone();
            crate::responses::create(&app, &gens, request, bytes, flight).await
        }
        (Some(gens), Endpoint::Chat) if resume.key.is_some() => {
            let gens = gens.clone();
            drop(bytes);
            keyed_chat(&app, &gens, request, resume, flight).await
        }
        _ if flight.stream => {
            drop(bytes);
            let writer = Writer::new(&request, response_id, unix_now());
            match start_stream(&app, &request, flight, writer, trailers).await {
                Ok(started) => started.respond(trailers),
                Err((e, flight, _)) => failed(&app, e, &flight),
            }
        }
        _ => {
            drop(bytes);
            let writer = Writer::new(&request, response_id, unix_now());
            complete(&app, &request, flight, writer).await
        }
    }
}

/// What a client asks for to make a chat stream resumable: its
/// `Idempotency-Key`, and on a reconnect the `Last-Event-ID` it saw.
pub(crate) struct Resume {
    key: Option<String>,
    last_event: Option<u64>,
}

impl Resume {
    fn from_headers(headers: &http::HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        Resume {
            key: text("idempotency-key").map(|k| k.chars().take(256).collect()),
            last_event: text("last-event-id").and_then(|v| v.parse().ok()),
        }
    }
}

/// A chat with an `Idempotency-Key`: one generation per key, kept running
/// through a disconnect. A stream's events carry `id:` fields; the same key
/// again continues after `Last-Event-ID`, or replays the stream from its
/// start without one. A whole answer is given again once it is done (a
/// 409 while it is still being made).
async fn keyed_chat(
    app: &Arc<App>,
    gens: &Arc<Generations>,
    request: Request,
    resume: Resume,
    flight: InFlight,
) -> Response<Body> {
    let Resume { key, last_event } = resume;
    // One identity's keys are not another's: each is kept under its owner.
    let key = match &flight.caller {
        Some(caller) => format!("{}\u{1f}{}", caller.name(), key.unwrap_or_default()),
        None => key.unwrap_or_default(),
    };
    match gens.store.by_key(&key).await {
        Ok(Some(existing)) => {
            flight.record(respond::NO_BACKEND, 200);
            return replay(gens, &existing, last_event).await;
        }
        Ok(None) => {}
        Err(e) => return ServerError::Store(e.to_string()).into_response(),
    }
    let id = generation_id("gen");
    let body = Bytes::from(serde_json::to_vec(&request.chat).unwrap_or_default());
    let record = gens.record(
        &id,
        Kind::Chat,
        Status::InProgress,
        false,
        false,
        Some(key),
        body,
        None,
        flight.caller.as_ref(),
    );
    // From the record on, everything runs in a task of its own: a client
    // that drops cannot leave a record that nothing finishes.
    if !request.chat.is_stream() {
        // The answer is made apart from this connection, so a client that
        // times out and retries with the same key gets it, not a second one.
        let (app, gens) = (app.clone(), gens.clone());
        let job = tokio::spawn(async move {
            match gens.at_once(gens.store.insert(record)).await {
                Ok(Inserted::New) => {}
                Ok(Inserted::Exists(existing)) => return replay(&gens, &existing, None).await,
                Err(e) => return ServerError::Store(e.to_string()).into_response(),
            }
            answer_whole(&app, &gens, &id, &request, flight).await
        });
        return job.await.unwrap_or_else(|_| {
            ServerError::Store("the answer's task failed".into()).into_response()
        });
    }
    let writer = Writer::new(&request, response_id, unix_now());
    let started = match start_stream(app, &request, flight, writer, false).await {
        Ok(started) => started,
        Err((e, flight, _)) => return failed(app, e, &flight),
    };
    let (told, kept) = tokio::sync::oneshot::channel();
    let task_gens = gens.clone();
    let task_id = id.clone();
    tokio::spawn(async move {
        let gens = task_gens;
        let respond = match gens.at_once(gens.store.insert(record)).await {
            // Another request with the key got there first: follow it.
            Ok(Inserted::Exists(existing)) => Err(existing),
            inserted => {
                if let Err(e) = inserted {
                    tracing::error!(id = task_id, "cannot keep a keyed stream: {e}");
                }
                let live = gens.start(&task_id, Vec::new());
                let (respond, frames) = started.detach();
                gens.pump(task_id, Kind::Chat, live, frames, false);
                Ok(respond)
            }
        };
        let _ = told.send(respond);
    });
    match kept.await {
        Ok(Ok(respond)) => match gens.tail(&id, None).await {
            Ok(Some(tail)) => respond.respond(tail),
            _ => ServerError::Store("the stream's log cannot be read".into()).into_response(),
        },
        Ok(Err(existing)) => replay(gens, &existing, last_event).await,
        Err(_) => ServerError::Store("the stream's task failed".into()).into_response(),
    }
}

/// A keyed chat's whole answer, made and kept under `id` for the client
/// that asks again with its key (after a restart or a takeover as well).
pub(crate) async fn answer_whole(
    app: &Arc<App>,
    gens: &Arc<Generations>,
    id: &str,
    request: &Request,
    flight: InFlight,
) -> Response<Body> {
    let writer = Writer::new(request, response_id, unix_now());
    let resp = complete(app, request, flight, writer).await;
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let kept = serde_json::json!({
        "status": parts.status.as_u16(),
        "body": serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default(),
    });
    let status = if parts.status.is_success() {
        Status::Completed
    } else {
        Status::Failed
    };
    let object = Some(Bytes::from(kept.to_string()));
    if let Err(e) = gens.at_once(gens.store.update(id, status, object)).await {
        tracing::error!(id, "cannot keep a keyed answer: {e}");
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// A keyed generation given again: a stream from after `last_event` (or
/// from its start), or a whole answer once done.
async fn replay(
    gens: &Arc<Generations>,
    record: &Record,
    last_event: Option<u64>,
) -> Response<Body> {
    let streamed = gens.live(&record.id).is_some()
        || matches!(gens.store.events(&record.id, None).await, Ok(e) if !e.is_empty());
    if streamed {
        return match gens.tail(&record.id, last_event).await {
            Ok(Some(tail)) => sse_response(
                Body::new(StreamBody::new(tail)),
                Served::NONE,
                &Headers::new(),
                false,
            ),
            Ok(None) => ServerError::UnknownResponse(record.id.clone()).into_response(),
            Err(e) => ServerError::Store(e.to_string()).into_response(),
        };
    }
    let Some(kept) = record
        .object
        .as_ref()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(o).ok())
    else {
        return ServerError::InProgress.into_response();
    };
    let status = kept["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(200);
    respond::json(
        status,
        kept["body"].to_string().into_bytes(),
        Served::NONE,
        &Headers::new(),
    )
}

/// A Responses request for what only the store can do (a background job,
/// a conversation continued from its previous response), with the store
/// turned off: the client's 400, naming the parameter, not a silent
/// foreground answer.
fn needs_a_store(request: &Request) -> Result<(), backstop_adapter::InvalidRequest> {
    let Some(responses) = request.api.responses() else {
        return Ok(());
    };
    let param = if responses.background() {
        "background"
    } else if responses
        .fields
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        "previous_response_id"
    } else {
        return Ok(());
    };
    Err(backstop_adapter::InvalidRequest {
        message: format!("`{param}` needs Backstop's store, which is turned off"),
        param: Some(param.into()),
    })
}

/// A new response id (see [`generation_id`]).
pub(crate) fn response_id() -> String {
    generation_id("resp")
}

/// A generation's id: the time (milliseconds) then 128 random bits, in
/// hex. Ids made in time order go to the end of the store's indexes, so a
/// busy store writes the same few pages, not pages all over its file.
pub(crate) fn generation_id(prefix: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{prefix}_{ms:012x}{:032x}", rand::random::<u128>())
}

impl InFlight {
    /// Counts and answers a refused request.
    pub(crate) fn reject(&self, rejection: Rejection) -> Response<Body> {
        let metrics = self.metrics();
        metrics
            .rejected
            .with_label_values(&[rejection.reason])
            .inc();
        self.record(respond::NO_BACKEND, rejection.status);
        ServerError::from(rejection).into_response()
    }
}

/// Reads a request body within the limits: its size, the time for the
/// whole of it, (after [`BODY_RATE_GRACE`]) its average rate, and the
/// memory of all requests in flight, to which each part is charged as it
/// arrives.
async fn read_body(mut body: RequestBody, flight: &mut InFlight) -> Result<Bytes, Rejection> {
    let app = flight.app.clone();
    let limits = &app.config.limits;
    let started = Instant::now();
    let until = started + limits.body_read_timeout;
    let mut out = bytes::BytesMut::new();
    loop {
        // Look at the rate at least every second while the body trickles.
        let wake = until.min(Instant::now() + Duration::from_secs(1));
        let frame = match tokio::time::timeout_at(wake, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                return Err(Rejection {
                    status: 400,
                    reason: "body_error",
                    message: format!("cannot read the request body: {e}"),
                })
            }
            Ok(None) => return Ok(out.freeze()),
            Err(_) if Instant::now() >= until => {
                return Err(Rejection {
                    status: 408,
                    reason: "body_timeout",
                    message: format!(
                        "the request body did not arrive within {} ms",
                        limits.body_read_timeout.as_millis()
                    ),
                })
            }
            Err(_) => {
                check_rate(out.len(), started, limits.min_body_rate)?;
                continue;
            }
        };
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limits.max_body_bytes {
                return Err(Rejection {
                    status: 413,
                    reason: "body_size",
                    message: format!(
                        "request body is larger than {} bytes",
                        limits.max_body_bytes
                    ),
                });
            }
            flight.hold(data.len())?;
            out.extend_from_slice(&data);
        }
        check_rate(out.len(), started, limits.min_body_rate)?;
    }
}

/// A body slower on average than `min_rate` bytes a second, after the
/// grace, is refused.
fn check_rate(read: usize, started: Instant, min_rate: u64) -> Result<(), Rejection> {
    let Some(past) = started.elapsed().checked_sub(BODY_RATE_GRACE) else {
        return Ok(());
    };
    if (read as f64) < min_rate as f64 * past.as_secs_f64() {
        return Err(Rejection {
            status: 408,
            reason: "body_rate",
            message: format!("the request body is arriving slower than {min_rate} bytes a second"),
        });
    }
    Ok(())
}

/// The client's own deadline header: milliseconds for the whole answer.
pub const DEADLINE_HEADER: &str = "x-backstop-deadline-ms";

/// The client's region: a target group tries its members of this region
/// first (the server's own `server.region` when absent).
pub const REGION_HEADER: &str = "x-backstop-region";
/// The read timeout the official OpenAI SDKs announce, in seconds.
const SDK_TIMEOUT_HEADER: &str = "x-stainless-read-timeout";

/// The time the client gives the whole answer, from [`DEADLINE_HEADER`] or
/// the SDKs' read timeout (the sooner of the two), less a margin for the
/// answer's way back: a tenth of it, at most a second. A malformed
/// `x-backstop-deadline-ms` is the client's mistake; a malformed SDK
/// header is ignored.
fn client_budget(headers: &http::HeaderMap) -> Result<Option<Duration>, String> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let ours = match text(DEADLINE_HEADER) {
        None => None,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
            _ => {
                return Err(format!(
                    "`{DEADLINE_HEADER}` must be a whole number of milliseconds above 0"
                ))
            }
        },
    };
    let sdk = text(SDK_TIMEOUT_HEADER)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64);
    let budget = match (ours, sdk) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => match a.or(b) {
            Some(d) => d,
            None => return Ok(None),
        },
    };
    Ok(Some(budget - (budget / 10).min(Duration::from_secs(1))))
}

pub(crate) fn failed(app: &App, e: RouteError, flight: &InFlight) -> Response<Body> {
    if let RouteError::Failed(failed) = &e {
        app.metrics.count_walk(failed, None);
    }
    let target = e.last_target().unwrap_or(respond::NO_BACKEND).to_string();
    let error = ServerError::from(e);
    flight.record(&target, error.status());
    error.into_response()
}

pub(crate) async fn complete(
    app: &App,
    request: &Request,
    flight: InFlight,
    mut writer: Writer,
) -> Response<Body> {
    let served = match app.snapshot().router.complete(request).await {
        Ok(s) => s,
        Err(e) => return failed(app, e, &flight),
    };
    app.metrics.count_attempts(&served);
    let attempts = served.attempts();
    let completion = served.reply.body;
    if !served.mirrored.is_empty() {
        let text = completion
            .choices
            .first()
            .and_then(|c| c.message.content.as_ref())
            .map(|c| c.to_text())
            .unwrap_or_default();
        for shadow in served.mirrored {
            let _ = shadow.send(text.clone());
        }
    }
    if let Some(usage) = &completion.usage {
        flight.count_usage(&served.backend, usage);
    }
    let body = writer.completion(completion);
    let resp = match body {
        Ok(body) => respond::json(
            200,
            body,
            Served {
                backend: &served.backend,
                attempts,
            },
            &served.reply.headers,
        ),
        Err(e) => ServerError::Encode(format!("cannot encode response: {e}")).into_response(),
    };
    flight.record(&served.backend, resp.status().as_u16());
    app.metrics.overhead.observe(
        flight
            .started
            .elapsed()
            .saturating_sub(served.backend_time)
            .as_secs_f64(),
    );
    resp
}

/// Whether the client takes trailer fields: always over HTTP/2, over
/// HTTP/1.1 when it sent `TE: trailers`.
fn accepts_trailers(req: &HttpRequest) -> bool {
    req.version() >= http::Version::HTTP_2
        || req
            .headers()
            .get_all(http::header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Trailer fields a stream ends with, for clients that take them: who
/// served last (a continued stream changes hands) and the attempts in all.
const TRAILERS: &str = "x-backstop-backend, x-backstop-attempts";

/// A stream whose first backend has answered: its events, and what its
/// response headers say.
pub(crate) struct Started {
    events: ClientStream,
    backend: String,
    attempts: u32,
    headers: Headers,
}

/// How to answer for a stream whose events go elsewhere first.
pub(crate) struct Respond {
    backend: String,
    attempts: u32,
    headers: Headers,
}

/// Routes a stream to its first answering backend; on failure, the error
/// with the flight and writer given back.
pub(crate) async fn start_stream(
    app: &App,
    request: &Request,
    flight: InFlight,
    writer: Writer,
    trailers: bool,
) -> Result<Started, (RouteError, InFlight, Writer)> {
    let served = match app.snapshot().router.stream(request).await {
        Ok(s) => s,
        Err(e) => return Err((e, flight, writer)),
    };
    app.metrics.count_attempts(&served);
    flight.record(&served.backend, 200);
    let attempts = served.attempts();
    let events = ClientStream {
        chunks: served.reply.body,
        writer,
        serving: served.serving.clone(),
        trailers,
        mirrored: served.mirrored,
        text: String::new(),
        backend_time: served.backend_time,
        first_sent: false,
        done: false,
        flight,
    };
    Ok(Started {
        events,
        backend: served.backend.clone(),
        attempts,
        headers: served.reply.headers,
    })
}

impl Started {
    /// The stream as the response, straight to the client.
    pub(crate) fn respond(self, trailers: bool) -> Response<Body> {
        let served = Served {
            backend: &self.backend,
            attempts: self.attempts,
        };
        let body = Body::new(StreamBody::new(self.events.into_frames()));
        sse_response(body, served, &self.headers, trailers)
    }

    /// The stream's data frames, to run apart from the client, and how to
    /// answer it.
    pub(crate) fn detach(self) -> (Respond, BoxStream<'static, Bytes>) {
        let respond = Respond {
            backend: self.backend,
            attempts: self.attempts,
            headers: self.headers,
        };
        let frames = self
            .events
            .into_frames()
            .filter_map(|frame| async move { frame.ok()?.into_data().ok() })
            .boxed();
        (respond, frames)
    }
}

impl Respond {
    /// The response that streams `tail` (which ends without the trailers
    /// a direct stream has).
    pub(crate) fn respond(
        self,
        tail: BoxStream<'static, Result<Frame<Bytes>, Infallible>>,
    ) -> Response<Body> {
        let served = Served {
            backend: &self.backend,
            attempts: self.attempts,
        };
        sse_response(
            Body::new(StreamBody::new(tail)),
            served,
            &self.headers,
            false,
        )
    }
}

/// An event-stream response: not cached or buffered by proxies on the way.
pub(crate) fn sse_response(
    body: Body,
    served: Served<'_>,
    passthrough: &Headers,
    trailers: bool,
) -> Response<Body> {
    let mut resp = respond::response(200, "text/event-stream", body, served, passthrough);
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    headers.insert("x-accel-buffering", http::HeaderValue::from_static("no"));
    if trailers {
        headers.insert(
            http::header::TRAILER,
            http::HeaderValue::from_static(TRAILERS),
        );
    }
    resp
}

/// Largest frame assembled from ready chunks before it is handed to hyper.
const MAX_FRAME: usize = 64 << 10;

/// The client's side of a stream: chunks encoded as SSE, `[DONE]` at the end,
/// or an error event if the backend fails after the stream started.
struct ClientStream {
    chunks: ChunkStream,
    /// Writes the chunks in the client's dialect.
    writer: Writer,
    /// Who serves now (changes when a broken stream is continued).
    serving: Serving,
    /// The client takes trailers: end with them.
    trailers: bool,
    /// Shadows waiting for the served text, which is gathered only for them.
    mirrored: Vec<tokio::sync::oneshot::Sender<String>>,
    text: String,
    backend_time: Duration,
    first_sent: bool,
    done: bool,
    flight: InFlight,
}

impl ClientStream {
    fn into_frames(
        self,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut s| async move {
            if s.done {
                return s.take_trailers().map(|t| (Ok(Frame::trailers(t)), s));
            }
            let bytes = s.next_frame().await?;
            Some((Ok(Frame::data(bytes)), s))
        })
    }

    /// The trailer fields, once, for a client that takes them.
    fn take_trailers(&mut self) -> Option<http::HeaderMap> {
        if !std::mem::take(&mut self.trailers) {
            return None;
        }
        let mut map = http::HeaderMap::new();
        if let Ok(backend) = http::HeaderValue::from_str(&self.serving.backend()) {
            map.insert(respond::BACKEND_HEADER, backend);
        }
        map.insert(
            respond::ATTEMPTS_HEADER,
            http::HeaderValue::from(self.serving.attempts()),
        );
        Some(map)
    }

    /// The next bytes for the client: every event that is ready, so chunks
    /// that arrived in one upstream read leave in one write.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut out = Vec::with_capacity(512);
        let first = self.chunks.next().await;
        self.push(first, &mut out);
        while !self.done && out.len() < MAX_FRAME {
            match self.chunks.next().now_or_never() {
                Some(item) => self.push(item, &mut out),
                None => break,
            }
        }
        Some(Bytes::from(out))
    }

    /// Encodes one item of the backend's stream: a chunk, the end, or a failure.
    fn push(&mut self, item: Option<Result<ChatChunk, BackendError>>, out: &mut Vec<u8>) {
        match item {
            Some(Ok(chunk)) => {
                if !self.first_sent {
                    self.first_sent = true;
                    let elapsed = self.flight.started.elapsed();
                    self.flight
                        .metrics()
                        .ttft
                        .with_label_values(&[&self.serving.backend()])
                        .observe(elapsed.as_secs_f64());
                    self.flight
                        .metrics()
                        .overhead
                        .observe(elapsed.saturating_sub(self.backend_time).as_secs_f64());
                }
                if !self.mirrored.is_empty() {
                    for choice in chunk.choices.iter().filter(|c| c.index == 0) {
                        if let Some(t) = &choice.delta.content {
                            self.text.push_str(t);
                        }
                    }
                }
                if let Some(usage) = &chunk.usage {
                    let target = self.serving.backend();
                    self.flight.count_usage(&target, usage);
                }
                let encoded = self.writer.chunk(chunk, out);
                if let Err(e) = encoded {
                    let message = format!("cannot encode chunk: {e}");
                    self.fail(BackendError::new(FailureKind::BadResponse, message), out);
                }
            }
            Some(Err(e)) => self.fail(e, out),
            None => {
                if let Err(e) = self.writer.end(out) {
                    let message = format!("cannot encode the stream's end: {e}");
                    return self.fail(BackendError::new(FailureKind::BadResponse, message), out);
                }
                self.done = true;
                for shadow in self.mirrored.drain(..) {
                    let _ = shadow.send(self.text.clone());
                }
            }
        }
    }

    /// Ends the stream with an error event: the answer is not complete.
    fn fail(&mut self, e: BackendError, out: &mut Vec<u8>) {
        self.done = true;
        let target = self.serving.backend();
        tracing::warn!(%target, kind = e.kind.as_str(), "stream failed after it started: {}", e.message);
        self.flight.metrics().count_backend_failure(&target, &e);
        if self.writer.fail(&e.to_body(), out).is_err() {
            tracing::error!("cannot encode the error event of a failed stream");
        }
    }
}
