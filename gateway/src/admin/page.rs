//! The approvers' web page (`ui/approvals.html`): static, served without a token.

use http::Response;

/// The approvers' page. It is served without a token because it contains nothing but code;
/// the data it shows comes from the token-guarded routes. Its policy forbids loading or
/// sending anything anywhere but this listener.
pub(super) fn approvals_page() -> Response<Vec<u8>> {
    let mut response = Response::new(include_str!("ui/approvals.html").as_bytes().to_vec());
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-type", "text/html; charset=utf-8"),
        (
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
        ),
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    let len = response.body().len();
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, len.into());
    response
}
