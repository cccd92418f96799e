//! The sandbox service's HTTP API (described for clients in `openapi.json`, served at
//! `/v1/openapi.json`). Every route but `/healthz` and the description needs
//! `Authorization: Bearer <token>`, compared in constant time.
//!
//! | route | does |
//! |---|---|
//! | `GET /healthz` | liveness, no authentication |
//! | `GET /v1/openapi.json` | the API's OpenAPI description, no authentication |
//! | `GET /v1/sessions?agent=` | the sessions (of one agent) |
//! | `PUT /v1/sessions/{agent}/{thread}` | create the session (201) or return it (200) |
//! | `GET /v1/sessions/{agent}/{thread}` | one session |
//! | `DELETE /v1/sessions/{agent}/{thread}` | end it and delete its files (204) |
//! | `POST /v1/sessions/{agent}/{thread}/exec` | run an execution: one JSON answer, or `?stream=ndjson` / `?stream=sse` |
//! | `POST /v1/sessions/{agent}/{thread}/python` | run Python code in the session's persistent interpreter, answered the same ways |
//! | `GET /v1/sessions/{agent}/{thread}/files?path=` | download a file |
//! | `PUT /v1/sessions/{agent}/{thread}/files?path=` | upload a file (201) |
//! | `GET /v1/sessions/{agent}/{thread}/files/list?path=` | a directory's entries |

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use subtle::ConstantTimeEq;

use super::error::ServiceError;
use super::exec::{self, ExecRequest, MAX_EXEC_REQUEST_BYTES};
use super::session::{SessionKey, SessionState};
use super::sessions::{Session, Sessions};

/// The API's OpenAPI description.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What every handler shares.
pub struct Api {
    /// Every session, and what starting their sandboxes needs.
    pub sessions: Arc<Sessions>,
    /// The bearer token every `/v1/sessions` route needs (compared in constant time).
    pub token: String,
}

/// The API's routes: `/healthz` and `/v1/openapi.json` open, the sessions behind the token.
pub fn router(api: Arc<Api>) -> Router {
    let max_file = usize::try_from(api.sessions.context.config.max_file_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(64 << 10);
    let authenticated = Router::new()
        .route("/v1/sessions", get(list))
        .route(
            "/v1/sessions/{agent}/{thread}",
            get(show).put(open).delete(remove),
        )
        .route(
            "/v1/sessions/{agent}/{thread}/exec",
            post(execute).layer(axum::extract::DefaultBodyLimit::max(MAX_EXEC_REQUEST_BYTES)),
        )
        .route(
            "/v1/sessions/{agent}/{thread}/python",
            post(python).layer(axum::extract::DefaultBodyLimit::max(MAX_EXEC_REQUEST_BYTES)),
        )
        .route(
            "/v1/sessions/{agent}/{thread}/files",
            get(download)
                .put(upload)
                .layer(axum::extract::DefaultBodyLimit::max(max_file)),
        )
        .route("/v1/sessions/{agent}/{thread}/files/list", get(listing))
        .route_layer(middleware::from_fn_with_state(api.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({"ok": true})) }))
        .route(
            "/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .merge(authenticated)
        .fallback(|uri: Uri| async move {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": "not_found", "detail": format!("no route for {}", uri.path())})),
            )
        })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(serde_json::json!({"error": "method_not_allowed", "detail": "this route does not take that method"})),
            )
        })
        .with_state(api)
}

async fn authenticate(
    State(api): State<Arc<Api>>,
    request: Request,
    next: Next,
) -> Result<Response, ServiceError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(api.token.as_bytes())) {
        tracing::info!(path = %request.uri().path(), "unauthenticated call refused");
        return Err(ServiceError::Unauthorized);
    }
    Ok(next.run(request).await)
}

/// The session named by the path's `{agent}/{thread}`, checked.
struct Named(SessionKey);

impl<S: Send + Sync> FromRequestParts<S> for Named {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let Path((agent, thread)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ServiceError::BadRequest(e.body_text()))?;
        SessionKey::new(&agent, &thread).map(Named)
    }
}

/// A query parameter, percent-decoded.
fn query_param(uri: &Uri, name: &str) -> Result<Option<String>, ServiceError> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            let value = value.replace('+', " ");
            return percent_encoding::percent_decode_str(&value)
                .decode_utf8()
                .map(|v| Some(v.into_owned()))
                .map_err(|_| ServiceError::BadRequest(format!("{name} is not UTF-8")));
        }
    }
    Ok(None)
}

/// The session as the API shows it.
async fn view(session: &Session) -> serde_json::Value {
    let dir = session.dir.clone();
    let disk_bytes = tokio::task::spawn_blocking(move || dir.disk_use())
        .await
        .unwrap_or(0);
    let executing = session.exec.try_lock().is_err();
    let life = session.life.lock().await;
    let r = &life.record;
    serde_json::json!({
        "agent": r.agent,
        "thread": r.thread,
        "state": match r.state { SessionState::Running => "running", SessionState::Stopped => "stopped" },
        "backend": r.backend.to_string(),
        "created_at": r.created_at,
        "last_used_at": r.last_used_at,
        "executions": r.executions,
        "executing": executing,
        "disk_bytes": disk_bytes,
    })
}

async fn list(State(api): State<Arc<Api>>, uri: Uri) -> Result<Response, ServiceError> {
    let agent = query_param(&uri, "agent")?;
    let mut sessions = Vec::new();
    for session in api.sessions.list(agent.as_deref()) {
        sessions.push(view(&session).await);
    }
    Ok(Json(serde_json::json!({ "sessions": sessions })).into_response())
}

async fn show(State(api): State<Arc<Api>>, Named(key): Named) -> Result<Response, ServiceError> {
    let session = api.sessions.get(&key)?;
    Ok(Json(view(&session).await).into_response())
}

async fn open(State(api): State<Arc<Api>>, Named(key): Named) -> Result<Response, ServiceError> {
    let (session, created) = api.sessions.open(&key).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&session).await)).into_response())
}

async fn remove(State(api): State<Arc<Api>>, Named(key): Named) -> Result<Response, ServiceError> {
    api.sessions.delete(&key).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// How the caller wants an execution answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Json,
    Ndjson,
    Sse,
}

fn answer_mode(uri: &Uri, headers: &HeaderMap) -> Result<Answer, ServiceError> {
    match query_param(uri, "stream")?.as_deref() {
        Some("ndjson") => return Ok(Answer::Ndjson),
        Some("sse") => return Ok(Answer::Sse),
        Some(other) => {
            return Err(ServiceError::BadRequest(format!(
                "stream={other:?}: use ndjson or sse (or leave it out for one JSON answer)"
            )))
        }
        None => {}
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(if accept.contains("application/x-ndjson") {
        Answer::Ndjson
    } else if accept.contains("text/event-stream") {
        Answer::Sse
    } else {
        Answer::Json
    })
}

/// The request body as the route's `parse` reads it (its timeouts bounded by the service's).
type Parse = fn(&[u8], u64) -> Result<ExecRequest, ServiceError>;

async fn execute(
    State(api): State<Arc<Api>>,
    Named(key): Named,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ServiceError> {
    parse_and_run(&api, &key, (&uri, &headers), body, ExecRequest::parse).await
}

async fn python(
    State(api): State<Arc<Api>>,
    Named(key): Named,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ServiceError> {
    parse_and_run(
        &api,
        &key,
        (&uri, &headers),
        body,
        ExecRequest::parse_python,
    )
    .await
}

/// Reads an execution's body with `parse`, and runs it as the request asks to be answered.
async fn parse_and_run(
    api: &Arc<Api>,
    key: &SessionKey,
    (uri, headers): (&Uri, &HeaderMap),
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    parse: Parse,
) -> Result<Response, ServiceError> {
    let mode = answer_mode(uri, headers)?;
    let body = body.map_err(too_large)?;
    let request = parse(&body, api.sessions.context.config.max_timeout_secs)?;
    run_execution(api, key, mode, request).await
}

/// Runs `request` in the session `key` (one tool call), answered as `mode` asks.
async fn run_execution(
    api: &Arc<Api>,
    key: &SessionKey,
    mode: Answer,
    request: ExecRequest,
) -> Result<Response, ServiceError> {
    let session = api.sessions.get(key)?;
    let turn = session
        .exec
        .clone()
        .try_lock_owned()
        .map_err(|_| exec::busy(key))?;
    let events = exec::start(api.sessions.clone(), session, turn, request).await?;
    if mode == Answer::Json {
        let ended = exec::collect(events).await?;
        return Ok(Json(ended).into_response());
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(events).map(move |event| {
        let text = match mode {
            Answer::Sse => format!("event: {}\ndata: {}\n\n", event.name(), event.json()),
            _ => format!("{}\n", event.json()),
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(text))
    });
    let content_type = match mode {
        Answer::Sse => "text/event-stream",
        _ => "application/x-ndjson",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

fn too_large(rejection: axum::extract::rejection::BytesRejection) -> ServiceError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ServiceError::Guest {
            status: 413,
            code: "too_large".into(),
            detail: "the request body is larger than this route takes".into(),
        }
    } else {
        ServiceError::BadRequest(rejection.body_text())
    }
}

/// The guest agent's `path_and_query` for a files route.
fn files_path(route: &str, uri: &Uri) -> Result<String, ServiceError> {
    let path = query_param(uri, "path")?.unwrap_or_default();
    if route == "/files" && path.is_empty() {
        return Err(ServiceError::BadRequest(
            "name the file: ?path=<path in the workspace>".into(),
        ));
    }
    let encoded = percent_encoding::utf8_percent_encode(&path, percent_encoding::NON_ALPHANUMERIC);
    Ok(format!("{route}?path={encoded}"))
}

/// The session's guest agent for a file operation (which counts as a use).
async fn files_guest(
    api: &Api,
    key: &SessionKey,
) -> Result<(Arc<Session>, super::guest::GuestAgent), ServiceError> {
    let session = api.sessions.get(key)?;
    let guest = api.sessions.running(&session).await?;
    session.update(|r| r.touch()).await;
    Ok((session, guest))
}

async fn download(
    State(api): State<Arc<Api>>,
    Named(key): Named,
    uri: Uri,
) -> Result<Response, ServiceError> {
    let target = files_path("/files", &uri)?;
    let (_, guest) = files_guest(&api, &key).await?;
    let response = guest.send(http::Method::GET, &target, Bytes::new()).await?;
    let status = response.status();
    if !status.is_success() {
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Err(super::guest::guest_error(status.as_u16(), &bytes));
    }
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::new(response.into_body()),
    )
        .into_response())
}

async fn upload(
    State(api): State<Arc<Api>>,
    Named(key): Named,
    uri: Uri,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ServiceError> {
    let target = files_path("/files", &uri)?;
    let body = body.map_err(too_large)?;
    let (_, guest) = files_guest(&api, &key).await?;
    let size = body.len();
    guest.call(http::Method::PUT, &target, body).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "bytes": size })),
    )
        .into_response())
}

async fn listing(
    State(api): State<Arc<Api>>,
    Named(key): Named,
    uri: Uri,
) -> Result<Response, ServiceError> {
    let target = files_path("/files/list", &uri)?;
    let (_, guest) = files_guest(&api, &key).await?;
    let bytes = guest.call(http::Method::GET, &target, Bytes::new()).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}
