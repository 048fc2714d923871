//! chenyu `GET /balance/info`: the account's balance, so that a run whose
//! quote cannot be covered waits instead of being refused (and failed).
//! The shape comes from a secondary source (`{balance, card_balance}`), so
//! it is read defensively: amounts as strings or numbers, either may be
//! missing, anything else is unclear rather than guessed.

use rust_decimal::Decimal;
use serde::Deserialize;

use super::{Answer, ChenyuClient};
use crate::money::{WireAmount, parse_amount};
use crate::providers::wire::{Call, unreadable};
use crate::providers::{ProviderError, Unclear};

/// What the account holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountBalance {
    /// The balance runs are paid from.
    pub balance: Decimal,
    /// A second balance the account may hold (gift cards, as far as anyone
    /// knows); reported, not spent by wfq's check.
    pub card_balance: Option<Decimal>,
}

/// Why the balance could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BalanceError {
    /// The provider refused (e.g. an endpoint this account may not use).
    #[error("{}: {}", .0.code, .0.message)]
    Rejected(ProviderError),
    /// No usable answer.
    #[error("{}", .0.reason)]
    Unclear(Unclear),
}

#[derive(Debug, Deserialize)]
struct Wire {
    #[serde(default)]
    balance: Option<WireAmount>,
    #[serde(default)]
    card_balance: Option<WireAmount>,
}

fn parse_balance(data: &str) -> Result<AccountBalance, Unclear> {
    let wire: Wire = serde_json::from_str(data).map_err(|e| unreadable("balance info", e))?;
    let balance = parse_amount("balance", wire.balance.as_ref())
        .map_err(|e| unreadable("balance info", e))?
        .ok_or_else(|| unreadable("balance info", "no balance"))?;
    let card_balance = parse_amount("card_balance", wire.card_balance.as_ref())
        .map_err(|e| unreadable("balance info", e))?;
    Ok(AccountBalance {
        balance,
        card_balance,
    })
}

impl ChenyuClient {
    /// `GET /balance/info`.
    pub async fn balance(&self) -> Result<AccountBalance, BalanceError> {
        let request = self.http.get(format!("{}/balance/info", self.base_url));
        match self.classify(Call::Other, self.send(request).await) {
            Answer::Data { data, .. } => parse_balance(&data).map_err(BalanceError::Unclear),
            Answer::Rejected(e) => Err(BalanceError::Rejected(e)),
            Answer::Unclear(u) => Err(BalanceError::Unclear(u)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn both_shapes_are_read_exactly_and_odd_ones_are_unclear() {
        let strings =
            parse_balance(r#"{"balance":"12.50000000","card_balance":"0.00000000"}"#).unwrap();
        assert_eq!(strings.balance, d("12.5"));
        assert_eq!(strings.card_balance, Some(d("0")));
        let numbers = parse_balance(r#"{"balance":0.0002878,"card_balance":0}"#).unwrap();
        assert_eq!(numbers.balance, d("0.0002878"));
        let no_card = parse_balance(r#"{"balance":"3"}"#).unwrap();
        assert_eq!(no_card.card_balance, None);
        for odd in [
            r#"{}"#,
            r#"{"balance":"lots"}"#,
            r#"{"balance":null}"#,
            "[]",
            r#"{"balance":true}"#,
        ] {
            assert!(parse_balance(odd).is_err(), "{odd}");
        }
    }
}
