//! Which requests' spans are exported: `OTEL_TRACES_SAMPLER` (and `OTEL_TRACES_SAMPLER_ARG`),
//! as the OpenTelemetry SDK reads them.
//!
//! A request's span is always a root span (a sandbox's `traceparent` is not trusted to join
//! the gateway's trace), so the parent-based samplers decide as their root sampler does.

use opentelemetry::trace::TraceId;

/// The sampler named by the environment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Sampler {
    /// Every span (`always_on`, `parentbased_always_on`; the default).
    Always,
    /// None (`always_off`, `parentbased_always_off`).
    Never,
    /// The share of trace ids given (`traceidratio`, `parentbased_traceidratio`), decided
    /// from the trace id alone, as the SDK does: the same id gets the same answer anywhere.
    Ratio(f64),
}

impl Sampler {
    /// The sampler `env` names; an unknown name is warned about and sampled as the default.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Sampler {
        let ratio = || {
            env("OTEL_TRACES_SAMPLER_ARG")
                .and_then(|arg| arg.trim().parse::<f64>().ok())
                .map(|r| r.clamp(0.0, 1.0))
                .unwrap_or(1.0)
        };
        match env("OTEL_TRACES_SAMPLER").as_deref().map(str::trim) {
            None | Some("always_on" | "parentbased_always_on") => Sampler::Always,
            Some("always_off" | "parentbased_always_off") => Sampler::Never,
            Some("traceidratio" | "parentbased_traceidratio") => Sampler::Ratio(ratio()),
            Some(other) => {
                tracing::warn!(
                    sampler = other,
                    "OTEL_TRACES_SAMPLER names a sampler the gateway does not have; every request's span is exported (use always_on, always_off or traceidratio)"
                );
                Sampler::Always
            }
        }
    }

    /// Whether the span of the trace `id` is exported.
    pub fn samples(self, id: TraceId) -> bool {
        match self {
            Sampler::Always => true,
            Sampler::Never => false,
            Sampler::Ratio(ratio) => {
                let bytes = id.to_bytes();
                let mut low = [0; 8];
                low.copy_from_slice(&bytes[8..]);
                let bound = (ratio * (1u64 << 63) as f64) as u64;
                (u64::from_be_bytes(low) >> 1) < bound
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(vars: &[(&str, &str)]) -> Sampler {
        Sampler::from_env(&|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_standard_samplers_are_read_from_the_environment() {
        assert_eq!(sampler(&[]), Sampler::Always);
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "parentbased_always_off")]),
            Sampler::Never
        );
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ]),
            Sampler::Ratio(0.25)
        );
        // An unreadable ratio is 1, and one out of range is clamped, as the SDK reads them.
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "-0.5")
            ]),
            Sampler::Ratio(0.0)
        );
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "half")
            ]),
            Sampler::Ratio(1.0)
        );
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "7")
            ]),
            Sampler::Ratio(1.0)
        );
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]),
            Sampler::Always
        );
    }

    #[test]
    fn a_ratio_samples_about_its_share_of_random_trace_ids() {
        let ratio = Sampler::Ratio(0.25);
        let sampled = (0..20_000)
            .filter(|_| ratio.samples(TraceId::from_bytes(rand::random())))
            .count();
        assert!((4_000..6_000).contains(&sampled), "{sampled} of 20,000");
        let id = TraceId::from_bytes(rand::random());
        assert!(Sampler::Ratio(1.0).samples(id));
        assert!(!Sampler::Ratio(0.0).samples(id));
        assert!(!Sampler::Never.samples(id));
    }
}
