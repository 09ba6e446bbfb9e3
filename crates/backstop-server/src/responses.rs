//! The Responses API's lifecycle over the store: creating a response
//! (foreground, streamed, or as a background job), retrieving it (whole,
//! or as its stream from any event on), cancelling, deleting, listing its
//! input items, continuing a conversation from a previous response, and
//! finishing, after a restart, what was running.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::Extension;
use backstop_adapter::{ChatWriter, Headers, Request, ResponseWriter, Writer};
use backstop_store::{Kind, Record, Status};
use bytes::Bytes;
use futures_util::StreamExt;
use http::Response;
use http_body_util::StreamBody;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::completions::{complete, failed, response_id, sse_response, start_stream, InFlight};
use crate::error::{Rejection, ServerError};
use crate::generations::{ends, event_json, restatus, unix_now, visible, Generations, Live};
use crate::respond::{self, Body, Served};
use crate::App;

/// The store and the record of `id`, or the 404: also for a record
/// another identity made (its existence is not told).
async fn find(
    app: &App,
    id: &str,
    caller: Option<&Caller>,
) -> Result<(Arc<Generations>, Record), ServerError> {
    let gens = app
        .generations
        .clone()
        .ok_or_else(|| ServerError::UnknownResponse(id.to_string()))?;
    match gens.get(id).await {
        Ok(Some(record)) if record.kind == Kind::Response && visible(&record, caller) => {
            Ok((gens, record))
        }
        Ok(_) => Err(ServerError::UnknownResponse(id.to_string())),
        Err(e) => Err(ServerError::Store(e.to_string())),
    }
}

fn json_ok(body: Vec<u8>) -> Response<Body> {
    respond::json(200, body, Served::NONE, &Headers::new())
}

/// `POST /v1/responses` once parsed: stored unless `store: false`, a
/// stream always kept (for the short window when not stored) so that it
/// can be resumed, a background one run as a job.
pub(crate) async fn create(
    app: &Arc<App>,
    gens: &Arc<Generations>,
    request: Request,
    body: Bytes,
    flight: InFlight,
) -> Response<Body> {
    let (stored, background) = match request.api.responses() {
        Some(r) => (
            r.fields.get("store").and_then(Value::as_bool) != Some(false),
            r.background(),
        ),
        None => (false, false),
    };
    let owner = flight.caller.clone();
    let (request, body) = match with_history(gens, request, body, owner.as_ref()).await {
        Ok(expanded) => expanded,
        Err(e) => {
            flight.record(respond::NO_BACKEND, e.status());
            return e.into_response();
        }
    };
    let id = response_id();
    let stream = request.chat.is_stream();
    if background {
        return start_job(app, gens, request, body, stored, flight, id, stream).await;
    }
    if stream {
        let writer = Writer::new(&request, || id.clone(), unix_now());
        let started = match start_stream(app, &request, flight, writer, false).await {
            Ok(started) => started,
            Err((e, flight, _)) => return failed(app, e, &flight),
        };
        let record = gens.record(
            &id,
            Kind::Response,
            Status::InProgress,
            false,
            stored,
            None,
            body,
            None,
            owner.as_ref(),
        );
        // Queued before its events, in order; the stream does not wait for
        // the commit (a reader finds it live meanwhile).
        drop(gens.store.insert(record));
        let live = gens.start(&id, Vec::new());
        let (respond, frames) = started.detach();
        gens.pump(id.clone(), Kind::Response, live, frames, false);
        return match gens.tail(&id, None).await {
            Ok(Some(tail)) => respond.respond(tail),
            _ => ServerError::Store("the stream's log cannot be read".into()).into_response(),
        };
    }
    let writer = Writer::new(&request, || id.clone(), unix_now());
    let resp = complete(app, &request, flight, writer).await;
    if !stored || !resp.status().is_success() {
        return resp;
    }
    // Kept once whole, for retrieval and for the conversation's next turn.
    let (parts, answer) = resp.into_parts();
    let bytes = axum::body::to_bytes(answer, usize::MAX)
        .await
        .unwrap_or_default();
    let status = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| Status::parse(v["status"].as_str()?))
        .unwrap_or(Status::Completed);
    let record = gens.record(
        &id,
        Kind::Response,
        status,
        false,
        true,
        None,
        body,
        Some(bytes.clone()),
        owner.as_ref(),
    );
    // Queued, not waited for: a read finds it once the writer has it.
    drop(gens.store.insert(record));
    Response::from_parts(parts, Body::from(bytes))
}

/// A background response: accepted at once as `queued` (a 429 when the
/// queue is full), run by a job runner apart from any client.
#[allow(clippy::too_many_arguments)]
async fn start_job(
    app: &Arc<App>,
    gens: &Arc<Generations>,
    mut request: Request,
    body: Bytes,
    stored: bool,
    flight: InFlight,
    id: String,
    stream: bool,
) -> Response<Body> {
    if !gens.store.reachable() {
        return flight.reject(Rejection {
            status: 503,
            reason: "store",
            message: "the store does not answer, so this replica takes no background response \
                      now; retry shortly (another replica may take it)"
                .into(),
        });
    }
    let Ok(place) = gens.places.clone().try_acquire_owned() else {
        return flight.reject(Rejection {
            status: 429,
            reason: "background_queue",
            message: "Backstop holds its limit of background responses; retry shortly".into(),
        });
    };
    // The client's deadline is for this request, not for the job.
    request.deadline = None;
    as_job(&mut request);
    let writer = ResponseWriter::new(&request, id.clone(), unix_now()).queued();
    let object = writer.object("queued");
    let record = gens.record(
        &id,
        Kind::Response,
        Status::Queued,
        true,
        stored,
        None,
        body,
        Some(Bytes::from(object.to_string())),
        flight.caller.as_ref(),
    );
    // The job is registered and its runner spawned before anything is
    // awaited: a client that drops now cannot leave a record no runner has.
    let live = gens.start(&id, Vec::new());
    let (kept, was_kept) = tokio::sync::oneshot::channel();
    run_job(
        app,
        gens,
        id.clone(),
        Kind::Response,
        request,
        Writer::Responses(Box::new(writer)),
        live,
        place,
        Some((record, kept)),
        flight.caller.clone(),
    );
    if let Ok(Err(e)) | Err(e) = was_kept.await.map_err(|e| e.to_string()) {
        return flight.reject(Rejection {
            status: 503,
            reason: "store",
            message: format!("the background response cannot be kept: {e}"),
        });
    }
    flight.record(respond::NO_BACKEND, 200);
    drop(flight);
    if !stream {
        return json_ok(object.to_string().into_bytes());
    }
    match gens.tail(&id, None).await {
        Ok(Some(tail)) => sse_response(
            Body::new(StreamBody::new(tail)),
            Served::NONE,
            &Headers::new(),
            false,
        ),
        _ => ServerError::Store("the stream's log cannot be read".into()).into_response(),
    }
}

/// A job runs as a stream (whatever the client asked), with its usage, so
/// that its events can be followed, resumed and continued.
fn as_job(request: &mut Request) {
    request.chat.stream = Some(true);
    request.chat.stream_options = Some(backstop_adapter::chat::StreamOptions {
        include_usage: Some(true),
        extra: Default::default(),
    });
}

/// A job's record to keep first, and whom to tell it is kept.
type Keep = (Record, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Runs a background job (or a stream taken over) when a runner is free:
/// its stream, from the first backend that answers, or its failure as
/// events. With `keep`, its
/// record is kept first (and the job ends there if it cannot be). Its
/// tokens count for `caller`.
#[allow(clippy::too_many_arguments)]
fn run_job(
    app: &Arc<App>,
    gens: &Arc<Generations>,
    id: String,
    kind: Kind,
    request: Request,
    writer: Writer,
    live: Arc<Live>,
    place: tokio::sync::OwnedSemaphorePermit,
    keep: Option<Keep>,
    caller: Option<crate::auth::Caller>,
) {
    let (app, gens) = (app.clone(), gens.clone());
    tokio::spawn(async move {
        let _place = place;
        if let Some((record, kept)) = keep {
            let inserted = gens.at_once(gens.store.insert(record)).await.map(|_| ());
            let failed = inserted.is_err();
            let _ = kept.send(inserted.map_err(|e| e.to_string()));
            if failed {
                gens.forget(&id);
                return;
            }
        }
        // A job cancelled before it starts (queued, or waiting for its
        // first backend) stops there.
        let start = async {
            let runner = gens.runners.clone().acquire_owned().await.ok()?;
            let flight = InFlight::detached(app.clone(), caller);
            Some((
                runner,
                start_stream(&app, &request, flight, writer, false).await,
            ))
        };
        let started = tokio::select! {
            started = start => started,
            () = live.cancelled() => None,
        };
        let (_runner, frames) = match started {
            None => (None, futures_util::stream::empty().boxed()),
            Some((runner, Ok(started))) => (Some(runner), started.detach().1),
            Some((runner, Err((e, flight, mut writer)))) => {
                let error = ServerError::from(e).to_body();
                drop(flight);
                let mut out = Vec::new();
                let _ = writer.fail(&error, &mut out);
                let frames = futures_util::stream::once(async move { Bytes::from(out) }).boxed();
                (Some(runner), frames)
            }
        };
        let _ = gens.pump(id, kind, live, frames, true).await;
    });
}

/// A request that continues a conversation (`previous_response_id`), with
/// the earlier turns' input and output before its own input; the body as
/// kept, so that the next turn needs only this one.
async fn with_history(
    gens: &Generations,
    request: Request,
    body: Bytes,
    caller: Option<&Caller>,
) -> Result<(Request, Bytes), ServerError> {
    let previous = request
        .api
        .responses()
        .and_then(|r| r.fields.get("previous_response_id"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(previous) = previous else {
        return Ok((request, body));
    };
    let bad = |message: String| {
        ServerError::Invalid(backstop_adapter::InvalidRequest {
            message,
            param: Some("previous_response_id".into()),
        })
    };
    let record = match gens.get(&previous).await {
        Ok(Some(r)) if r.kind == Kind::Response && visible(&r, caller) => r,
        Ok(_) => {
            return Err(bad(format!(
                "Previous response with id '{previous}' not found."
            )))
        }
        Err(e) => return Err(ServerError::Store(e.to_string())),
    };
    let object: Value = serde_json::from_slice(&gens.object(&record).await).unwrap_or_default();
    if !Status::parse(object["status"].as_str().unwrap_or_default()).is_some_and(Status::is_final)
        || object["status"] == "failed"
        || object["status"] == "cancelled"
    {
        return Err(bad(format!(
            "Previous response '{previous}' has not finished with an answer"
        )));
    }
    let earlier: Value = serde_json::from_slice(&record.request).unwrap_or_default();
    let mut body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut input = items(&earlier["input"]);
    input.extend(
        object["output"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| matches!(i["type"].as_str(), Some("message" | "function_call")))
            .cloned(),
    );
    input.extend(items(&body["input"]));
    body["input"] = Value::Array(input);
    let bytes = Bytes::from(body.to_string());
    let mut expanded = Request::parse_responses(&bytes).map_err(ServerError::Invalid)?;
    expanded.deadline = request.deadline;
    expanded.region = request.region.clone();
    Ok((expanded, bytes))
}

/// An `input` as items: a text is one user message.
fn items(input: &Value) -> Vec<Value> {
    match input {
        Value::String(text) => vec![json!({"type": "message", "role": "user", "content": text})],
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    }
}

/// `GET /v1/responses/{id}` query.
#[derive(Deserialize)]
pub(crate) struct Retrieve {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    starting_after: Option<u64>,
}

/// `GET /v1/responses/{id}`: the response as it stands; with
/// `stream=true`, its events after `starting_after` (all of them without),
/// followed live while it runs.
pub(crate) async fn retrieve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(query): Query<Retrieve>,
    caller: Option<Extension<Caller>>,
) -> Result<Response<Body>, ServerError> {
    let caller = caller.map(|Extension(c)| c);
    let (gens, record) = find(&app, &id, caller.as_ref()).await?;
    if query.stream != Some(true) {
        return Ok(json_ok(gens.object(&record).await.to_vec()));
    }
    match gens.tail(&id, query.starting_after).await {
        Ok(Some(tail)) => Ok(sse_response(
            Body::new(StreamBody::new(tail)),
            Served::NONE,
            &Headers::new(),
            false,
        )),
        Ok(None) => Err(ServerError::UnknownResponse(id)),
        Err(e) => Err(ServerError::Store(e.to_string())),
    }
}

/// `POST /v1/responses/{id}/cancel`: stops a background response that is
/// queued or running; a cancelled one is returned as it is; any other is
/// a 400, as OpenAI answers.
pub(crate) async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
) -> Result<Response<Body>, ServerError> {
    let caller = caller.map(|Extension(c)| c);
    let (gens, record) = find(&app, &id, caller.as_ref()).await?;
    if !record.background {
        return Err(ServerError::NotCancellable(
            "Only responses created with background=true can be cancelled.".into(),
        ));
    }
    match record.status {
        Status::Cancelled => {}
        status if status.is_final() => {
            return Err(ServerError::NotCancellable(format!(
                "Cannot cancel a response with status '{}'.",
                status.as_str()
            )))
        }
        _ => match gens.live(&id) {
            Some(live) => {
                live.cancel();
                gens.ended(&live).await;
            }
            None => {
                let object = restatus(&gens.object(&record).await, Status::Cancelled);
                gens.at_once(gens.store.update(&id, Status::Cancelled, Some(object)))
                    .await
                    .map_err(|e| ServerError::Store(e.to_string()))?;
            }
        },
    }
    let (gens, record) = find(&app, &id, caller.as_ref()).await?;
    Ok(json_ok(gens.object(&record).await.to_vec()))
}

/// `DELETE /v1/responses/{id}`: stops it if it runs, and deletes it.
pub(crate) async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
) -> Result<Response<Body>, ServerError> {
    let caller = caller.map(|Extension(c)| c);
    let (gens, _) = find(&app, &id, caller.as_ref()).await?;
    if let Some(live) = gens.live(&id) {
        live.cancel();
        gens.ended(&live).await;
    }
    gens.at_once(gens.store.delete(&id))
        .await
        .map_err(|e| ServerError::Store(e.to_string()))?;
    let body = json!({"id": id, "object": "response", "deleted": true});
    Ok(json_ok(body.to_string().into_bytes()))
}

/// `GET /v1/responses/{id}/input_items` query.
#[derive(Deserialize)]
pub(crate) struct ListItems {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    order: Option<String>,
    #[serde(default)]
    after: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: the input the response was made
/// from (earlier turns included), newest first unless `order=asc`, a page
/// of `limit` (20) after the item `after`.
pub(crate) async fn input_items(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(query): Query<ListItems>,
    caller: Option<Extension<Caller>>,
) -> Result<Response<Body>, ServerError> {
    let caller = caller.map(|Extension(c)| c);
    let (_, record) = find(&app, &id, caller.as_ref()).await?;
    let request: Value = serde_json::from_slice(&record.request).unwrap_or_default();
    let mut all: Vec<Value> = items(&request["input"])
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            if item.get("type").is_none() {
                item["type"] = json!("message");
            }
            if item.get("id").is_none() {
                item["id"] = json!(format!("msg_{}_in{i}", id.trim_start_matches("resp_")));
            }
            if let Some(text) = item.get("content").and_then(Value::as_str) {
                item["content"] = json!([{"type": "input_text", "text": text}]);
            }
            item
        })
        .collect();
    if query.order.as_deref() != Some("asc") {
        all.reverse();
    }
    let start = match &query.after {
        Some(after) => all
            .iter()
            .position(|i| i["id"].as_str() == Some(after))
            .map_or(all.len(), |p| p + 1),
        None => 0,
    };
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    let page: Vec<Value> = all.iter().skip(start).take(limit).cloned().collect();
    let body = json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|i| i["id"].clone()),
        "last_id": page.last().map(|i| i["id"].clone()),
        "has_more": start + page.len() < all.len(),
    });
    Ok(json_ok(body.to_string().into_bytes()))
}

/// Takes over, at start and then every second (or half a lease), the unfinished
/// generations nobody runs ([`backstop_store::Store::claim`]): those the
/// last run left, and those of a replica that is gone. A queued job runs; a
/// running response or keyed chat stream goes on from the text it had
/// made, through the targets' prefill continuation, under the same id and
/// numbering; a keyed whole chat nobody was answered is made again; one
/// that cannot go on (a tool call under way) ends `failed` with the reason
/// in its log.
pub(crate) async fn recover(app: &Arc<App>) {
    let Some(gens) = app.generations.clone() else {
        return;
    };
    let claimed = match gens.store.claim().await {
        Ok(claimed) => claimed,
        Err(e) => {
            tracing::error!("cannot claim the store's unfinished generations: {e}");
            return;
        }
    };
    if !claimed.is_empty() {
        tracing::info!(
            "finishing {} generations that nobody runs (left by the last run, or by a replica that is gone)",
            claimed.len()
        );
    }
    for record in claimed {
        let events: Vec<Bytes> = match gens.store.events(&record.id, None).await {
            Ok(e) => e.into_iter().map(|(_, e)| e).collect(),
            Err(e) => {
                tracing::error!(id = record.id, "cannot read a generation's log: {e}");
                continue;
            }
        };
        resume(app, &gens, record, events);
    }
}

/// Runs [`recover`] every `every`: a replica that is gone leaves its
/// generations to the first survivor that claims them once its leases run
/// out.
pub(crate) fn spawn_takeover(app: Arc<App>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await; // the first claim was made at start
        loop {
            every.tick().await;
            recover(&app).await;
        }
    })
}

/// Goes on with one unfinished generation (see [`recover`]).
fn resume(app: &Arc<App>, gens: &Arc<Generations>, record: Record, events: Vec<Bytes>) {
    let id = record.id.clone();
    // Its tokens count for the identity that made it, if it still exists.
    let caller = record
        .owner
        .as_deref()
        .and_then(|name| app.snapshot().auth.as_ref()?.caller(name));
    let request = match record.kind {
        Kind::Response => Request::parse_responses(&record.request),
        Kind::Chat => Request::parse_chat(&record.request),
    };
    let mut request = match request {
        Ok(request) => request,
        Err(e) => {
            let error = json!({"error": {"message": format!("The Backstop answering this stopped, and its request cannot be read again: {}", e.message), "type": "server_error", "code": "restarted"}});
            let mut out = Vec::new();
            let _ = backstop_adapter::sse::encode_json(&error, &mut out);
            let live = gens.start(&id, events);
            return pump_once(gens, id, record.kind, live, out);
        }
    };
    if record.kind == Kind::Chat && !request.chat.is_stream() {
        // A whole answer nobody has seen yet: made again, and kept for the
        // client that asks with its key.
        let (app, gens) = (app.clone(), gens.clone());
        tokio::spawn(async move {
            let flight = InFlight::detached(app.clone(), caller);
            let _ = crate::completions::answer_whole(&app, &gens, &id, &request, flight).await;
        });
        return;
    }
    let mut writer = match record.kind {
        Kind::Response => {
            as_job(&mut request);
            let writer = ResponseWriter::new(&request, id.clone(), record.created_at);
            Writer::Responses(Box::new(if record.background {
                writer.queued()
            } else {
                writer
            }))
        }
        Kind::Chat => Writer::Chat(ChatWriter::default()),
    };
    let live = gens.start(&id, events.clone());
    if ends(record.kind, &events) {
        // Only its end was not recorded: it is recorded as it stands.
        return pump_once(gens, id, record.kind, live, Vec::new());
    }
    let said: Vec<Value> = events.iter().filter_map(|e| event_json(e)).collect();
    let text = match &mut writer {
        Writer::Responses(w) => w.resume(&said),
        Writer::Chat(w) => w.resume(&said),
        Writer::Legacy => None,
    };
    let whole = matches!(&writer, Writer::Chat(w) if w.finished());
    let text = match text {
        Some(text) if !whole => text,
        text => {
            let mut out = Vec::new();
            if text.is_some() {
                // The answer is whole; only its end was not sent.
                let _ = writer.end(&mut out);
            } else {
                let error = json!({"error": {"message": "The Backstop answering this stopped during a tool call (or with several choices), which cannot be continued", "type": "server_error", "code": "restarted"}});
                let _ = writer.fail(&error, &mut out);
            }
            return pump_once(gens, id, record.kind, live, out);
        }
    };
    if !text.is_empty() {
        tracing::info!(
            id,
            "continuing a generation from its {} bytes of text",
            text.len()
        );
        request.prefill = Some(text);
    }
    // Every unfinished generation gets its turn, however many there are.
    let (app, gens) = (app.clone(), gens.clone());
    let kind = record.kind;
    tokio::spawn(async move {
        if let Ok(place) = gens.places.clone().acquire_owned().await {
            run_job(
                &app, &gens, id, kind, request, writer, live, place, None, caller,
            );
        }
    });
}

/// Runs a generation whose last events are `out`.
fn pump_once(gens: &Arc<Generations>, id: String, kind: Kind, live: Arc<Live>, out: Vec<u8>) {
    let frames = match out.is_empty() {
        true => futures_util::stream::empty().boxed(),
        false => futures_util::stream::once(async move { Bytes::from(out) }).boxed(),
    };
    gens.pump(id, kind, live, frames, false);
}
