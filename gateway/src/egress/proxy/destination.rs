//! Step 2 for a request: where it goes — the tunnel's origin for intercepted HTTPS (a request
//! naming another host is refused), the absolute URL for plain proxy requests.

use pingora::proxy::Session;

use crate::egress::intercept::Tunnel;
use crate::reply::{ErrorCode, Refusal};
use crate::target::{Scheme, Target};

/// Where the request goes, and its path (with query): the tunnel's origin for intercepted
/// HTTPS, the absolute URL for plain proxy requests.
pub(super) fn request_target(session: &Session) -> Result<(Target, String), Refusal> {
    let tunnel = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|ssl| ssl.extension.get::<Tunnel>());
    let req = session.req_header();
    match tunnel {
        Some(tunnel) => {
            // Inside a tunnel the origin is fixed by the CONNECT; a Host header (or h2
            // :authority) naming another host is a request meant for someone else.
            let named = req
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    req.headers
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                });
            if let Some(named) = named {
                let agrees = Target::from_url_authority(Scheme::Https, &named)
                    .map(|t| t.host == tunnel.target.host && t.port == tunnel.target.port)
                    .unwrap_or(false);
                if !agrees {
                    return Err(Refusal::new(
                        ErrorCode::MisdirectedRequest,
                        format!(
                            "this tunnel leads to {}; the request names {:?}",
                            tunnel.target.host_header(),
                            crate::target::redacted(&named)
                        ),
                    ));
                }
            }
            let path = req
                .uri
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            Ok((tunnel.target.clone(), path))
        }
        None => {
            // pingora keeps the absolute-form target as sent in raw_path(); `uri` holds only
            // its path.
            let raw = String::from_utf8_lossy(req.raw_path());
            let uri: http::Uri = raw.parse().map_err(|_| {
                Refusal::bad_request(
                    crate::target::TargetError::NotAbsolute(crate::target::redacted(&raw))
                        .to_string(),
                )
            })?;
            let scheme = match uri.scheme_str() {
                Some(s) if s.eq_ignore_ascii_case("http") => Scheme::Http,
                Some(s) if s.eq_ignore_ascii_case("https") => Scheme::Https,
                Some(other) => {
                    return Err(Refusal::bad_request(
                        crate::target::TargetError::BadScheme(other.to_string()).to_string(),
                    ))
                }
                None => {
                    return Err(Refusal::bad_request(
                        crate::target::TargetError::NotAbsolute(crate::target::redacted(
                            &uri.to_string(),
                        ))
                        .to_string(),
                    ))
                }
            };
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let target = Target::from_url_authority(scheme, authority)
                .map_err(|e| Refusal::bad_request(e.to_string()))?;
            let path = uri
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            Ok((target, path))
        }
    }
}
