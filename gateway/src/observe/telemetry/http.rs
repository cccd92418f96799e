//! OTLP/HTTP over the gateway's own client (pingora's connector, rustls with ring), so that
//! telemetry needs no second HTTP stack.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError};
use pingora::connectors::http::Connector;

use crate::client;

/// Answers from a collector are small (a partial-success message at most).
const MAX_RESPONSE: usize = 1024 * 1024;

/// Sends OTLP requests; runs on the export thread's runtime.
pub(super) struct OtlpHttp {
    connector: Connector,
    timeout: Duration,
}

impl OtlpHttp {
    pub fn new(timeout: Duration) -> OtlpHttp {
        OtlpHttp {
            connector: Connector::new(None),
            timeout,
        }
    }

    /// Sends one request of the gateway's own span export; returns the collector's status.
    pub async fn send(
        &self,
        request: client::Request<'_>,
        timeout: Duration,
    ) -> Result<u16, client::ClientError> {
        let (status, _) = client::send(&self.connector, request, timeout, MAX_RESPONSE).await?;
        Ok(status)
    }
}

impl std::fmt::Debug for OtlpHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtlpHttp")
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let url = parts.uri.to_string();
        let mut content_type = Cow::Borrowed("application/x-protobuf");
        let mut headers = Vec::with_capacity(parts.headers.len());
        for (name, value) in &parts.headers {
            let Ok(value) = value.to_str() else { continue };
            if name == http::header::CONTENT_TYPE {
                content_type = Cow::Owned(value.to_string());
            } else {
                headers.push((Cow::Owned(name.as_str().to_string()), value.to_string()));
            }
        }
        let request = client::Request {
            method: parts.method.as_str(),
            url: &url,
            headers,
            body: Some((content_type, body)),
        };
        let (status, body) =
            client::send(&self.connector, request, self.timeout, MAX_RESPONSE).await?;
        Ok(http::Response::builder().status(status).body(body)?)
    }
}
