//! The spend guard: per provider profile, a cap on money frozen and not yet
//! settled, a budget per calendar day, and a cap on runs at once. A run
//! that would cross a limit is not submitted; it waits in `queued` with the
//! reason in `hold_reason`.
//!
//! The decision is a pure function of what is already committed (read
//! under a per-profile lock, so workers in many processes see one another)
//! and the run's quote.

use rust_decimal::Decimal;

/// A profile's money limits; `None` is "no limit".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpendLimits {
    /// Most money frozen at once and not yet settled.
    pub max_outstanding_frozen: Option<Decimal>,
    /// Most money committed per calendar day (`final_amount` of settled
    /// runs plus what unsettled runs have frozen or are about to).
    pub daily_budget: Option<Decimal>,
    /// Most runs submitted and not final at once (`max_running`), for
    /// providers that cap an account's concurrent runs.
    pub max_running: Option<u32>,
    /// What a finished run whose cost the provider never reported counts,
    /// when no settled run of its workflow had a cost lately (`None`: such
    /// a run holds the profile's submits while it counts toward a money
    /// limit). Not a limit: it sets no lock.
    pub unknown_cost: Option<Decimal>,
}

impl SpendLimits {
    /// Whether any limit is set (without one, no lock is taken).
    pub fn any(&self) -> bool {
        self.max_outstanding_frozen.is_some()
            || self.daily_budget.is_some()
            || self.max_running.is_some()
    }
}

/// What a profile has committed, as read under its lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Frozen (or quoted, for submits in flight) and not yet settled.
    pub outstanding: Decimal,
    /// Committed on the current budget day.
    pub today: Decimal,
    /// Runs submitted (or being submitted) and not final.
    pub running: i64,
    /// Finished runs counted in `outstanding` whose cost is unknown and
    /// has no estimate (no quote, no settled run of the workflow with a
    /// cost lately, no `unknown_cost`).
    pub unpriced_outstanding: i64,
    /// The same, among the runs counted in `today`.
    pub unpriced_today: i64,
}

/// Why a run waits instead of being submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpendHold {
    /// `max_outstanding_frozen` would be crossed.
    Outstanding {
        /// The limit.
        limit: Decimal,
        /// Already outstanding.
        outstanding: Decimal,
        /// The run's quote.
        quote: Decimal,
    },
    /// `daily_budget` would be crossed (or is used up, for a run without
    /// a quote).
    Daily {
        /// The limit.
        limit: Decimal,
        /// Already committed today.
        today: Decimal,
        /// The run's quote.
        quote: Decimal,
    },
    /// `max_running` runs are submitted and not final.
    Running {
        /// The limit.
        limit: u32,
        /// Runs at once now.
        running: i64,
    },
    /// Runs that count toward a money limit cost an unknown amount that
    /// nothing estimates: whether the limit has room cannot be told.
    UnknownCost {
        /// The limit they count toward (`max_outstanding_frozen` or
        /// `daily_budget`).
        limit: &'static str,
        /// How many.
        runs: i64,
    },
}

impl SpendHold {
    /// Whether the hold lifts by itself at the next budget day (otherwise
    /// when money is released or a run ends, which wakes held runs).
    pub fn until_next_day(&self) -> bool {
        matches!(self, SpendHold::Daily { .. })
    }

    /// The run's quote alone exceeds the limit: waiting can never help.
    pub fn never_fits(&self) -> bool {
        match self {
            SpendHold::Outstanding { limit, quote, .. } | SpendHold::Daily { limit, quote, .. } => {
                quote > limit
            }
            SpendHold::Running { .. } | SpendHold::UnknownCost { .. } => false,
        }
    }

    /// Whether the hold lifts only by someone's hand (an operator settles
    /// the runs of unknown cost, or sets `unknown_cost`), which wakes
    /// nothing: the run is checked again every `worker.budget_recheck`.
    pub fn needs_an_operator(&self) -> bool {
        matches!(self, SpendHold::UnknownCost { .. })
    }
}

impl std::fmt::Display for SpendHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpendHold::Outstanding {
                limit,
                outstanding,
                quote,
            } => write!(
                f,
                "max_outstanding_frozen: {outstanding} frozen and not settled + this run's quote {quote} would exceed {limit}; waiting for runs to settle"
            ),
            SpendHold::Daily {
                limit,
                today,
                quote,
            } => write!(
                f,
                "daily_budget: {today} committed today + this run's quote {quote} would exceed {limit}; waiting for the next budget day"
            ),
            SpendHold::Running { limit, running } => write!(
                f,
                "max_running: {running} runs submitted and not finished, the limit is {limit}; waiting for one to finish"
            ),
            SpendHold::UnknownCost { limit, runs } => write!(
                f,
                "unknown_cost: {runs} finished runs counted toward {limit} have a cost the provider never reported and nothing to estimate it by; waiting for them to be settled by hand (final_amount, settled_at) or for the profile's unknown_cost"
            ),
        }
    }
}

/// May a run quoted at `quote` (`None`: the provider quotes nothing, e.g.
/// Dify) be submitted, given what is committed?
///
/// A run without a quote adds nothing known in advance, so it passes while
/// neither limit is used up. Money that is unknown for good is never
/// counted as nothing: while a money limit counts a finished run whose
/// cost nothing estimates, the limit's room cannot be told and the run
/// waits.
pub fn check(
    limits: &SpendLimits,
    committed: Committed,
    quote: Option<Decimal>,
) -> Result<(), SpendHold> {
    if limits.max_outstanding_frozen.is_some() && committed.unpriced_outstanding > 0 {
        return Err(SpendHold::UnknownCost {
            limit: "max_outstanding_frozen",
            runs: committed.unpriced_outstanding,
        });
    }
    if limits.daily_budget.is_some() && committed.unpriced_today > 0 {
        return Err(SpendHold::UnknownCost {
            limit: "daily_budget",
            runs: committed.unpriced_today,
        });
    }
    let known = quote.unwrap_or_default();
    let crosses = |committed: Decimal, limit: Decimal| match quote {
        Some(quote) => committed + quote > limit,
        None => committed >= limit,
    };
    if let Some(limit) = limits.max_outstanding_frozen
        && crosses(committed.outstanding, limit)
    {
        return Err(SpendHold::Outstanding {
            limit,
            outstanding: committed.outstanding,
            quote: known,
        });
    }
    if let Some(limit) = limits.daily_budget
        && crosses(committed.today, limit)
    {
        return Err(SpendHold::Daily {
            limit,
            today: committed.today,
            quote: known,
        });
    }
    if let Some(limit) = limits.max_running
        && committed.running >= i64::from(limit)
    {
        return Err(SpendHold::Running {
            limit,
            running: committed.running,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).unwrap()
    }

    #[test]
    fn limits_table() {
        let both = SpendLimits {
            max_outstanding_frozen: Some(d("0.10")),
            daily_budget: Some(d("1.00")),
            max_running: None,
            unknown_cost: None,
        };
        let c = |outstanding: &str, today: &str| Committed {
            outstanding: d(outstanding),
            today: d(today),
            ..Committed::default()
        };
        // (limits, committed, quote, allowed, hold kind)
        let table: Vec<(SpendLimits, Committed, Option<&str>, Option<&str>)> = vec![
            (SpendLimits::default(), c("99", "99"), Some("5"), None),
            (both.clone(), c("0", "0"), Some("0.03"), None),
            (both.clone(), c("0.07", "0.5"), Some("0.03"), None),
            (
                both.clone(),
                c("0.08", "0.5"),
                Some("0.03"),
                Some("outstanding"),
            ),
            (both.clone(), c("0", "0.98"), Some("0.03"), Some("daily")),
            (both.clone(), c("0", "0.97"), Some("0.03"), None),
            // Unquoted runs pass until a limit is used up.
            (both.clone(), c("0.09", "0.99"), None, None),
            (both.clone(), c("0.10", "0.5"), None, Some("outstanding")),
            (both.clone(), c("0", "1.00"), None, Some("daily")),
        ];
        for (limits, committed, quote, hold) in table {
            let got = check(&limits, committed, quote.map(d));
            let kind = match &got {
                Ok(()) => None,
                Err(SpendHold::Outstanding { .. }) => Some("outstanding"),
                Err(SpendHold::Daily { .. }) => Some("daily"),
                Err(SpendHold::Running { .. }) => Some("running"),
                Err(SpendHold::UnknownCost { .. }) => Some("unknown"),
            };
            assert_eq!(kind, hold, "{committed:?} {quote:?} -> {got:?}");
        }
    }

    #[test]
    fn a_quote_above_the_limit_never_fits() {
        let limits = SpendLimits {
            max_outstanding_frozen: Some(d("1.00")),
            daily_budget: None,
            max_running: None,
            unknown_cost: None,
        };
        let hold = check(&limits, Committed::default(), Some(d("1.50"))).unwrap_err();
        assert!(hold.never_fits());
        let hold = check(
            &limits,
            Committed {
                outstanding: d("0.90"),
                ..Committed::default()
            },
            Some(d("0.50")),
        )
        .unwrap_err();
        assert!(!hold.never_fits(), "it fits once money settles");
    }

    #[test]
    fn the_reason_names_the_limit_and_the_numbers() {
        let hold = check(
            &SpendLimits {
                max_outstanding_frozen: Some(d("0.10")),
                daily_budget: None,
                max_running: None,
                unknown_cost: None,
            },
            Committed {
                outstanding: d("0.09"),
                ..Committed::default()
            },
            Some(d("0.03")),
        )
        .unwrap_err();
        assert_eq!(
            hold.to_string(),
            "max_outstanding_frozen: 0.09 frozen and not settled + this run's quote 0.03 would exceed 0.10; waiting for runs to settle"
        );
    }

    #[test]
    fn runs_at_once_are_capped_and_wait_for_one_to_finish() {
        let limits = SpendLimits {
            max_running: Some(2),
            ..SpendLimits::default()
        };
        assert!(limits.any());
        let running = |n| Committed {
            running: n,
            ..Committed::default()
        };
        assert_eq!(check(&limits, running(1), Some(d("5"))), Ok(()));
        let hold = check(&limits, running(2), None).unwrap_err();
        assert!(!hold.never_fits() && !hold.until_next_day());
        assert!(
            hold.to_string().starts_with("max_running: 2 runs"),
            "{hold}"
        );
    }

    #[test]
    fn a_put_back_run_is_checked_with_its_recorded_quote() {
        // daily_budget 1.00 with 0.99 committed: the same run passes as a
        // run without a quote (nothing used up) and waits with the quote
        // its first submit recorded (0.99 + 0.30 > 1.00).
        let limits = SpendLimits {
            daily_budget: Some(d("1.00")),
            max_outstanding_frozen: Some(d("1.00")),
            ..SpendLimits::default()
        };
        let committed = Committed {
            outstanding: d("0.99"),
            today: d("0.99"),
            ..Committed::default()
        };
        assert_eq!(check(&limits, committed, None), Ok(()));
        let hold = check(&limits, committed, Some(d("0.30"))).unwrap_err();
        assert!(matches!(hold, SpendHold::Outstanding { .. }), "{hold}");
    }

    #[test]
    fn runs_of_unknown_cost_without_an_estimate_hold_the_limits_they_count_toward() {
        let daily = SpendLimits {
            daily_budget: Some(d("100")),
            ..SpendLimits::default()
        };
        let outstanding = SpendLimits {
            max_outstanding_frozen: Some(d("100")),
            ..SpendLimits::default()
        };
        let unpriced = |outstanding: i64, today: i64| Committed {
            unpriced_outstanding: outstanding,
            unpriced_today: today,
            ..Committed::default()
        };
        // (limits, committed, held)
        let table = [
            (daily.clone(), unpriced(0, 0), false),
            (daily.clone(), unpriced(1, 1), true),
            // Yesterday's: not in today's budget any more.
            (daily.clone(), unpriced(1, 0), false),
            (outstanding.clone(), unpriced(1, 0), true),
            // No money limit: nothing to count it toward.
            (SpendLimits::default(), unpriced(3, 3), false),
            (
                SpendLimits {
                    max_running: Some(5),
                    ..SpendLimits::default()
                },
                unpriced(3, 3),
                false,
            ),
        ];
        for (limits, committed, held) in table {
            let got = check(&limits, committed, None);
            assert_eq!(got.is_err(), held, "{limits:?} {committed:?} -> {got:?}");
            if let Err(hold) = got {
                assert!(hold.needs_an_operator() && !hold.never_fits() && !hold.until_next_day());
                assert!(hold.to_string().starts_with("unknown_cost: "), "{hold}");
            }
        }
    }
}
