//! An OpenAI-compatible HTTP upstream as a [`Backend`].
//!
//! One pooled keep-alive client per target (rustls, TLS 1.2 at least, optional
//! HTTP/2 and extra CA bundle), bounded by three deadlines: connect, time to the
//! response headers, and idle time between body reads. Every response is checked
//! before it is trusted: only `application/json` and `text/event-stream` are
//! parsed, defensively, and anything else becomes a classified [`BackendError`],
//! never a partial body handed on.

pub mod decode;
pub mod ratelimit;
mod response;
pub mod tokens;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use backstop_adapter::{
    Backend, BackendError, BoxFuture, ChatCompletion, ChunkStream, Echo, FailureKind, Model,
    Outgoing, Reply, Request, Wire,
};
use futures_util::StreamExt;
use tokio::time::{timeout, Instant};

use reqwest::header as http_header;

use crate::decode::StreamBounds;
use crate::response::{passthrough_headers, ChunkReader};

/// How to reach and bound one OpenAI-compatible upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// The target's name, shown in `x-backstop-backend` and metrics.
    pub name: String,
    /// Base URL up to and including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Bearer tokens, used in turn; none sends no `Authorization` header.
    pub api_keys: Vec<String>,
    /// Model name to send instead of the one the client asked for.
    pub model: Option<String>,
    /// Idle keep-alive connections kept per host.
    pub pool_max_idle: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Offer HTTP/2 (ALPN for https, prior knowledge for plain http).
    pub http2: bool,
    /// Extra PEM CA certificates trusted besides the built-in roots.
    pub ca_bundle: Option<PathBuf>,
    /// Deadline for the TCP and TLS handshake.
    pub connect_timeout: Duration,
    /// Deadline from sending a non-streamed request to its response
    /// headers, which come only with the whole answer.
    pub first_byte_timeout: Duration,
    /// Deadline from sending a streamed request (or a model listing) to its
    /// response headers: a streaming upstream sends them at once, before
    /// its first token, so silence here means it is not answering.
    pub header_timeout: Duration,
    /// Longest silence allowed between two reads of a body or stream.
    pub idle_timeout: Duration,
    /// Largest non-streamed response body accepted.
    pub max_body_bytes: usize,
    /// Largest event-stream line, or event, accepted in a stream.
    pub max_event_bytes: usize,
    /// The upstream continues a final partial assistant message (a prefill),
    /// so it may finish a stream another target started.
    pub prefill: bool,
    /// The upstream serves legacy `/v1/completions`. When it does not (or
    /// once it answers one 404), legacy requests go to it as chats and their
    /// answers come back as legacy completions.
    pub completions: bool,
    /// The upstream serves the Responses API, `/v1/responses`. When it
    /// does not (or once it answers one 404), Responses requests go to it
    /// as chats and their answers come back as Responses events.
    pub responses: bool,
    /// The model's context window in tokens: a prompt that does not fit is
    /// not sent, and `max_tokens` is clamped to the room left.
    pub context_window: Option<usize>,
    /// Client-side limit on requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Client-side limit on tokens (prompt plus `max_tokens`) per minute.
    pub tokens_per_minute: Option<u64>,
}

impl UpstreamConfig {
    /// Defaults for an upstream at `base_url`.
    pub fn new(name: impl Into<String>, base_url: impl Into<String>) -> Self {
        UpstreamConfig {
            name: name.into(),
            base_url: base_url.into(),
            api_keys: Vec::new(),
            model: None,
            pool_max_idle: 64,
            pool_idle_timeout: Duration::from_secs(90),
            http2: false,
            ca_bundle: None,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_body_bytes: 16 << 20,
            max_event_bytes: backstop_adapter::sse::DEFAULT_MAX_EVENT,
            prefill: false,
            completions: true,
            responses: true,
            context_window: None,
            requests_per_minute: None,
            tokens_per_minute: None,
        }
    }
}

/// The legacy `echo` Backstop does for a legacy request answered as a
/// chat (`wire`); not for a continuation, whose answer started elsewhere.
fn echo(req: &Request, wire: Wire) -> Option<Echo> {
    let prompt = req.api.legacy()?.echo()?;
    (wire == Wire::Chat && req.prefill.is_none()).then(|| Echo::new(prompt))
}

/// Why an upstream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The CA bundle could not be read.
    #[error("cannot read CA bundle {path}: {source}")]
    CaBundle {
        /// The file named in the config.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The HTTP client could not be built (bad certificate, TLS setup).
    #[error("cannot build HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// How long an upstream key refused with a 401 or 403 stays out, when the
/// target has another: then it is tried again (a revoked key costs one
/// refused attempt in that time, answered at once by the next key).
pub const KEY_OUT: Duration = Duration::from_secs(600);

/// One of a target's upstream keys (or its only, keyless, way in), with
/// the rate limit the upstream keeps for it.
#[derive(Debug)]
struct Key {
    secret: Option<String>,
    limit: ratelimit::RateLimit,
    /// Refused (401, 403) until then.
    out_until: Mutex<Option<Instant>>,
}

impl Key {
    fn is_out(&self, now: Instant) -> bool {
        let out = self.out_until.lock().unwrap_or_else(|e| e.into_inner());
        out.is_some_and(|until| until > now)
    }
}

/// An OpenAI-compatible upstream.
#[derive(Debug)]
pub struct Upstream {
    config: UpstreamConfig,
    /// Its keys, used in turn.
    keys: Vec<Key>,
    /// The key the next request starts from.
    next_key: AtomicUsize,
    client: reqwest::Client,
    /// The base URL without a trailing `/`; a dialect's path follows it.
    base: String,
    /// Legacy requests go to it as chats (see [`UpstreamConfig::completions`]).
    no_legacy: AtomicBool,
    /// Responses requests go to it as chats (see [`UpstreamConfig::responses`]).
    no_responses: AtomicBool,
}

impl Upstream {
    /// Builds the upstream's pooled client.
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        let mut builder = reqwest::Client::builder()
            .min_tls_version(reqwest::tls::Version::TLS_1_2)
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.pool_max_idle)
            .pool_idle_timeout(config.pool_idle_timeout)
            .tcp_nodelay(true)
            // A redirect would turn a POST into a GET; a 3xx is a bad answer.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("backstop/", env!("CARGO_PKG_VERSION")));
        builder = match (config.http2, config.base_url.starts_with("http://")) {
            (false, _) => builder.http1_only(),
            (true, true) => builder.http2_prior_knowledge(),
            (true, false) => builder,
        };
        if let Some(path) = &config.ca_bundle {
            let pem = std::fs::read(path).map_err(|source| UpstreamError::CaBundle {
                path: path.clone(),
                source,
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Upstream {
            base: config.base_url.trim_end_matches('/').to_string(),
            no_legacy: AtomicBool::new(!config.completions),
            no_responses: AtomicBool::new(!config.responses),
            client: builder.build()?,
            keys: keys(&config),
            next_key: AtomicUsize::new(0),
            config,
        })
    }

    /// The upstream's settings.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Whether each of its keys is in use now (not refused lately).
    pub fn keys_in_use(&self) -> Vec<bool> {
        let now = Instant::now();
        self.keys.iter().map(|k| !k.is_out(now)).collect()
    }

    /// Its rate limits, one a key, each named `{target}#{key}` (key 0 when
    /// it has none): the names replicas share them by.
    pub fn rate_limits(&self) -> impl Iterator<Item = (String, &ratelimit::RateLimit)> + '_ {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("{}#{i}", self.config.name), &k.limit))
    }

    /// The keys to try for one request, in order: each in turn first, the
    /// refused ones left out while another is in use.
    fn key_order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.keys.len();
        let first = self.next_key.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let any_in_use = self.keys.iter().any(|k| !k.is_out(now));
        (0..n)
            .map(move |i| (first + i) % n)
            .filter(move |&i| !any_in_use || !self.keys[i].is_out(now))
    }

    /// The model this target is asked for.
    fn model(&self, req: &Request) -> String {
        self.config
            .model
            .clone()
            .unwrap_or_else(|| req.chat.model.clone())
    }

    /// The client's token cap on what this target adds: its `max_tokens`
    /// less what a prefill already said.
    fn client_cap(&self, req: &Request) -> Option<u64> {
        let cap = req.chat.max_completion_tokens.or(req.chat.max_tokens)?;
        Some(
            u64::from(cap)
                .saturating_sub(self.prefill_tokens(req))
                .max(1),
        )
    }

    /// Tokens of the request's prefill (answer the client already has), as
    /// this target's model counts them.
    fn prefill_tokens(&self, req: &Request) -> u64 {
        let model = self.config.model.as_deref().unwrap_or(&req.chat.model);
        req.prefill
            .as_deref()
            .map_or(0, |p| tokens::text_tokens(p, model) as u64)
    }

    /// Whether the target is known not to serve `wire`, and goes a chat.
    fn unserved(&self, wire: Wire) -> Option<&AtomicBool> {
        match wire {
            Wire::Chat => None,
            Wire::Legacy => Some(&self.no_legacy),
            Wire::Responses => Some(&self.no_responses),
        }
    }

    /// The dialect `req` goes to this target in: the client's, unless the
    /// target does not serve it, or (for Responses) the request continues
    /// an answer, which only a chat can carry as a partial assistant turn.
    fn wire(&self, req: &Request) -> Wire {
        let wire = req.api.wire();
        let unserved = self
            .unserved(wire)
            .is_some_and(|flag| flag.load(Ordering::Relaxed));
        if unserved || (wire == Wire::Responses && req.prefill.is_some()) {
            Wire::Chat
        } else {
            wire
        }
    }

    /// Sends the request in the dialect this target serves and waits for
    /// the response headers; returns the dialect of the answer. When a
    /// legacy or Responses request gets a 404 (as OpenAI answers for a
    /// chat model, and servers without the endpoint do), it goes again at
    /// once as a chat. If the chat is served, the target serves chat only
    /// for that dialect and every later such request goes as a chat; if
    /// not (an unknown model is a 404 on both), the first 404 stands and
    /// nothing is learned.
    async fn send(
        &self,
        req: &Request,
        stream: bool,
    ) -> Result<(reqwest::Response, Wire), BackendError> {
        let wire = self.wire(req);
        match self.send_as(req, stream, wire).await {
            Err(e) if wire != Wire::Chat && e.status == Some(404) => {
                let response = self.send_as(req, stream, Wire::Chat).await.map_err(|_| e)?;
                let learned = self
                    .unserved(wire)
                    .is_some_and(|flag| !flag.swap(true, Ordering::Relaxed));
                if learned {
                    tracing::info!(
                        "target `{}` does not serve {}: those requests go to it as chats",
                        self.config.name,
                        wire.path()
                    );
                }
                Ok((response, Wire::Chat))
            }
            sent => Ok((sent?, wire)),
        }
    }

    /// Sends the request as `wire` and waits, within the first-byte
    /// deadline, for the response headers. A non-2xx answer becomes the
    /// matching error.
    async fn send_as(
        &self,
        req: &Request,
        stream: bool,
        wire: Wire,
    ) -> Result<reqwest::Response, BackendError> {
        if wire != req.api.wire() {
            if let Some(param) = req.api.untranslatable(req.chat.n.unwrap_or(1)) {
                return Err(self.cannot_translate(param, req.api.wire()));
            }
        }
        let continued;
        let sent = if req.prefill.is_some() && !self.config.prefill {
            continued = req.as_continuation();
            &continued
        } else {
            req
        };
        // Whichever token cap the client gave fits the room the context
        // window leaves, and the prefill (part of the answer the client
        // asked for) comes out of it.
        let mut room = u32::MAX;
        if let Some(window) = self.config.context_window {
            let model = self.config.model.as_deref().unwrap_or(&req.chat.model);
            let prompt = tokens::prompt_tokens(req, model);
            if prompt >= window {
                return Err(self.too_long(prompt, window));
            }
            room = u32::try_from(window - prompt).unwrap_or(u32::MAX);
        }
        let answered = u32::try_from(self.prefill_tokens(req)).unwrap_or(u32::MAX);
        let cap = move |n: u32| match n.min(room) {
            n if answered > 0 => n.saturating_sub(answered).max(1),
            n => n,
        };
        let bytes = sent
            .upstream_body(&Outgoing {
                wire: Some(wire),
                model: self.config.model.as_deref(),
                stream: Some(stream),
                cap: &cap,
            })
            .map_err(|e| {
                BackendError::new(
                    FailureKind::ClientError,
                    format!("cannot encode request: {e}"),
                )
            })?;
        let tokens = if self.keys.iter().any(|k| k.limit.counts_tokens()) {
            let model = self.config.model.as_deref().unwrap_or(&req.chat.model);
            let chat = &sent.chat;
            let answer = chat
                .max_completion_tokens
                .or(chat.max_tokens)
                .map_or(0, cap);
            tokens::prompt_tokens(req, model) as u64 + u64::from(answer)
        } else {
            0
        };
        let url = format!("{}{}", self.base, wire.path());
        let body = bytes::Bytes::from(bytes);
        let wait = if stream {
            self.config.header_timeout
        } else {
            self.config.first_byte_timeout
        };
        // Each key in turn. A key the upstream refuses (401, 403) or holds
        // back (429) gives way at once to the next one; the last answer
        // stands when none is left.
        let mut order = self.key_order().peekable();
        let mut held: Option<Duration> = None;
        let mut refused: Option<BackendError> = None;
        while let Some(index) = order.next() {
            let key = &self.keys[index];
            if let Err(wait) = key.limit.acquire(tokens) {
                held = Some(held.map_or(wait, |h| h.min(wait)));
                continue;
            }
            let mut request = self
                .client
                .post(&url)
                .header(http_header::CONTENT_TYPE, "application/json")
                .header(
                    http_header::ACCEPT,
                    if stream {
                        "text/event-stream"
                    } else {
                        "application/json"
                    },
                )
                .body(body.clone());
            if let Some(secret) = &key.secret {
                request = request.bearer_auth(secret);
            }
            let response = self.await_headers(request.send(), wait).await?;
            let status = response.status().as_u16();
            key.limit
                .observe(&passthrough_headers(response.headers()), status);
            if response.status().is_success() {
                return Ok(response);
            }
            let error = self.error_from_status(response).await;
            let others = order.peek().is_some();
            if matches!(status, 401 | 403) && self.keys.len() > 1 {
                *key.out_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Instant::now() + KEY_OUT);
                tracing::warn!(
                    target = %self.config.name,
                    key = index,
                    status,
                    "upstream key #{index} of target `{}` was refused: out of use for {} s",
                    self.config.name,
                    KEY_OUT.as_secs()
                );
            }
            if others && matches!(status, 401 | 403 | 429) {
                refused = Some(error);
                continue;
            }
            return Err(error);
        }
        if let Some(error) = refused {
            return Err(error);
        }
        let wait = held.unwrap_or_default();
        let mut e = BackendError::new(
            FailureKind::Throttled,
            format!(
                "target `{}` is held back by its rate limit for {} ms",
                self.config.name,
                wait.as_millis()
            ),
        );
        e.headers
            .push(("retry-after-ms".into(), wait.as_millis().to_string()));
        Err(e)
    }

    /// The error for a non-2xx answer, with this target's key scrubbed.
    async fn error_from_status(&self, response: reqwest::Response) -> BackendError {
        let secrets: Vec<&str> = self.config.api_keys.iter().map(String::as_str).collect();
        response::error_from_status(response, self.config.idle_timeout, &secrets).await
    }

    /// The error for a request with a field a chat cannot carry, to a
    /// target that does not serve the client's dialect (`wire`): a 400
    /// naming the field.
    fn cannot_translate(&self, param: &str, wire: Wire) -> BackendError {
        let message = format!(
            "target `{}` does not serve {} and gets it as a chat, which cannot take `{param}`",
            self.config.name,
            wire.path()
        );
        BackendError {
            kind: FailureKind::ClientError,
            body: Some(
                serde_json::json!({"error": {"message": message, "type": "invalid_request_error",
                "param": param, "code": "unsupported_parameter"}}),
            ),
            message,
            status: Some(400),
            headers: Vec::new(),
        }
    }

    /// The error for a prompt this target's model cannot hold: a 400
    /// `context_length_exceeded`, which sends the request to the next target.
    fn too_long(&self, prompt: usize, window: usize) -> BackendError {
        let message = format!(
            "The prompt is {prompt} tokens; target `{}` holds {window} with room for the answer \
             ({} tokens over).",
            self.config.name,
            prompt + 1 - window
        );
        BackendError {
            kind: FailureKind::ClientError,
            body: Some(
                serde_json::json!({"error": {"message": message, "type": "invalid_request_error",
                "param": "messages", "code": "context_length_exceeded"}}),
            ),
            message,
            status: Some(400),
            headers: Vec::new(),
        }
    }

    async fn await_headers(
        &self,
        send: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
        wait: Duration,
    ) -> Result<reqwest::Response, BackendError> {
        match timeout(wait, send).await {
            Err(_) => Err(BackendError::new(
                FailureKind::FirstByteTimeout,
                format!("no response headers within {} ms", wait.as_millis()),
            )),
            Ok(Err(e)) => Err(response::transport_error(e)),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

impl Backend for Upstream {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn complete<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>> {
        Box::pin(async move {
            let started = Instant::now();
            let (response, wire) = self.send(req, false).await?;
            let headers = passthrough_headers(response.headers());
            let mut completion = response::read_completion(
                response,
                wire,
                self.config.idle_timeout,
                self.config.max_body_bytes,
            )
            .await
            .map_err(|e| with_headers(e, &headers))?;
            if let Some(usage) = &mut completion.usage {
                usage.count_prefill_as_answer(self.prefill_tokens(req));
            }
            if let Some(cap) = self.client_cap(req) {
                decode::cap_completion(&mut completion, cap, &self.model(req));
            }
            if let Some(mut echo) = echo(req, wire) {
                echo.completion(&mut completion);
            }
            Ok(Reply {
                body: completion,
                headers,
                waited: started.elapsed(),
            })
        })
    }

    fn stream<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>> {
        Box::pin(async move {
            let started = Instant::now();
            let (response, wire) = self.send(req, true).await?;
            let headers = passthrough_headers(response.headers());
            let body: ChunkStream = match response::content_type(&response) {
                response::Kind::EventStream => {
                    let bounds = StreamBounds {
                        choices: req.chat.n.unwrap_or(1),
                        max_tokens: self.client_cap(req),
                        model: self.model(req),
                        max_event_bytes: self.config.max_event_bytes,
                    };
                    ChunkReader::new(response, wire, self.config.idle_timeout, bounds).into_stream()
                }
                // Some servers ignore `stream`: replay their whole answer as chunks.
                response::Kind::Json => {
                    let completion = response::read_completion(
                        response,
                        wire,
                        self.config.idle_timeout,
                        self.config.max_body_bytes,
                    )
                    .await
                    .map_err(|e| with_headers(e, &headers))?;
                    let chunks = completion.into_chunks(req.chat.include_usage());
                    Box::pin(futures_util::stream::iter(chunks.into_iter().map(Ok)))
                }
                response::Kind::Other(ct) => {
                    return Err(with_headers(response::unexpected_type(&ct), &headers))
                }
            };
            let answered = self.prefill_tokens(req);
            let body = if answered > 0 {
                Box::pin(body.map(move |mut item| {
                    if let Ok(Some(usage)) = item.as_mut().map(|c| c.usage.as_mut()) {
                        usage.count_prefill_as_answer(answered);
                    }
                    item
                }))
            } else {
                body
            };
            let body = match echo(req, wire) {
                Some(mut echo) => Box::pin(body.map(move |mut item| {
                    if let Ok(chunk) = item.as_mut() {
                        echo.chunk(chunk);
                    }
                    item
                })),
                None => body,
            };
            Ok(Reply {
                body,
                headers,
                waited: started.elapsed(),
            })
        })
    }

    fn continues(&self) -> bool {
        self.config.prefill
    }

    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
        Box::pin(async move {
            let mut request = self.client.get(format!("{}/models", self.base));
            let key = self
                .key_order()
                .next()
                .and_then(|i| self.keys[i].secret.as_ref());
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = self
                .await_headers(request.send(), self.config.header_timeout)
                .await?;
            if !response.status().is_success() {
                return Err(self.error_from_status(response).await);
            }
            let list: backstop_adapter::ModelList = response::read_json(
                response,
                self.config.idle_timeout,
                self.config.max_body_bytes,
            )
            .await?;
            Ok(list.data)
        })
    }
}

/// A target's keys, each with the configured rate limit (the upstream
/// keeps one a key); one keyless way in when it has none.
fn keys(config: &UpstreamConfig) -> Vec<Key> {
    let secrets: Vec<Option<String>> = if config.api_keys.is_empty() {
        vec![None]
    } else {
        config.api_keys.iter().cloned().map(Some).collect()
    };
    secrets
        .into_iter()
        .map(|secret| Key {
            secret,
            limit: ratelimit::RateLimit::new(config.requests_per_minute, config.tokens_per_minute),
            out_until: Mutex::new(None),
        })
        .collect()
}

fn with_headers(mut e: BackendError, headers: &backstop_adapter::Headers) -> BackendError {
    if e.headers.is_empty() {
        e.headers = headers.clone();
    }
    e
}

#[cfg(test)]
mod tests;
