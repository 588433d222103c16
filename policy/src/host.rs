//! Host names and host patterns.
//!
//! A [`Hostname`] is always normalised: lower case, no trailing dot, IDNA
//! labels in punycode. Everything that compares names (ServiceEntry hosts,
//! TLS SNI, HTTP Host, DNS answers) goes through [`Hostname::parse`], so two
//! spellings of one name can never miss each other.

use std::fmt;
use std::sync::Arc;

/// A normalised DNS name (lower case, no trailing dot, punycode).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hostname(Arc<str>);

/// Why a string is not a host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host name")]
    Empty,
    #[error("host name longer than 253 characters")]
    TooLong,
    #[error("empty label in host name {0:?}")]
    EmptyLabel(String),
    #[error("label longer than 63 characters in host name {0:?}")]
    LabelTooLong(String),
    #[error("invalid character in host name {0:?}")]
    InvalidCharacter(String),
    #[error("host name {0:?} is not valid IDNA")]
    Idna(String),
    #[error("bare \"*\" matches every host; list the hosts, or use ALLOW_ANY")]
    BareWildcard,
    #[error("wildcard {0:?} is only allowed as the whole leftmost label (\"*.example.com\")")]
    MisplacedWildcard(String),
    #[error("{0:?} is an IP address, not a host name: list it in spec.addresses")]
    IpAddress(String),
    #[error("host name {0:?} ends in an all-numeric label: no DNS name does")]
    NumericTld(String),
}

impl Hostname {
    /// Normalises and validates a host name. Accepts a trailing dot, any
    /// case and Unicode (converted to punycode). `_` is allowed in labels
    /// because real DNS names (SRV, DKIM, some CDNs) carry it.
    pub fn parse(input: &str) -> Result<Self, HostError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(HostError::Empty);
        }
        if trimmed.contains('*') {
            return Err(HostError::MisplacedWildcard(input.to_owned()));
        }
        let ascii = if trimmed.is_ascii() {
            trimmed.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(trimmed).map_err(|_| HostError::Idna(input.to_owned()))?
        };
        check_labels(&ascii, input)?;
        Ok(Hostname(Arc::from(ascii)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a shared string (no copy: metric labels, logs).
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

fn check_labels(ascii: &str, original: &str) -> Result<(), HostError> {
    if ascii.len() > 253 {
        return Err(HostError::TooLong);
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel(original.to_owned()));
        }
        if label.len() > 63 {
            return Err(HostError::LabelTooLong(original.to_owned()));
        }
        let ok = label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(HostError::InvalidCharacter(original.to_owned()));
        }
    }
    Ok(())
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::str::FromStr for Hostname {
    type Err = HostError;
    fn from_str(s: &str) -> Result<Self, HostError> {
        Hostname::parse(s)
    }
}

/// A ServiceEntry host: an exact name, or `*.suffix` which matches any name
/// with at least one more label in front of `suffix` (Istio semantics:
/// `*.example.com` matches `a.example.com` and `a.b.example.com`, not
/// `example.com`). Matching lives in [`Snapshot::match_name`](crate::Snapshot::match_name).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(Hostname),
    Wildcard(Hostname),
}

impl HostPattern {
    /// A ServiceEntry host: a name, or `*.` and a name. As Istio, an IP
    /// address is refused (it would match nothing: connections are matched
    /// to names), and so is a name whose last label is all digits.
    pub fn parse(input: &str) -> Result<Self, HostError> {
        let trimmed = input.trim();
        if trimmed == "*" {
            return Err(HostError::BareWildcard);
        }
        let literal = trimmed.trim_start_matches('[').trim_end_matches(']');
        if literal.parse::<std::net::IpAddr>().is_ok() {
            return Err(HostError::IpAddress(trimmed.to_owned()));
        }
        let pattern = match trimmed.strip_prefix("*.") {
            Some(suffix) => HostPattern::Wildcard(Hostname::parse(suffix)?),
            None => HostPattern::Exact(Hostname::parse(trimmed)?),
        };
        let name = match &pattern {
            HostPattern::Exact(h) | HostPattern::Wildcard(h) => h.as_str(),
        };
        if name.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
            return Err(HostError::NumericTld(trimmed.to_owned()));
        }
        Ok(pattern)
    }

    pub fn is_wildcard(&self) -> bool {
        matches!(self, HostPattern::Wildcard(_))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(host) => write!(f, "{host}"),
            HostPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Hostname {
        Hostname::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn normalises_case_trailing_dot_and_idna() {
        assert_eq!(host("HttpBin.ORG.").as_str(), "httpbin.org");
        assert_eq!(host("bücher.example").as_str(), "xn--bcher-kva.example");
        assert_eq!(host("BÜCHER.example"), host("xn--bcher-kva.example"));
        assert_eq!(host("_dmarc.example.com").as_str(), "_dmarc.example.com");
    }

    #[test]
    fn rejects_malformed_names() {
        assert_eq!(Hostname::parse(""), Err(HostError::Empty));
        assert_eq!(Hostname::parse("."), Err(HostError::Empty));
        assert!(matches!(Hostname::parse("a..b"), Err(HostError::EmptyLabel(_))));
        assert!(matches!(Hostname::parse("a b.c"), Err(HostError::InvalidCharacter(_))));
        assert!(matches!(Hostname::parse(&"a".repeat(64)), Err(HostError::LabelTooLong(_))));
        let long = ["abcdefghi"; 30].join(".");
        assert_eq!(Hostname::parse(&long), Err(HostError::TooLong));
        assert!(matches!(Hostname::parse("a*.b"), Err(HostError::MisplacedWildcard(_))));
    }

    #[test]
    fn wildcards_parse_to_their_normalised_suffix() {
        let p = HostPattern::parse("*.S3.example").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p, HostPattern::Wildcard(host("s3.example")));
        assert!(p.is_wildcard());
        assert_eq!(p.to_string(), "*.s3.example");
    }

    #[test]
    fn bare_and_misplaced_wildcards_are_rejected() {
        assert_eq!(HostPattern::parse("*"), Err(HostError::BareWildcard));
        assert!(matches!(HostPattern::parse("a.*.com"), Err(HostError::MisplacedWildcard(_))));
        assert!(matches!(HostPattern::parse("*foo.com"), Err(HostError::MisplacedWildcard(_))));
    }
}
