//! Identity providers: where tokens come from, one protocol each.

use std::time::{Duration, Instant, SystemTime};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use pingora::connectors::http::Connector;

use super::{Secret, Token};
use crate::client::{self, ClientError};
use crate::config::{IdentityProviderConfig, SecretSource};

/// The instance metadata service's token endpoint.
const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// Lifetime assumed for a token whose response names none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// One configured identity provider, its secrets read.
pub enum Provider {
    /// OAuth 2.0 client credentials.
    ClientCredentials {
        /// What credential rules and agents call it (`identity_providers.name`).
        name: String,
        /// Where tokens are asked for (POST, form-encoded).
        token_url: String,
        /// The gateway's client id at the token endpoint.
        client_id: String,
        /// The gateway's client secret, sent only to `token_url`.
        client_secret: Secret,
        /// `scope` or `resource`.
        audience_param: String,
    },
    /// The Azure managed-identity endpoint.
    ManagedIdentity {
        /// What credential rules and agents call it (`identity_providers.name`).
        name: String,
        /// The managed-identity endpoint's URL.
        endpoint: String,
        /// `api-version`.
        api_version: String,
        /// A user-assigned identity.
        client_id: Option<String>,
        /// `X-IDENTITY-HEADER` (IDENTITY_ENDPOINT variant); `Metadata: true` otherwise.
        identity_header: Option<Secret>,
    },
    /// A fixed token.
    Static {
        /// What credential rules and agents call it (`identity_providers.name`).
        name: String,
        /// The token.
        token: Secret,
        /// Lifetime of each hand-out.
        lifetime: Duration,
    },
}

/// Reads a secret from its file or environment variable.
pub fn read_secret(source: &SecretSource, what: &str) -> Result<Secret, String> {
    let value = match (&source.file, &source.env) {
        (Some(path), None) => crate::datadir::read_secret(path)
            .map_err(|e| format!("{what}: {e}"))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| format!("{what}: environment variable {var} is not set"))?
            .trim()
            .to_string(),
        _ => return Err(format!("{what}: give exactly one of file or env")),
    };
    if value.is_empty() {
        return Err(format!("{what}: the secret is empty"));
    }
    Ok(Secret::new(value))
}

impl Provider {
    /// Resolves a provider from its config: secrets are read now, so a missing secret stops
    /// start-up instead of failing the first request.
    pub fn from_config(config: &IdentityProviderConfig) -> Result<Provider, String> {
        let what = |field: &str| format!("identity provider {:?} {field}", config.name());
        Ok(match config {
            IdentityProviderConfig::ClientCredentials {
                name,
                token_url,
                client_id,
                client_secret,
                audience_param,
            } => Provider::ClientCredentials {
                name: name.clone(),
                token_url: token_url.clone(),
                client_id: client_id.clone(),
                client_secret: read_secret(client_secret, &what("client_secret"))?,
                audience_param: audience_param.clone(),
            },
            IdentityProviderConfig::ManagedIdentity {
                name,
                endpoint,
                api_version,
                client_id,
                identity_header,
            } => {
                let from_env = std::env::var("IDENTITY_ENDPOINT").ok();
                let header = match identity_header {
                    Some(source) => Some(read_secret(source, &what("identity_header"))?),
                    None if endpoint.is_none() && from_env.is_some() => {
                        std::env::var("IDENTITY_HEADER").ok().map(Secret::new)
                    }
                    None => None,
                };
                let endpoint = endpoint
                    .clone()
                    .or(from_env)
                    .unwrap_or_else(|| IMDS_ENDPOINT.to_string());
                let default_version = if header.is_some() {
                    "2019-08-01"
                } else {
                    "2018-02-01"
                };
                Provider::ManagedIdentity {
                    name: name.clone(),
                    endpoint,
                    api_version: api_version
                        .clone()
                        .unwrap_or_else(|| default_version.into()),
                    client_id: client_id.clone(),
                    identity_header: header,
                }
            }
            IdentityProviderConfig::Static {
                name,
                token,
                expires_in_secs,
            } => Provider::Static {
                name: name.clone(),
                token: read_secret(token, &what("token"))?,
                lifetime: Duration::from_secs(*expires_in_secs),
            },
        })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        match self {
            Provider::ClientCredentials { name, .. }
            | Provider::ManagedIdentity { name, .. }
            | Provider::Static { name, .. } => name,
        }
    }

    /// Obtains a token for `audience`.
    pub async fn fetch(
        &self,
        audience: &str,
        connector: &Connector,
        timeout: Duration,
    ) -> Result<Token, FetchError> {
        let encode = |v: &str| utf8_percent_encode(v, NON_ALPHANUMERIC).to_string();
        let body = match self {
            Provider::Static {
                token, lifetime, ..
            } => {
                return Ok(Token {
                    value: token.clone(),
                    expires_at: Instant::now() + *lifetime,
                })
            }
            Provider::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                audience_param,
                ..
            } => {
                let form = format!(
                    "grant_type=client_credentials&client_id={}&client_secret={}&{audience_param}={}",
                    encode(client_id),
                    encode(client_secret.expose()),
                    encode(audience)
                );
                let request = client::Request {
                    method: "POST",
                    url: token_url,
                    headers: Vec::new(),
                    body: Some(("application/x-www-form-urlencoded".into(), form.into())),
                };
                fetch(connector, request, timeout).await?
            }
            Provider::ManagedIdentity {
                endpoint,
                api_version,
                client_id,
                identity_header,
                ..
            } => {
                // The managed-identity protocol takes a resource URI, not a v2 scope.
                let resource = audience.strip_suffix("/.default").unwrap_or(audience);
                let mut url = format!(
                    "{endpoint}?api-version={}&resource={}",
                    encode(api_version),
                    encode(resource)
                );
                if let Some(client_id) = client_id {
                    url.push_str(&format!("&client_id={}", encode(client_id)));
                }
                let headers = match identity_header {
                    Some(secret) => vec![("x-identity-header".into(), secret.expose().to_string())],
                    None => vec![("metadata".into(), "true".to_string())],
                };
                let request = client::Request {
                    method: "GET",
                    url: &url,
                    headers,
                    body: None,
                };
                fetch(connector, request, timeout).await?
            }
        };
        parse_token_response(&body)
    }
}

/// Largest token response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why a token request failed. The messages name the kind of failure only: never the
/// secret sent, never the endpoint's body.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    /// The endpoint gave no answer (bad URL, unresolvable, unreachable, too slow).
    #[error("the token endpoint {0}")]
    NoAnswer(&'static str),
    /// A non-2xx status.
    #[error("the token endpoint answered HTTP {0}")]
    Status(u16),
    /// A 2xx answer without a usable token.
    #[error("the token endpoint's answer holds no usable token")]
    BadResponse,
    /// The provider is misconfigured or a secret is missing.
    #[error("{0}")]
    Config(String),
}

impl From<ClientError> for FetchError {
    fn from(e: ClientError) -> Self {
        FetchError::NoAnswer(match e {
            ClientError::BadRequest => "URL is invalid",
            ClientError::Unresolvable => "host cannot be resolved",
            ClientError::Unreachable => "cannot be reached",
            ClientError::Timeout => "did not answer in time",
            ClientError::TooLarge => "answered with too much data",
        })
    }
}

/// Sends a token request and returns the 2xx body.
async fn fetch(
    connector: &Connector,
    request: client::Request<'_>,
    timeout: Duration,
) -> Result<bytes::Bytes, FetchError> {
    let (status, body) = client::send(connector, request, timeout, MAX_RESPONSE_BYTES).await?;
    if !(200..300).contains(&status) {
        return Err(FetchError::Status(status));
    }
    Ok(body)
}

/// Reads `access_token` and its lifetime (`expires_in`, a number or a string, or the
/// managed-identity `expires_on` epoch seconds) from a token response.
pub fn parse_token_response(body: &[u8]) -> Result<Token, FetchError> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| FetchError::BadResponse)?;
    let value = json
        .get("access_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or(FetchError::BadResponse)?;
    let number = |key: &str| -> Option<u64> {
        match json.get(key)? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    };
    let lifetime = match (number("expires_in"), number("expires_on")) {
        (Some(secs), _) => Duration::from_secs(secs),
        (None, Some(epoch)) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Duration::from_secs(epoch.saturating_sub(now))
        }
        (None, None) => DEFAULT_LIFETIME,
    };
    Ok(Token {
        value: Secret::new(value.to_string()),
        expires_at: Instant::now() + lifetime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses_of_both_protocols_parse() {
        let entra = parse_token_response(
            br#"{"token_type":"Bearer","expires_in":3599,"access_token":"abc"}"#,
        )
        .unwrap();
        assert_eq!(entra.value.expose(), "abc");
        let left = entra.expires_at - Instant::now();
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3599));
        let mi =
            parse_token_response(br#"{"access_token":"xyz","expires_in":"86399","resource":"r"}"#)
                .unwrap();
        assert!(mi.expires_at - Instant::now() > Duration::from_secs(86000));
        for bad in [
            &b"not json"[..],
            br#"{"expires_in":1}"#,
            br#"{"access_token":""}"#,
        ] {
            assert_eq!(
                parse_token_response(bad).unwrap_err(),
                FetchError::BadResponse
            );
        }
    }

    #[test]
    fn secrets_come_from_files_or_the_environment_and_never_show_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t-value\n").unwrap();
        let secret = read_secret(
            &SecretSource {
                file: Some(path),
                env: None,
            },
            "x",
        )
        .unwrap();
        assert_eq!(secret.expose(), "s3cr3t-value");
        assert!(!format!("{secret:?}").contains("s3cr3t"));
        let missing = read_secret(
            &SecretSource {
                file: None,
                env: Some("TOLLGATE_TEST_UNSET_VAR".into()),
            },
            "x",
        );
        assert!(missing.unwrap_err().contains("TOLLGATE_TEST_UNSET_VAR"));
    }
}
