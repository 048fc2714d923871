//! Exact amounts for simulated settlement: the 8-place wire format and the
//! deterministic final amount of a run.
//!
//! Everything here is `Decimal`; floats never touch money.

use rust_decimal::Decimal;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use super::catalog::{Outcome, Workflow};

/// A decimal serialized as an exact JSON number (`0.6928` as written, not
/// the nearest double), through `RawValue`. Only usable with
/// `serde_json::to_string`/`to_writer`: a `serde_json::Value` cannot hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExactNumber(pub Decimal);

impl Serialize for ExactNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // `Decimal`'s Display never uses exponents, so this is valid JSON.
        let raw = RawValue::from_string(self.0.normalize().to_string())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// Formats an amount the way chenyu does: exactly 8 decimal places.
///
/// `format!("{:.8}")` depends on the value's scale, so round then rescale.
pub(crate) fn amount8(d: Decimal) -> String {
    let mut d = d.round_dp(8);
    d.rescale(8);
    d.to_string()
}

/// FNV-1a, 64 bit. Used instead of `DefaultHasher` because its output must
/// stay the same across Rust versions: final amounts are part of the
/// simulator's observable behaviour.
pub(crate) fn stable_hash(salt: &str, data: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.bytes().chain([0xff]).chain(data.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// How a frozen quote is split when a run is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settlement {
    pub compute_cost: Decimal,
    pub external_model_cost: Decimal,
    pub total_cost: Decimal,
    pub final_amount: Decimal,
    pub released: Decimal,
}

/// The settlement of a run of `wf` submitted with `idempotency_key`.
///
/// Deterministic per key, so a test can predict it and a replayed submit can
/// never settle differently. Invariants: `final + released == quote` and
/// `compute + external == total == final`.
pub(crate) fn settle(wf: &Workflow, idempotency_key: &str) -> Settlement {
    let quote = wf.quote();
    let (compute, external) = match wf.outcome {
        Outcome::Fails { charged_units, .. } => {
            (Decimal::new(charged_units, 8).min(quote), Decimal::ZERO)
        }
        Outcome::Succeeds => {
            // 1.00% ..= 100.00% of the quote, in basis points.
            let bp = 100 + stable_hash("final", idempotency_key) % 9_901;
            let final_amount = (quote * Decimal::new(bp as i64, 4)).round_dp(8);
            if wf.may_incur_external_model_cost {
                // The third-party model takes 40% ..= 90% of what is charged.
                let share = 40 + stable_hash("external", idempotency_key) % 51;
                let external = (final_amount * Decimal::new(share as i64, 2)).round_dp(8);
                (final_amount - external, external)
            } else {
                (final_amount, Decimal::ZERO)
            }
        }
    };
    let total = compute + external;
    Settlement {
        compute_cost: compute,
        external_model_cost: external,
        total_cost: total,
        final_amount: total,
        released: quote - total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::catalog::{CATALOG, find};

    #[test]
    fn exact_numbers_keep_every_digit() {
        let text = |d: Decimal| serde_json::to_string(&ExactNumber(d)).expect("serialize");
        assert_eq!(text(Decimal::new(6928, 4)), "0.6928");
        assert_eq!(text(Decimal::new(2_468_000, 9)), "0.002468");
        assert_eq!(
            text(Decimal::new(123_456_789_012_345_678, 18)),
            "0.123456789012345678"
        );
        assert_eq!(text(Decimal::ZERO), "0");
    }

    #[test]
    fn amount8_always_has_eight_places() {
        assert_eq!(amount8(Decimal::new(3, 2)), "0.03000000");
        assert_eq!(amount8(Decimal::ZERO), "0.00000000");
        assert_eq!(amount8(Decimal::new(123_456_789_012, 12)), "0.12345679");
        assert_eq!(amount8(Decimal::new(12, 0)), "12.00000000");
    }

    #[test]
    fn settlements_add_up_for_many_keys() {
        for wf in CATALOG {
            for i in 0..500 {
                let key = format!("key-{i}");
                let s = settle(wf, &key);
                assert_eq!(s.final_amount + s.released, wf.quote(), "{key}");
                assert_eq!(s.compute_cost + s.external_model_cost, s.total_cost);
                assert_eq!(s.total_cost, s.final_amount);
                assert!(s.final_amount > Decimal::ZERO && s.final_amount <= wf.quote());
                assert!(s.final_amount.scale() <= 8 && s.released.scale() <= 8);
                if wf.may_incur_external_model_cost {
                    assert!(s.external_model_cost > Decimal::ZERO);
                } else {
                    assert_eq!(s.external_model_cost, Decimal::ZERO);
                }
                assert_eq!(s, settle(wf, &key), "deterministic per key");
            }
        }
    }

    #[test]
    fn failed_runs_charge_the_fixed_compute() {
        let wf = find("wf_always_fails_9d1a").expect("catalog");
        let s = settle(wf, "anything");
        assert_eq!(amount8(s.final_amount), "0.01000000");
        assert_eq!(amount8(s.released), "0.49000000");
    }
}
