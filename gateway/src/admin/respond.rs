//! What the admin routes share: reading a request body, checking the method, and answering
//! in JSON (errors as the gateway's usual `{"error", "detail"}`).

use http::{Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;

use crate::reply::{ErrorCode, Refusal};

/// Largest request body the admin API reads.
pub(super) const MAX_BODY_BYTES: usize = 64 * 1024;

/// The answer when a change could not be stored: it was not made.
pub(super) fn store_failed(why: &str) -> Refusal {
    tracing::error!(error = why, "the store failed");
    Refusal::new(
        ErrorCode::StorageUnavailable,
        "the change could not be stored durably, so it was not made; see the gateway log",
    )
}

/// Reads a request body of at most [`MAX_BODY_BYTES`].
pub(super) async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Refusal> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(Refusal::new(
                        ErrorCode::BodyTooLarge,
                        format!("admin request bodies are limited to {MAX_BODY_BYTES} bytes"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(Refusal::bad_request(format!(
                    "cannot read the request body: {e}"
                )))
            }
        }
    }
}

/// Refuses (405) a method the route does not take.
pub(super) fn only(method: &Method, allowed: &[Method]) -> Result<(), Refusal> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(method_not_allowed(allowed))
    }
}

/// The 405 answer, naming the methods the route takes.
pub(super) fn method_not_allowed(allowed: &[Method]) -> Refusal {
    let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    Refusal::new(
        ErrorCode::MethodNotAllowed,
        format!("this route accepts {}", names.join(", ")),
    )
}

/// The 404 answer for an agent that is not registered.
pub(super) fn no_agent(id: &str) -> Refusal {
    Refusal::new(
        ErrorCode::NotFound,
        format!("no agent {id:?} is registered"),
    )
}

/// `value` as a JSON answer with `status` (`{}` if it cannot be serialized).
pub(super) fn json<T: serde::Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    response(status, body)
}

/// An answer without a body (e.g. 204 after a removal), still `no-store`.
pub(super) fn empty(status: StatusCode) -> Response<Vec<u8>> {
    response(status, Vec::new())
}

/// A refusal as an answer (with `WWW-Authenticate` on 401).
pub(super) fn refusal_response(refusal: &Refusal) -> Response<Vec<u8>> {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = response(status, refusal.body().to_vec());
    if refusal.status == 401 {
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
        );
    }
    r
}

/// An answer with its length, its type when it has a body, and `no-store`.
pub(super) fn response(status: StatusCode, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let len = r.body().len();
    let headers = r.headers_mut();
    if len > 0 {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}
