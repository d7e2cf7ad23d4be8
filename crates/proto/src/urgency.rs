//! RFC 8030 §5.3 urgency, shared by the `Urgency` request header, the
//! websocket `urgency` extension and `herald send --urgency`.

use std::fmt;
use std::str::FromStr;

/// Ordered from least to most urgent so thresholds compare.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Urgency {
    VeryLow = 0,
    Low = 1,
    #[default]
    Normal = 2,
    High = 3,
}

impl Urgency {
    /// Every value, least urgent first.
    pub const ALL: [Urgency; 4] = [
        Urgency::VeryLow,
        Urgency::Low,
        Urgency::Normal,
        Urgency::High,
    ];

    /// Lenient, as header values are: surrounding space and case are
    /// ignored.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|u| u.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::VeryLow => "very-low",
            Urgency::Low => "low",
            Urgency::Normal => "normal",
            Urgency::High => "high",
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }
}

impl fmt::Display for Urgency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value was none of `very-low`, `low`, `normal`, `high`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownUrgency(pub String);

impl fmt::Display for UnknownUrgency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown urgency {:?}: use very-low, low, normal or high",
            self.0
        )
    }
}

impl std::error::Error for UnknownUrgency {}

impl FromStr for Urgency {
    type Err = UnknownUrgency;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Urgency::parse(s).ok_or_else(|| UnknownUrgency(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text_and_numbers() {
        for (i, u) in Urgency::ALL.into_iter().enumerate() {
            assert_eq!(u.to_string().parse::<Urgency>(), Ok(u));
            assert_eq!(Urgency::from_u8(i as u8), Some(u));
            assert_eq!(u as u8, i as u8);
        }
        assert_eq!(Urgency::from_u8(4), None);
        assert_eq!(" HIGH ".parse::<Urgency>(), Ok(Urgency::High));
        assert!("whenever".parse::<Urgency>().is_err());
        assert!(Urgency::VeryLow < Urgency::High);
        assert_eq!(Urgency::default(), Urgency::Normal);
    }

    #[test]
    fn serde_uses_the_header_spelling() {
        assert_eq!(
            serde_json::to_string(&Urgency::VeryLow).unwrap(),
            r#""very-low""#
        );
    }
}
