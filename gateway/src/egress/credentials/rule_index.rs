//! Which credential rules cover a host, found with a few hash lookups however many rules
//! there are: exact names in one map, `*.domain` patterns in another, looked up at each of
//! the host's dots. The answer is the one a walk through the rules in the config's order
//! gives: the first covering rule, and the first that may carry a token to the target.

use std::collections::HashMap;

use tollgate_policy::target::{Host, Target};

use super::Rule;

/// The rules by the names and domains they cover, as positions in the config's list.
pub(super) struct RuleIndex {
    exact: HashMap<String, Vec<usize>>,
    suffixes: HashMap<String, Vec<usize>>,
    /// The lengths of the names and suffixes in the maps: a name or suffix of another length
    /// is not looked up (hashing it costs more than walking a short list of rules did).
    exact_lengths: Lengths,
    suffix_lengths: Lengths,
}

/// A set of string lengths: a bit each up to 255, and one for every longer length.
#[derive(Default)]
struct Lengths([u64; 5]);

impl Lengths {
    fn slot(len: usize) -> (usize, u64) {
        let len = len.min(256);
        (len / 64, 1 << (len % 64))
    }

    fn insert(&mut self, len: usize) {
        let (word, bit) = Self::slot(len);
        self.0[word] |= bit;
    }

    fn contains(&self, len: usize) -> bool {
        let (word, bit) = Self::slot(len);
        self.0[word] & bit != 0
    }
}

/// The rules covering a target's host, as positions in the config's list.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Covering {
    /// The first rule covering the host, whatever the scheme and port.
    pub first: Option<usize>,
    /// The first covering rule whose token may travel to the target (TLS, its ports).
    pub carrying: Option<usize>,
}

impl RuleIndex {
    /// The index of `rules`.
    pub(super) fn new(rules: &[Rule]) -> RuleIndex {
        let (mut exact, mut suffixes) = (HashMap::new(), HashMap::new());
        let (mut exact_lengths, mut suffix_lengths) = (Lengths::default(), Lengths::default());
        for (at, rule) in rules.iter().enumerate() {
            for name in &rule.exact {
                exact_lengths.insert(name.len());
                exact.entry(name.clone()).or_insert_with(Vec::new).push(at);
            }
            for suffix in &rule.suffixes {
                suffix_lengths.insert(suffix.len());
                suffixes
                    .entry(suffix.clone())
                    .or_insert_with(Vec::new)
                    .push(at);
            }
        }
        RuleIndex {
            exact,
            suffixes,
            exact_lengths,
            suffix_lengths,
        }
    }

    /// The rules of `rules` (those this index was made of) covering `target`'s host.
    pub(super) fn covering(&self, rules: &[Rule], target: &Target) -> Covering {
        let Host::Name(name) = &target.host else {
            return Covering::default();
        };
        let mut found = Covering::default();
        let mut note = |positions: &[usize]| {
            for &at in positions {
                found.first = Some(found.first.map_or(at, |f| f.min(at)));
                if rules[at].carries_to(target) {
                    found.carrying = Some(found.carrying.map_or(at, |c| c.min(at)));
                }
            }
        };
        if self.exact_lengths.contains(name.len()) {
            if let Some(positions) = self.exact.get(name.as_str()) {
                note(positions);
            }
        }
        // A `*.domain` rule covers the names ending in `.domain`: those with a dot there.
        for (dot, _) in name.match_indices('.') {
            if !self.suffix_lengths.contains(name.len() - dot) {
                continue;
            }
            if let Some(positions) = self.suffixes.get(&name[dot..]) {
                note(positions);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CredentialRuleConfig;

    fn rule(hosts: &[&str], ports: &[u16]) -> Rule {
        Rule::new(&CredentialRuleConfig {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            audience: "aud".into(),
            provider: None,
            header: "authorization".into(),
            format: "Bearer {token}".into(),
            strip_headers: Vec::new(),
            ports: ports.to_vec(),
        })
        .expect("a valid rule")
    }

    /// What the config's order gives: a walk through every rule.
    fn walk(rules: &[Rule], target: &Target) -> Covering {
        let covering: Vec<usize> = (0..rules.len())
            .filter(|&at| rules[at].matches(&target.host))
            .collect();
        Covering {
            first: covering.first().copied(),
            carrying: covering
                .iter()
                .copied()
                .find(|&at| rules[at].carries_to(target)),
        }
    }

    #[test]
    fn the_index_finds_what_walking_the_rules_in_order_finds() {
        let mut rules = vec![
            rule(&["api.example.com"], &[8443]),
            rule(&["*.example.com", "other.test"], &[443]),
            rule(&["api.example.com", "*.deep.example.com"], &[443]),
            rule(&["*.vault.test"], &[443, 8443]),
            rule(&["kv.vault.test"], &[443]),
            rule(&["*.com"], &[9443]),
            rule(&["API.Example.COM."], &[7443]),
        ];
        let hosts = [
            "api.example.com",
            "x.api.example.com",
            "example.com",
            "a.deep.example.com",
            "deep.example.com",
            "other.test",
            "kv.vault.test",
            "vault.test",
            "evilvault.test",
            "kv.vault.test.evil",
            "nothing.net",
            "com",
            "10.0.0.1",
            "[::1]",
        ];
        // Names and suffixes longer than a word of the length sets (64).
        let domain = format!("{}.{}.api.example.com", "b".repeat(63), "c".repeat(63));
        let long = format!("{}.{domain}", "a".repeat(63));
        rules.push(rule(&[&format!("*.{domain}")], &[443]));
        rules.push(rule(&[&long], &[8443]));
        let index = RuleIndex::new(&rules);
        let hosts: Vec<&str> = hosts.into_iter().chain([long.as_str()]).collect();
        let mut covered = 0;
        for host in hosts {
            for (scheme, port) in [
                ("https", 443),
                ("https", 8443),
                ("https", 7443),
                ("http", 80),
            ] {
                let url = format!("{scheme}://{host}:{port}/");
                let (target, _) = Target::from_url(&url).expect("a valid URL");
                let (got, want) = (index.covering(&rules, &target), walk(&rules, &target));
                assert_eq!(got, want, "{url}");
                covered += usize::from(want.first.is_some());
            }
        }
        assert!(covered > 20, "the cases cover hosts the rules cover");
    }
}
