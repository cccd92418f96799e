//! The gateway's state for operators: `/metrics` (Prometheus text) and `/readyz`.

use http::{Response, StatusCode};

use crate::reply::{ErrorCode, Refusal};

use super::respond::json;
use super::AdminApi;

impl AdminApi {
    /// `/metrics`: the Prometheus text, gauges read now.
    pub(super) fn metrics_text(&self) -> Response<Vec<u8>> {
        let mut response = Response::new(self.metrics.render(&self.gauges.read()).into_bytes());
        let len = response.body().len();
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        headers.insert(http::header::CONTENT_LENGTH, len.into());
        response
    }

    /// `/readyz`: ready once the listeners are bound, unless the store cannot write.
    pub(super) fn readiness(&self) -> Result<Response<Vec<u8>>, Refusal> {
        if let Some(why) = self.store.write_failure() {
            return Err(Refusal::new(
                ErrorCode::StorageUnavailable,
                format!(
                    "the store cannot write ({why}); requests are refused until it \
                     takes writes again (it is reopened every {} s)",
                    crate::observe::audit::REOPEN_INTERVAL.as_secs()
                ),
            ));
        }
        if self.ready.load(std::sync::atomic::Ordering::Acquire) {
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "status": "ready" }),
            ))
        } else {
            Err(Refusal::new(
                ErrorCode::NotReady,
                "the gateway is still starting",
            ))
        }
    }
}
