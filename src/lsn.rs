//! Log sequence numbers.
//!
//! An [`Lsn`] is a byte position in PostgreSQL's write-ahead log. Three textual forms appear in this
//! project and all round-trip through this type:
//! - `X/XXXXXXXX`, PostgreSQL's own form (`pg_lsn`), used in CSV metadata, the registry and JSON;
//! - sixteen upper-case hex digits, used in object names so that lexicographic order is LSN order;
//! - the raw `u64` on the wire.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log. Ordered, copyable, and zero means "invalid / none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid LSN (`0/0`); PostgreSQL uses it for "no position".
    pub const ZERO: Lsn = Lsn(0);

    /// Sixteen upper-case hex digits, zero padded: sorts like the LSN itself.
    pub fn to_hex16(self) -> String {
        format!("{:016X}", self.0)
    }

    /// Parses the sixteen-hex-digit object-name form.
    pub fn from_hex16(s: &str) -> Option<Lsn> {
        if s.len() != 16 {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Error for text that is not of the form `X/X` with 1–8 hex digits on each side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected the form X/XXXXXXXX (hex digits)")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let ok =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok(hi) || !ok(lo) {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_like_postgres() {
        assert_eq!(Lsn(0x1_6B37_4D48).to_string(), "1/6B374D48");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("/1".parse::<Lsn>().is_err());
        assert!("1/123456789".parse::<Lsn>().is_err());
    }

    proptest! {
        #[test]
        fn text_forms_round_trip(v in any::<u64>()) {
            let lsn = Lsn(v);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
            prop_assert_eq!(Lsn::from_hex16(&lsn.to_hex16()).unwrap(), lsn);
        }

        #[test]
        fn hex16_sorts_like_lsn(a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(Lsn(a).cmp(&Lsn(b)), Lsn(a).to_hex16().cmp(&Lsn(b).to_hex16()));
        }
    }
}
