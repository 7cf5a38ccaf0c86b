//! Human durations as written in config and pipeline files (`30m`, `1h30m`, `500ms`, `0`).
//! Pure parsing and formatting; used by `config` and `pipeline`.

use std::time::Duration;

/// Parses `90s`, `5m`, `1h30m`, `250ms` or a bare `0`. Units: ms, s, m, h, d.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "bad duration {text:?}: expected a number followed by ms, s, m, h or d (e.g. 30s, 5m, 1h30m)"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            "" => {
                return Err(format!(
                    "bad duration {text:?}: missing unit (ms, s, m, h or d)"
                ))
            }
            other => return Err(format!("bad duration {text:?}: unknown unit {other:?}")),
        };
        rest = &rest[unit_len..];
        let part = unit
            .checked_mul(
                u32::try_from(value).map_err(|_| format!("bad duration {text:?}: too large"))?,
            )
            .ok_or_else(|| format!("bad duration {text:?}: too large"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("bad duration {text:?}: too large"))?;
    }
    Ok(total)
}

/// Deserializes a duration written as text (`"30m"`) or as a bare number of seconds.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    use serde::de::Error;
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
        Raw::Text(t) => parse(&t).map_err(|e| D::Error::custom(crate::yaml::value_error(&t, e))),
    }
}

use serde::Deserialize;

/// Like [`deserialize`], for optional fields.
pub fn deserialize_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table() {
        let ok = [
            ("0", 0),
            ("0s", 0),
            ("250ms", 250),
            ("5s", 5_000),
            ("30m", 1_800_000),
            ("1h30m", 5_400_000),
            ("2d", 172_800_000),
            (" 10s ", 10_000),
        ];
        for (text, ms) in ok {
            assert_eq!(parse(text), Ok(Duration::from_millis(ms)), "{text}");
        }
        for bad in ["", "5", "m", "5x", "1h 30m", "-1s", "99999999999999999999s"] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
