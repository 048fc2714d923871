//! Refusals about the account, not the run: they never fail a run. The run
//! goes back to the queue (a refused submit froze nothing) and the worker
//! pauses the profile until the account may run again.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::*;
use crate::providers::ProviderError;

/// What a refusal code says a submit was refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalScope {
    /// The run itself (its inputs, its workflow): it fails.
    Run,
    /// The account (quota, runs at once, suspended): the run waits.
    Account,
    /// The account's balance, which the worker can read (chenyu): the run
    /// waits and the balance is watched.
    Balance,
}

/// Reads a refusal code against the profile's list of account refusals
/// (`account_refusals`); `reads_balance`: the provider tells the balance.
pub fn refusal_scope(code: &str, account_refusals: &[String], reads_balance: bool) -> RefusalScope {
    if !crate::providers::is_account_refusal(code, account_refusals) {
        return RefusalScope::Run;
    }
    if reads_balance && is_balance_code(code) {
        RefusalScope::Balance
    } else {
        RefusalScope::Account
    }
}

/// Whether a refusal code is about the account's money (`BALANCE` or
/// `FUND` in it, any case).
pub fn is_balance_code(code: &str) -> bool {
    let upper = code.to_ascii_uppercase();
    upper.contains("BALANCE") || upper.contains("FUND")
}

/// A submit refused for an account reason: the run goes back to `queued`
/// (its inputs kept, so the next submit sends the same), the attempt does
/// not count, nothing is in doubt (a refusal created nothing), and the run
/// says why it waits. It is due at once: the paused profile's queued runs
/// are not claimed until the pause lifts.
pub fn account_refused(e: &ProviderError, reason: &str, now: DateTime<Utc>) -> Transition {
    Transition {
        attempts_delta: -1,
        due_at: Some(now),
        doubt: Mark::Clear,
        hold_reason: Some(format!("paused: {reason}")),
        ..Transition::new(
            RunState::Queued,
            Event {
                kind: "account_refused",
                detail: json!({
                    "code": e.code,
                    "message": e.message,
                    "http_status": e.http_status,
                    "reason": reason,
                }),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::test_support::*;

    #[test]
    fn listed_codes_are_about_the_account_and_balance_codes_watch_the_balance() {
        let listed = vec![
            "INSUFFICIENT_BALANCE".to_owned(),
            "quota_exceeded".to_owned(),
        ];
        assert_eq!(
            refusal_scope("INVALID_WORKFLOW_INPUT", &listed, true),
            RefusalScope::Run
        );
        assert_eq!(
            refusal_scope("QUOTA_EXCEEDED", &listed, true),
            RefusalScope::Account
        );
        assert_eq!(
            refusal_scope("INSUFFICIENT_BALANCE", &listed, true),
            RefusalScope::Balance
        );
        // A provider whose balance cannot be read waits on probes instead.
        assert_eq!(
            refusal_scope("INSUFFICIENT_BALANCE", &listed, false),
            RefusalScope::Account
        );
    }

    #[test]
    fn an_account_refusal_puts_the_run_back_without_counting_it() {
        let e = ProviderError {
            code: "INSUFFICIENT_BALANCE".into(),
            message: "balance 0.01 < quote 0.03".into(),
            detail: json!({}),
            http_status: 200,
        };
        let t = account_refused(&e, "balance too low (INSUFFICIENT_BALANCE)", now());
        assert_eq!(t.to, RunState::Queued);
        assert_eq!(t.attempts_delta, -1);
        assert_eq!(t.doubt, Mark::Clear);
        assert!(t.error.is_none() && !t.settled, "not failed, not final");
        assert_eq!(t.due_at, Some(now()));
        assert!(
            t.hold_reason
                .as_deref()
                .unwrap()
                .contains("balance too low")
        );
        assert_eq!(t.event.kind, "account_refused");
    }
}
