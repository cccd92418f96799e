//! Step 6 of the data path: credentials. The sandbox never holds one.
//!
//! A credential rule names destinations (host patterns and ports) and the audience a token
//! must be for. For a request to such a destination, whatever credential the sandbox sent is
//! stripped, and — if the request belongs to an open tool call — a short-lived token obtained
//! for this agent is injected. A token goes only where it cannot be read on the way or by
//! another service: over TLS (the origin's certificate verified) to one of the rule's ports.
//! A request to a covered host that does not meet this is refused whole
//! ([`Credentials::check_transport`]), whatever the policies say, and no token is ever made
//! for it. Tokens are cached in memory per (agent, tool call, provider, audience) until
//! a margin before they expire or until the tool call closes; concurrent misses fetch once; a
//! failing provider is retried with exponential backoff, not hammered. Token values live in
//! [`Secret`]s, whose `Debug` prints nothing of them, and in header values marked sensitive.

pub mod provider;
pub mod reflection;
mod rule_index;
pub mod upgraded;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};
use moka::Expiry;
use parking_lot::Mutex;
use pingora::connectors::http::Connector;
#[cfg(test)]
use tollgate_policy::target::Host;
use tollgate_policy::target::{Scheme, Target};

use self::rule_index::RuleIndex;
use crate::agent::Agent;
use crate::config::{Config, CredentialRuleConfig};
use crate::egress::toolcall::ToolCallRef;
use crate::reply::{ErrorCode, Refusal};
use provider::FetchError;
use provider::Provider;

/// A secret value (token, client secret). `Debug` shows nothing of it; there is no `Display`.
#[derive(Clone)]
pub struct Secret(Arc<SecretValue>);

struct SecretValue {
    value: Box<str>,
    /// The searcher that recognises the value in an answer ([`reflection`]), built on first
    /// use and shared by every clone: once per token, not once per request.
    finder: std::sync::OnceLock<memchr::memmem::Finder<'static>>,
    /// The searcher for the value's first two bytes, where a split value may start; built
    /// on first use like `finder`.
    start_finder: std::sync::OnceLock<memchr::memmem::Finder<'static>>,
    /// The searcher for the value with its ASCII letters lowercased, for header names: the
    /// header map holds them lowercased, while the wire may carry the origin's own case.
    lowercase_finder: std::sync::OnceLock<memchr::memmem::Finder<'static>>,
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Secret {
        Secret(Arc::new(SecretValue {
            value: value.into(),
            finder: std::sync::OnceLock::new(),
            start_finder: std::sync::OnceLock::new(),
            lowercase_finder: std::sync::OnceLock::new(),
        }))
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0.value
    }

    /// A searcher for the value.
    fn finder(&self) -> &memchr::memmem::Finder<'static> {
        self.0
            .finder
            .get_or_init(|| memchr::memmem::Finder::new(self.0.value.as_bytes()).into_owned())
    }

    /// A searcher for the value with its ASCII letters lowercased.
    fn lowercase_finder(&self) -> &memchr::memmem::Finder<'static> {
        self.0.lowercase_finder.get_or_init(|| {
            let lowercase = self.0.value.as_bytes().to_ascii_lowercase();
            memchr::memmem::Finder::new(&lowercase).into_owned()
        })
    }

    /// A searcher for the value's first two bytes (its whole value if shorter).
    fn start_finder(&self) -> &memchr::memmem::Finder<'static> {
        self.0.start_finder.get_or_init(|| {
            let value = self.0.value.as_bytes();
            memchr::memmem::Finder::new(&value[..value.len().min(2)]).into_owned()
        })
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// A token and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token.
    pub value: Secret,
    /// Its expiry.
    pub expires_at: Instant,
}

/// One credential rule, ready to match.
struct Rule {
    exact: Vec<String>,
    suffixes: Vec<String>,
    ports: Vec<u16>,
    audience: String,
    provider: Option<String>,
    header: HeaderName,
    prefix: String,
    suffix: String,
    strip: Arc<[HeaderName]>,
}

impl Rule {
    fn new(config: &CredentialRuleConfig) -> Result<Rule, String> {
        let header_name = |h: &str| {
            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("{h:?} is not a header name"))
        };
        let (prefix, suffix) = config
            .format
            .split_once("{token}")
            .ok_or_else(|| "format must contain {token}".to_string())?;
        let mut strip = vec![
            http::header::AUTHORIZATION,
            http::header::PROXY_AUTHORIZATION,
        ];
        for h in &config.strip_headers {
            strip.push(header_name(h)?);
        }
        let header = header_name(&config.header)?;
        strip.push(header.clone());
        strip.dedup();
        let (mut exact, mut suffixes) = (Vec::new(), Vec::new());
        for host in &config.hosts {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            match host.strip_prefix("*.") {
                Some(domain) => suffixes.push(format!(".{domain}")),
                None => exact.push(host),
            }
        }
        Ok(Rule {
            exact,
            suffixes,
            ports: config.ports.clone(),
            audience: config.audience.clone(),
            provider: config.provider.clone(),
            header,
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
            strip: strip.into(),
        })
    }

    /// The injection of `token` by this rule.
    fn inject(
        &self,
        token: &Secret,
        provider: String,
        on_behalf_of: bool,
    ) -> Result<Injection, Refusal> {
        let mut value =
            HeaderValue::from_str(&format!("{}{}{}", self.prefix, token.expose(), self.suffix))
                .map_err(|_| {
                    Refusal::new(
                        ErrorCode::CredentialUnavailable,
                        "the token is not a valid header value; nothing was forwarded",
                    )
                })?;
        value.set_sensitive(true);
        Ok(Injection {
            strip: self.strip.clone(),
            header: Some((self.header.clone(), value)),
            token: Some(token.clone()),
            provider,
            on_behalf_of,
        })
    }

    /// Whether a token may travel to `target` under this rule: over TLS, to one of its ports.
    fn carries_to(&self, target: &Target) -> bool {
        target.scheme == Scheme::Https && self.ports.contains(&target.port)
    }

    /// Whether the rule covers `host` (the [`RuleIndex`] answers this for the gateway; this
    /// is the plain reading it is tested against).
    #[cfg(test)]
    fn matches(&self, host: &Host) -> bool {
        let Host::Name(name) = host else {
            return false;
        };
        self.exact.iter().any(|e| e == name)
            || self.suffixes.iter().any(|s| name.ends_with(s.as_str()))
    }
}

/// What the forwarded request's headers get: sandbox credentials removed, and the token (if
/// the request belongs to a tool call) added.
#[derive(Debug)]
pub struct Injection {
    /// Headers removed from the sandbox's request (the rule's list, shared).
    pub strip: Arc<[HeaderName]>,
    /// The header carrying the token, marked sensitive.
    pub header: Option<(HeaderName, HeaderValue)>,
    /// The token itself, to recognise it in an answer that reflects it back.
    pub token: Option<Secret>,
    /// The provider the token came from (for logs; never the token), or
    /// `on-behalf-of <approver>`.
    pub provider: String,
    /// Whether the token is a person's, lent with an approval (never replaced by another
    /// on-behalf-of approval).
    pub on_behalf_of: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    agent: String,
    tool_call: u64,
    provider: String,
    audience: String,
}

struct TokenExpiry {
    margin: Duration,
}

impl Expiry<TokenKey, Arc<Token>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        token: &Arc<Token>,
        now: Instant,
    ) -> Option<Duration> {
        Some(
            token
                .expires_at
                .saturating_duration_since(now)
                .saturating_sub(self.margin),
        )
    }
}

/// When a provider may be asked again after failures.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    delay: Duration,
}

/// Why credentials could not be set up at start.
#[derive(Debug, thiserror::Error)]
#[error("credentials: {0}")]
pub struct CredentialsError(String);

/// The credential rules, the providers and the token cache.
pub struct Credentials {
    rules: Vec<Rule>,
    /// The rules by host, so finding a request's costs the same with 1 rule or 1,000.
    index: RuleIndex,
    providers: HashMap<String, Provider>,
    cache: moka::future::Cache<TokenKey, Arc<Token>>,
    connector: Connector,
    fetch_timeout: Duration,
    reflection_scan_bytes: usize,
    backoff_initial: Duration,
    backoff_max: Duration,
    backoffs: Mutex<HashMap<(String, String), Backoff>>,
    /// Tokens approvers lent for the rest of a tool call, by (agent, tool call, audience).
    lent: Mutex<HashMap<TokenKey, LentToken>>,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    reflections: AtomicU64,
}

/// Token cache and endpoint counters since start.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenCounters {
    /// Tokens served from the cache.
    pub hits: u64,
    /// Token requests that had to ask a provider (concurrent misses count once each).
    pub misses: u64,
    /// Failed requests to providers.
    pub errors: u64,
    /// Answers not relayed because they carried an injected token back.
    pub reflections: u64,
}

/// A person's token lent with an on-behalf-of approval.
struct LentToken {
    token: Secret,
    approver: String,
    until: Instant,
}

impl Credentials {
    /// Builds the rules and providers of `config`; reads every secret now.
    pub fn new(config: &Config, connector: Connector) -> Result<Credentials, CredentialsError> {
        let rules = config
            .credential_rules
            .iter()
            .enumerate()
            .map(|(n, r)| {
                Rule::new(r).map_err(|e| CredentialsError(format!("credential_rules[{n}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut providers = HashMap::new();
        for p in &config.identity_providers {
            let provider = Provider::from_config(p).map_err(CredentialsError)?;
            providers.insert(provider.name().to_string(), provider);
        }
        let c = &config.credentials;
        Ok(Credentials {
            index: RuleIndex::new(&rules),
            rules,
            providers,
            cache: moka::future::Cache::builder()
                .max_capacity(c.cache_capacity)
                .expire_after(TokenExpiry {
                    margin: Duration::from_secs(c.refresh_margin_secs),
                })
                .support_invalidation_closures()
                .build(),
            connector,
            fetch_timeout: Duration::from_millis(c.fetch_timeout_ms),
            reflection_scan_bytes: c.reflection_scan_bytes,
            backoff_initial: Duration::from_millis(c.backoff_initial_ms),
            backoff_max: Duration::from_millis(c.backoff_max_ms),
            backoffs: Mutex::new(HashMap::new()),
            lent: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reflections: AtomicU64::new(0),
        })
    }

    /// The credential a request from `agent` to `target` would carry, as "provider audience"
    /// (for approval records: what kind of access is being approved, never a token).
    pub fn class(&self, agent: &Agent, target: &Target) -> Option<String> {
        let rule = self.rule_for(target).ok()??;
        let provider = rule.provider.as_deref().or(agent.identity.as_deref())?;
        Some(format!("{provider} {}", rule.audience))
    }

    /// The audience of the rule covering `target`: what an on-behalf-of token is lent for.
    pub fn audience(&self, target: &Target) -> Option<&str> {
        self.rule_for(target).ok()?.map(|r| r.audience.as_str())
    }

    /// Refuses a request to a host a rule covers unless a token could travel to it: over TLS
    /// to one of the rule's ports. Such a request is refused whole — not just sent without a
    /// token — so that plain `http://` to a covered host never reaches it, and the sandbox
    /// learns why.
    pub fn check_transport(&self, target: &Target) -> Result<(), Refusal> {
        self.rule_for(target).map(|_| ())
    }

    /// The rule whose token may go to `target`; `Ok(None)` when no rule covers its host, and
    /// the refusal when one does but not over this scheme and port.
    fn rule_for(&self, target: &Target) -> Result<Option<&Rule>, Refusal> {
        let covering = self.index.covering(&self.rules, target);
        let Some(first) = covering.first else {
            return Ok(None);
        };
        if let Some(carrying) = covering.carrying {
            return Ok(Some(&self.rules[carrying]));
        }
        let first = &self.rules[first];
        let ports = first
            .ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Err(Refusal::new(
            ErrorCode::CredentialRequiresTls,
            format!(
                "{} is a host the gateway injects credentials for, and it sends them only over \
                 TLS to port {ports} (the credential rule's ports); this request goes to {}://{}, \
                 so nothing was forwarded",
                target.host,
                target.scheme.as_str(),
                target.host_header()
            ),
        ))
    }

    /// Lends an approver's token: it goes on this request and, within `tool_call`, on every
    /// later request for the same audience until the tool call closes or `lifetime` passes.
    pub fn lend(
        &self,
        agent: &Agent,
        tool_call: Option<&ToolCallRef>,
        target: &Target,
        token: Secret,
        approver: &str,
        lifetime: Duration,
    ) -> Result<Injection, Refusal> {
        let rule = self.rule_for(target)?.ok_or_else(|| {
            Refusal::new(
                ErrorCode::CredentialUnavailable,
                format!(
                    "no credential rule covers {}, so no token can be lent for it",
                    target.host
                ),
            )
        })?;
        let injection = rule.inject(&token, format!("on-behalf-of {approver}"), true)?;
        if let Some(tool_call) = tool_call {
            self.lent.lock().insert(
                TokenKey {
                    agent: agent.id.clone(),
                    tool_call: tool_call.serial,
                    provider: String::new(),
                    audience: rule.audience.clone(),
                },
                LentToken {
                    token,
                    approver: approver.to_string(),
                    until: Instant::now() + lifetime,
                },
            );
        }
        Ok(injection)
    }

    /// The token an approver lent for this tool call and audience, if one is still valid.
    fn lent_for(
        &self,
        agent: &str,
        tool_call: u64,
        rule: &Rule,
    ) -> Option<Result<Injection, Refusal>> {
        let key = TokenKey {
            agent: agent.to_string(),
            tool_call,
            provider: String::new(),
            audience: rule.audience.clone(),
        };
        let mut lent = self.lent.lock();
        let entry = lent.get(&key)?;
        if Instant::now() >= entry.until {
            lent.remove(&key);
            return None;
        }
        Some(rule.inject(
            &entry.token,
            format!("on-behalf-of {}", entry.approver),
            true,
        ))
    }

    /// What to do with the credentials of a request from `agent` in `tool_call` to `target`:
    /// nothing (no rule covers it), strip only (no open tool call), or strip and inject.
    pub async fn for_request(
        &self,
        agent: &Agent,
        tool_call: Option<&ToolCallRef>,
        target: &Target,
    ) -> Result<Option<Injection>, Refusal> {
        let Some(rule) = self.rule_for(target)? else {
            return Ok(None);
        };
        let provider_name = rule.provider.as_deref().or(agent.identity.as_deref());
        let Some(tool_call) = tool_call else {
            return Ok(Some(Injection {
                strip: rule.strip.clone(),
                header: None,
                token: None,
                provider: provider_name.unwrap_or("-").to_string(),
                on_behalf_of: false,
            }));
        };
        if let Some(lent) = self.lent_for(&agent.id, tool_call.serial, rule) {
            return lent.map(Some);
        }
        let unavailable = |why: String| {
            Refusal::new(
                ErrorCode::CredentialUnavailable,
                format!(
                    "could not obtain a credential for {} (audience {}): {why}; nothing was forwarded",
                    target.host, rule.audience
                ),
            )
        };
        let Some(provider_name) = provider_name else {
            return Err(unavailable(format!(
                "agent {:?} has no identity and the rule names no provider",
                agent.id
            )));
        };
        let Some(provider) = self.providers.get(provider_name) else {
            return Err(unavailable(format!(
                "no identity provider named {provider_name:?}"
            )));
        };
        let key = TokenKey {
            agent: agent.id.clone(),
            tool_call: tool_call.serial,
            provider: provider_name.to_string(),
            audience: rule.audience.clone(),
        };
        // A hit is the common case and needs only a lookup. The miss path (coalesced fetch) is
        // a large future: boxed, so that every request's state — and each request held for
        // approval keeps its state for minutes — does not carry it.
        let token = match self.cache.get(&key).await {
            Some(token) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                token
            }
            None => Box::pin(
                self.cache
                    .try_get_with(key, self.fetch(provider, &rule.audience)),
            )
            .await
            .map_err(|e| unavailable(format!("identity provider {provider_name:?}: {e}")))?,
        };
        rule.inject(&token.value, provider_name.to_string(), false)
            .map(Some)
    }

    /// Fetches a token, unless the provider is backing off after failures.
    async fn fetch(&self, provider: &Provider, audience: &str) -> Result<Arc<Token>, FetchFailure> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let backoff_key = (provider.name().to_string(), audience.to_string());
        let now = Instant::now();
        if let Some(backoff) = self.backoffs.lock().get(&backoff_key) {
            if now < backoff.until {
                return Err(FetchFailure::BackingOff(backoff.until - now));
            }
        }
        match provider
            .fetch(audience, &self.connector, self.fetch_timeout)
            .await
        {
            Ok(token) => {
                self.backoffs.lock().remove(&backoff_key);
                Ok(Arc::new(token))
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let mut backoffs = self.backoffs.lock();
                let delay = backoffs
                    .get(&backoff_key)
                    .map(|b| (b.delay * 2).min(self.backoff_max))
                    .unwrap_or(self.backoff_initial);
                backoffs.insert(
                    backoff_key,
                    Backoff {
                        until: Instant::now() + delay,
                        delay,
                    },
                );
                tracing::warn!(provider = provider.name(), audience, error = %e, retry_in_ms = delay.as_millis() as u64, "token request failed");
                Err(FetchFailure::Fetch(e))
            }
        }
    }

    /// Token cache and endpoint counters since start.
    pub fn counters(&self) -> TokenCounters {
        TokenCounters {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            reflections: self.reflections.load(Ordering::Relaxed),
        }
    }

    /// How much of an answer's body is scanned for the injected token before any of it is
    /// relayed (`credentials.reflection_scan_bytes`).
    pub fn reflection_scan_bytes(&self) -> usize {
        self.reflection_scan_bytes
    }

    /// Counts an answer that was not relayed because it carried its request's token back.
    pub fn count_reflection(&self) {
        self.reflections.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops every cached and lent token of one tool call (it closed).
    pub fn evict_tool_call(&self, agent: &str, tool_call: u64) {
        self.lent
            .lock()
            .retain(|key, _| !(key.agent == agent && key.tool_call == tool_call));
        let agent = agent.to_string();
        // Only fails if invalidation closures were not enabled, which `new` does.
        let _ = self
            .cache
            .invalidate_entries_if(move |key, _| key.agent == agent && key.tool_call == tool_call);
    }

    /// Drops every cached and lent token of an agent (it was removed).
    pub fn evict_agent(&self, agent: &str) {
        self.lent.lock().retain(|key, _| key.agent != agent);
        let agent = agent.to_string();
        let _ = self
            .cache
            .invalidate_entries_if(move |key, _| key.agent == agent);
    }
}

/// Why a token could not be had this time.
#[derive(Debug, thiserror::Error)]
enum FetchFailure {
    #[error("{0}")]
    Fetch(FetchError),
    #[error("a recent request failed; the next attempt is in {} ms", .0.as_millis())]
    BackingOff(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(hosts: &[&str]) -> Rule {
        Rule::new(&CredentialRuleConfig {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            audience: "aud".into(),
            provider: None,
            header: "X-Token".into(),
            format: "Token {token}!".into(),
            strip_headers: vec!["X-Api-Key".into()],
            ports: vec![443, 8443],
        })
        .unwrap()
    }

    fn host(h: &str) -> Host {
        Host::parse(h).unwrap()
    }

    #[test]
    fn host_patterns_match_exact_names_and_sub_domains_only() {
        let r = rule(&["api.example.com", "*.vault.test"]);
        assert!(r.matches(&host("api.example.com")));
        assert!(r.matches(&host("API.Example.com.")));
        assert!(!r.matches(&host("x.api.example.com")));
        assert!(r.matches(&host("kv1.vault.test")));
        assert!(r.matches(&host("a.b.vault.test")));
        assert!(
            !r.matches(&host("vault.test")),
            "*.domain does not cover the apex"
        );
        assert!(!r.matches(&host("evilvault.test")));
        assert!(!r.matches(&host("kv1.vault.test.evil")));
        assert!(!r.matches(&host("10.0.0.1")));
    }

    #[test]
    fn a_token_travels_only_over_tls_to_the_rules_ports() {
        let r = rule(&["api.example.com"]);
        let target = |url: &str| Target::from_url(url).unwrap().0;
        assert!(r.carries_to(&target("https://api.example.com/")));
        assert!(r.carries_to(&target("https://api.example.com:8443/")));
        assert!(!r.carries_to(&target("http://api.example.com/")));
        assert!(!r.carries_to(&target("http://api.example.com:443/")));
        assert!(!r.carries_to(&target("https://api.example.com:444/")));
    }

    #[test]
    fn the_rule_strips_every_credential_header_and_formats_the_value() {
        let r = rule(&["a.test"]);
        for h in [
            "authorization",
            "proxy-authorization",
            "x-api-key",
            "x-token",
        ] {
            assert!(r.strip.iter().any(|s| s == h), "{h} is stripped");
        }
        assert_eq!((r.prefix.as_str(), r.suffix.as_str()), ("Token ", "!"));
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let token = Token {
            value: Secret::new("very-secret-token".into()),
            expires_at: Instant::now(),
        };
        assert!(!format!("{token:?}").contains("very-secret"));
    }
}
