//! Exact money: provider amounts parsed into `Decimal`, never through float.
//!
//! chenyu sends amounts as 8-place strings on `run/info` and as JSON numbers
//! on `run/execution`; both end up here.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::Deserialize;

/// An amount exactly as it appeared on the wire: the raw JSON text of a
/// string (`"0.03000000"`, `""` when not known yet) or of a number
/// (`0.0003`). Keeping the text is what makes numbers exact: serde_json
/// would otherwise read them through `f64` (`99999999.99999999` becomes
/// `100000000`).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct WireAmount(Box<serde_json::value::RawValue>);

/// An amount that could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("amount `{field}` = {value:?} is not a decimal number")]
pub struct AmountError {
    /// The wire field, e.g. `final_amount`.
    pub field: &'static str,
    /// The text that was received.
    pub value: String,
}

/// Parses an optional wire amount. An absent field, `null` and `""` mean
/// "not known yet"; anything else must be an exact decimal.
pub fn parse_amount(
    field: &'static str,
    raw: Option<&WireAmount>,
) -> Result<Option<Decimal>, AmountError> {
    let Some(WireAmount(raw)) = raw else {
        return Ok(None);
    };
    let json = raw.get().trim();
    let text = if json.starts_with('"') {
        serde_json::from_str::<String>(json)
            .map_err(|_| AmountError {
                field,
                value: json.to_owned(),
            })?
            .trim()
            .to_owned()
    } else {
        json.to_owned()
    };
    if text.is_empty() || text == "null" {
        return Ok(None);
    }
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map(Some)
        .map_err(|_| AmountError { field, value: text })
}

/// Whether settled amounts add up: `final + released = frozen`.
/// `None` when any of them is unknown.
pub fn settlement_balances(
    frozen: Option<Decimal>,
    final_amount: Option<Decimal>,
    released: Option<Decimal>,
) -> Option<bool> {
    Some(final_amount? + released? == frozen?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros_free::dec;

    /// `dec!` without the macro crate: tests only.
    mod rust_decimal_macros_free {
        macro_rules! dec {
            ($s:literal) => {
                rust_decimal::Decimal::from_str_exact($s).unwrap()
            };
        }
        pub(crate) use dec;
    }

    fn text(s: &str) -> WireAmount {
        serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
    }

    #[test]
    fn eight_place_strings_are_exact() {
        let got = parse_amount("final_amount", Some(&text("0.00028780"))).unwrap();
        assert_eq!(got, Some(dec!("0.0002878")));
        let sum = dec!("0.00028780") + dec!("0.02971220");
        assert_eq!(sum, dec!("0.03"));
    }

    #[test]
    fn numbers_are_read_from_their_digits_not_through_float_arithmetic() {
        let n: WireAmount = serde_json::from_str("0.1").unwrap();
        assert_eq!(parse_amount("x", Some(&n)).unwrap(), Some(dec!("0.1")));
        let n: WireAmount = serde_json::from_str("2.878e-4").unwrap();
        assert_eq!(
            parse_amount("x", Some(&n)).unwrap(),
            Some(dec!("0.0002878"))
        );
        let n: WireAmount = serde_json::from_str("3").unwrap();
        assert_eq!(parse_amount("x", Some(&n)).unwrap(), Some(dec!("3")));
        // Sixteen significant digits: f64 would round this to 100000000.
        let n: WireAmount = serde_json::from_str("99999999.99999999").unwrap();
        assert_eq!(
            parse_amount("x", Some(&n)).unwrap(),
            Some(dec!("99999999.99999999"))
        );
    }

    #[test]
    fn empty_and_absent_mean_unknown() {
        assert_eq!(parse_amount("x", None).unwrap(), None);
        assert_eq!(parse_amount("x", Some(&text(""))).unwrap(), None);
        assert_eq!(parse_amount("x", Some(&text("  "))).unwrap(), None);
    }

    #[test]
    fn garbage_names_the_field() {
        let err = parse_amount("final_amount", Some(&text("12,5 CNY"))).unwrap_err();
        assert_eq!(err.field, "final_amount");
        assert!(err.to_string().contains("12,5 CNY"));
    }

    #[test]
    fn settlement_balance() {
        let q = Some(dec!("0.03"));
        assert_eq!(
            settlement_balances(q, Some(dec!("0.0002878")), Some(dec!("0.0297122"))),
            Some(true)
        );
        assert_eq!(
            settlement_balances(q, Some(dec!("0.01")), Some(dec!("0.01"))),
            Some(false)
        );
        assert_eq!(settlement_balances(q, None, Some(dec!("0.01"))), None);
    }
}
