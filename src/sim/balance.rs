//! The simulated account balance that chenyu submits freeze money from
//! and GPTBots runs spend credits from, and its `balance/info` answer.
//!
//! Kept apart from `Faults` (replacing the faults never resets it). `None`
//! is an unlimited account, the default. Money moves at three moments: a
//! chenyu submit freezes its quote at once; its settlement gives
//! `released_amount` back; a GPTBots run's `totalCost` is taken when the
//! run ends. Settlement and run ends happen on the clock, so they are
//! recorded as pending movements and applied (`Account::settle`) before
//! every read or decision. Everything is `Decimal`, so
//! `start - frozen + released (+ top ups) = balance` holds exactly.

use rust_decimal::Decimal;
use serde::{Serialize, Serializer};

use super::money::{ExactNumber, amount8};

/// What `balance/info` reports for an unlimited account: large and fixed.
pub(crate) const UNLIMITED: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Money that moves later, when its run gets there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending {
    /// A chenyu run's `released_amount` comes back when it is settled.
    Release { run_order_id: String },
    /// A GPTBots run's `totalCost` is taken when it ends.
    Debit { run_id: String },
}

/// A chenyu quote the balance cannot cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insufficient {
    pub quote: Decimal,
    pub balance: Decimal,
}

/// The account.
#[derive(Debug, Default)]
pub(crate) struct Account {
    amount: Option<Decimal>,
    pending: Vec<Pending>,
}

impl Account {
    /// The balance as last settled; `None` when unlimited.
    pub(crate) fn balance(&self) -> Option<Decimal> {
        self.amount
    }

    /// Sets the balance (call `settle` first: movements already due belong
    /// to the old balance). Runs still pending move the new one; an
    /// unlimited account forgets them.
    pub(crate) fn set(&mut self, amount: Option<Decimal>) {
        if amount.is_none() {
            self.pending.clear();
        }
        self.amount = amount;
    }

    /// Adds `amount`; the new balance, or `None` (nothing changes) when
    /// unlimited.
    pub(crate) fn top_up(&mut self, amount: Decimal) -> Option<Decimal> {
        self.amount.as_mut().map(|balance| {
            *balance += amount;
            *balance
        })
    }

    /// Freezes a chenyu quote for a new run, to be partly released at its
    /// settlement; refused when the quote is above the balance.
    pub(crate) fn freeze(
        &mut self,
        quote: Decimal,
        run_order_id: &str,
    ) -> Result<(), Insufficient> {
        let Some(balance) = self.amount.as_mut() else {
            return Ok(());
        };
        if quote > *balance {
            return Err(Insufficient {
                quote,
                balance: *balance,
            });
        }
        *balance -= quote;
        self.pending.push(Pending::Release {
            run_order_id: run_order_id.to_owned(),
        });
        Ok(())
    }

    /// Whether a GPTBots run may start: there are credits left.
    pub(crate) fn has_credits(&self) -> bool {
        self.amount.is_none_or(|balance| balance > Decimal::ZERO)
    }

    /// Charges a new GPTBots run's cost when it ends.
    pub(crate) fn debit_at_end(&mut self, run_id: &str) {
        if self.amount.is_some() {
            self.pending.push(Pending::Debit {
                run_id: run_id.to_owned(),
            });
        }
    }

    /// Applies every pending movement that is due: `due` gives the signed
    /// amount (`+` released, `-` spent) once it is, `None` before.
    pub(crate) fn settle(&mut self, mut due: impl FnMut(&Pending) -> Option<Decimal>) {
        let Some(balance) = self.amount.as_mut() else {
            return;
        };
        self.pending.retain(|pending| match due(pending) {
            Some(delta) => {
                *balance += delta;
                false
            }
            None => true,
        });
    }
}

/// An amount as `balance/info` writes it: an 8-place string or a number.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Wire {
    Text(String),
    Number(ExactNumber),
}

impl Wire {
    fn of(amount: Decimal, as_number: bool) -> Wire {
        if as_number {
            Wire::Number(ExactNumber(amount))
        } else {
            Wire::Text(amount8(amount))
        }
    }
}

#[derive(Debug, Serialize)]
struct Data {
    balance: Wire,
    card_balance: Wire,
}

#[derive(Debug)]
struct Body {
    data: Data,
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("code", &0)?;
        map.serialize_entry("msg", "ok")?;
        map.serialize_entry("data", &self.data)?;
        map.end()
    }
}

/// The `balance/info` body for `balance` (`None`: unlimited), amounts as
/// JSON numbers when `as_numbers`, else as 8-place strings. The shape comes
/// from a secondary source, so the simulator sends both forms.
pub(crate) fn info_body(balance: Option<Decimal>, as_numbers: bool) -> String {
    let body = Body {
        data: Data {
            balance: Wire::of(balance.unwrap_or(UNLIMITED), as_numbers),
            card_balance: Wire::of(Decimal::ZERO, as_numbers),
        },
    };
    // Strings and raw exact numbers cannot fail to serialize.
    serde_json::to_string(&body).unwrap_or_default()
}

/// An amount from an admin body: a JSON string or number, read exactly
/// from its text (never through a float). `raw` is the JSON value's text.
pub(crate) fn parse_amount(raw: &str) -> Result<Decimal, String> {
    let text = if raw.starts_with('"') {
        serde_json::from_str::<String>(raw).map_err(|e| format!("not a string: {e}"))?
    } else {
        raw.to_owned()
    };
    let text = text.trim();
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(text)
    } else {
        Decimal::from_str_exact(text)
    };
    parsed.map_err(|e| format!("{text:?} is not a decimal amount: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().expect("decimal")
    }

    #[test]
    fn freeze_release_and_debit_keep_the_ledger_exact() {
        let mut account = Account::default();
        assert!(account.freeze(d("100"), "r0").is_ok(), "unlimited");
        assert!(account.has_credits());
        account.set(Some(d("1.00")));
        assert_eq!(
            account.freeze(d("1.5"), "r1"),
            Err(Insufficient {
                quote: d("1.5"),
                balance: d("1.00")
            })
        );
        assert!(account.freeze(d("0.30000000"), "r1").is_ok());
        account.debit_at_end("g1");
        assert_eq!(account.balance(), Some(d("0.70")));
        // Not due yet: nothing moves.
        account.settle(|_| None);
        assert_eq!(account.balance(), Some(d("0.70")));
        account.settle(|p| match p {
            Pending::Release { .. } => Some(d("0.29964900")),
            Pending::Debit { .. } => None,
        });
        assert_eq!(account.balance(), Some(d("0.99964900")));
        account.settle(|_| Some(d("-1.2")));
        assert_eq!(account.balance(), Some(d("-0.20035100")));
        assert!(!account.has_credits());
        // Each movement is applied once.
        account.settle(|_| Some(d("1000")));
        assert_eq!(account.balance(), Some(d("-0.20035100")));
        assert_eq!(account.top_up(d("5")), Some(d("4.79964900")));
        account.set(None);
        assert_eq!(account.top_up(d("5")), None);
    }

    #[test]
    fn info_alternates_strings_and_exact_numbers() {
        assert_eq!(
            info_body(Some(d("12.5")), false),
            r#"{"code":0,"msg":"ok","data":{"balance":"12.50000000","card_balance":"0.00000000"}}"#
        );
        assert_eq!(
            info_body(Some(d("0.00028780")), true),
            r#"{"code":0,"msg":"ok","data":{"balance":0.0002878,"card_balance":0}}"#
        );
        assert!(info_body(None, false).contains(r#""balance":"1000000.00000000""#));
    }

    #[test]
    fn amounts_parse_exactly_from_strings_and_numbers() {
        assert_eq!(parse_amount(r#""12.50""#), Ok(d("12.50")));
        assert_eq!(parse_amount("0.1"), Ok(d("0.1")));
        assert_eq!(parse_amount("1e2"), Ok(d("100")));
        assert_eq!(
            parse_amount("0.123456789012345678901"),
            Ok(d("0.123456789012345678901"))
        );
        assert!(parse_amount(r#""twelve""#).is_err());
        assert!(parse_amount("true").is_err());
    }
}
